"""A PyTorch definition of GenDD's BEiT-v2 teachers (GenDD_imagenet/models/beit.py: timm's BEiT with
the beitv2_{base,large}_patch16_224 configurations), written for the tests from the architecture,
with its state-dict keys: patch_embed.proj, cls_token, blocks.<i>.{norm1, attn.{qkv (weight only),
q_bias, v_bias, relative_position_bias_table, relative_position_index (a buffer), proj}, norm2,
mlp.{fc1, fc2}, gamma_1, gamma_2}, fc_norm, head. timm itself is not a dependency. The zoo's
models/zoo/beit.py is proved against this.

`build(arch, num_classes, **sizes)` returns a module whose forward gives (pooled feature, logits).
Imports torch at the top: import this module only where torch is required.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH = 16
EPS = 1e-6
CONFIGS = {  # GenDD's constructors: (embed_dim, depth, num_heads); mlp_ratio 4, init_values 1e-5
    "beitv2_base_patch16_224": (768, 12, 12),
    "beitv2_large_patch16_224": (1024, 24, 16),
}


@functools.lru_cache(maxsize=4)
def relative_position_index(grid: int) -> tuple:
    """The table row of every (query, key) token pair, pair by pair: token 0 is cls, token
    1 + r·grid + c the patch in row r, column c. Among patches the row encodes the offset (query
    minus key) in both directions; the three rows after those serve cls -> patch, patch -> cls and
    cls -> cls. Nested tuples (built once per grid, so also under torch.device("meta"))."""
    span = 2 * grid - 1
    patches = span * span
    rows = []
    for query in range(grid * grid + 1):
        row = []
        for key in range(grid * grid + 1):
            if query == 0:
                row.append(patches + 2 if key == 0 else patches)
            elif key == 0:
                row.append(patches + 1)
            else:
                (qr, qc), (kr, kc) = divmod(query - 1, grid), divmod(key - 1, grid)
                row.append((qr - kr + grid - 1) * span + (qc - kc + grid - 1))
        rows.append(tuple(row))
    return tuple(rows)


class Attention(nn.Module):
    def __init__(self, dim, heads, grid):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, heads))
        self.register_buffer("relative_position_index", torch.tensor(relative_position_index(grid)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        w_q, w_k, w_v = self.qkv.weight.chunk(3)

        def heads(t):  # [B, T, D] -> [B, heads, T, D / heads]
            return t.view(batch, tokens, self.heads, -1).transpose(1, 2)

        q = heads(F.linear(x, w_q, self.q_bias))
        k = heads(F.linear(x, w_k))  # BEiT's keys have no bias
        v = heads(F.linear(x, w_v, self.v_bias))
        bias = self.relative_position_bias_table[self.relative_position_index]  # [T, T, heads]
        scores = q @ k.transpose(-1, -2) / (dim // self.heads) ** 0.5 + bias.permute(2, 0, 1)
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # the exact (erf) GELU, nn.GELU's default


class Block(nn.Module):
    def __init__(self, dim, heads, grid):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = Attention(dim, heads, grid)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), 1e-5))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x):  # [B, 3, H, W] -> [B, patches (row-major), D]
        return self.proj(x).flatten(2).transpose(1, 2)


class BEiT(nn.Module):
    def __init__(self, num_classes, embed_dim, depth, num_heads, image_size=224):
        super().__init__()
        grid = image_size // PATCH
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, grid) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(embed_dim, eps=EPS)  # global_pool 'avg': no final norm
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        pooled = self.fc_norm(x[:, 1:].mean(dim=1))
        return pooled, self.head(pooled)


def build(arch: str, num_classes: int, **sizes) -> BEiT:
    """GenDD's `arch`, or (sizes: embed_dim, depth, num_heads) a smaller one of the same design."""
    embed_dim, depth, num_heads = CONFIGS[arch] if arch in CONFIGS else (None, None, None)
    sizes = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **sizes}
    return BEiT(num_classes, **sizes)


def randomize(model: BEiT, seed: int = 0, token_std: float = 3e-3) -> BEiT:
    """Random weights, in place, none of them the initial ones or ones and zeros (interop.md §5):
    linear layers N(0, 1/fan_in), biases, q_bias and v_bias N(0, 0.1²), LayerNorm scales 1 ± 0.3
    and shifts N(0, 0.1²), relative position bias tables N(0, 1) (they shape the attention),
    layer scales N(0, 0.3²) (not 1e-5: the blocks must matter). The patch embedding and cls token
    give tokens of about `token_std` per channel, so that block 0's norm1 divides by
    sqrt(var + ε) with var near ε: a wrong ε shows. Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def normal(tensor, std, mean=0.0):
        tensor.copy_(mean + std * torch.randn(tensor.shape, generator=generator))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                normal(module.weight, module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    normal(module.bias, 0.1)
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(0.7 + 0.6 * torch.rand(module.weight.shape, generator=generator))
                normal(module.bias, 0.1)
        for block in model.blocks:
            normal(block.attn.q_bias, 0.1)
            normal(block.attn.v_bias, 0.1)
            normal(block.attn.relative_position_bias_table, 1.0)
            normal(block.gamma_1, 0.3)
            normal(block.gamma_2, 0.3)
        proj = model.patch_embed.proj
        normal(proj.weight, token_std * proj.weight[0].numel() ** -0.5)
        normal(proj.bias, token_std)
        normal(model.cls_token, token_std)
    return model.eval()
