"""BEiT-v2 ViT-B/16 and ViT-L/16 as GenDD's ImageNet code defines them (GenDD_imagenet/models/beit.py,
timm's BEiT with the BEiT-v2 configurations): the teachers of its BEiT -> ResNet-50 runs, which load
them from bare state dicts (`beitv2_{base,large}_patch16_224_pt1k_ft21kto1k_new.pth`, strictly).

    beitv2_base_patch16_224   dim 768,  12 blocks, 12 heads   86,530,984 parameters
    beitv2_large_patch16_224  dim 1024, 24 blocks, 16 heads  304,430,568 parameters

The network: a 16x16 stride-16 patch embedding (a conv with bias) of the 224x224 image into 14x14
tokens (row-major), a learned cls token in front, no absolute position embedding; then pre-norm
blocks x + γ1·attn(norm1(x)), x + γ2·mlp(norm2(x)) with LayerNorm ε 1e-6 and per-channel layer
scales γ (initialised 1e-5). Attention: one bias-free qkv projection plus the learned q_bias and
v_bias (k has no bias), q scaled by head_dim^-0.5, and every block's own relative position bias
(a table of (2·14-1)² + 3 rows per head, read through a fixed index: patch to patch by their
offset, cls to patch, patch to cls, cls to cls). The MLP is fc1 (4x), GELU with PyTorch's exact
erf (not the tanh form), fc2. No final norm: the pooled feature is fc_norm (LayerNorm) of the mean
of the patch tokens (the cls token is left out), which the head classifies; GenDD's target feature
is this vector (`forward_head`'s return_features). Its inputs are normalised with ImageNet's mean
and std (timm's beitv2 configs and GenDD's transforms), 224x224 only (the bias index is fixed to
the 14x14 grid). Dropout and drop-path are 0 in GenDD's teachers: `train` changes nothing.

Parameter names mirror the PyTorch modules as nested Flax modules: `patch_embed/proj`,
`cls_token`, `blocks_<i>/{norm1,attn/{qkv,proj},norm2,mlp/{fc1,fc2}}` with `attn`'s own
`q_bias`, `v_bias`, `relative_position_bias_table` and the block's `gamma_1`, `gamma_2`,
`fc_norm`, and `head` as the zoo's `classifier`. With return_features, the feature map is the
last block's patch tokens as a [B, 14, 14, D] map. Initialisers follow timm's (truncated normal
0.02 for linear layers, zero bias tables and biases, layer scales 1e-5) except its depth rescaling
of the output projections and its 0.001 head scale; the teachers come from checkpoints.
"""
import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models.resnet import ResNetOutput
from models.zoo.base import ZooNet, register_model
from models.zoo.resnet_imagenet import IMAGENET_DATA_NAME, IMAGENET_MEAN, IMAGENET_STD

PATCH_SIZE = 16
LAYER_NORM_EPSILON = 1e-6  # timm's BEiT: partial(nn.LayerNorm, eps=1e-6)
LAYER_SCALE_INIT = 1e-5  # the BEiT-v2 configs' init_values
linear_init = nn.initializers.truncated_normal(0.02)


def relative_position_index(grid: int) -> np.ndarray:
    """[T, T] rows of the relative position bias table for T = grid² + 1 tokens (the cls token,
    then the patches row-major): patch i -> patch j reads row (Δy + grid - 1)·(2·grid - 1) +
    (Δx + grid - 1), (Δy, Δx) being i's position minus j's; after those (2·grid - 1)² rows come
    cls -> patch, patch -> cls and cls -> cls."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    span = 2 * grid - 1
    offsets = (rows[:, None] - rows[None, :] + grid - 1) * span + (cols[:, None] - cols[None, :] + grid - 1)
    index = np.empty((grid * grid + 1,) * 2, np.int32)
    index[1:, 1:] = offsets
    index[0, 1:] = span * span  # cls -> patch
    index[1:, 0] = span * span + 1  # patch -> cls
    index[0, 0] = span * span + 2  # cls -> cls
    return index


def layer_norm(name: str, dtype):
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


class Attention(nn.Module):
    num_heads: int
    grid: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        span = 2 * self.grid - 1
        q_bias = self.param("q_bias", nn.initializers.zeros, (dim,))
        v_bias = self.param("v_bias", nn.initializers.zeros, (dim,))
        table = self.param("relative_position_bias_table", nn.initializers.zeros,
                           (span * span + 3, self.num_heads))
        qkv = nn.Dense(3 * dim, use_bias=False, kernel_init=linear_init, dtype=self.dtype, name="qkv")(x)
        qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k).astype(jnp.float32)
        bias = table[relative_position_index(self.grid)]  # [T, T, heads]
        weights = nn.softmax(scores + jnp.transpose(bias, (2, 0, 1)), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim)
        return nn.Dense(dim, kernel_init=linear_init, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.hidden, kernel_init=linear_init, dtype=self.dtype, name="fc1")(x)
        y = nn.gelu(y, approximate=False)  # PyTorch's nn.GELU(): the exact erf form
        return nn.Dense(x.shape[-1], kernel_init=linear_init, dtype=self.dtype, name="fc2")(y)


class Block(nn.Module):
    num_heads: int
    mlp_ratio: float
    grid: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        gamma_1 = self.param("gamma_1", nn.initializers.constant(LAYER_SCALE_INIT), (dim,))
        gamma_2 = self.param("gamma_2", nn.initializers.constant(LAYER_SCALE_INIT), (dim,))
        attn = Attention(self.num_heads, self.grid, self.dtype, name="attn")
        x = x + gamma_1.astype(self.dtype) * attn(layer_norm("norm1", self.dtype)(x))
        mlp = Mlp(int(dim * self.mlp_ratio), self.dtype, name="mlp")
        return x + gamma_2.astype(self.dtype) * mlp(layer_norm("norm2", self.dtype)(x))


class PatchEmbed(nn.Module):
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.embed_dim, (PATCH_SIZE, PATCH_SIZE), strides=(PATCH_SIZE, PATCH_SIZE),
                    padding="VALID", dtype=self.dtype, name="proj")(x)
        return x.reshape(x.shape[0], -1, self.embed_dim)  # [B, grid², D], row-major as PyTorch's flatten


class BEiT(ZooNet):
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pixel_mean: Sequence[float] = IMAGENET_MEAN
    pixel_std: Sequence[float] = IMAGENET_STD

    input_size: ClassVar[int] = 224  # the only size its relative position index fits
    default_data_name: ClassVar[str] = IMAGENET_DATA_NAME  # the converter's default --data_name

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        if images.shape[1:3] != (self.input_size, self.input_size):
            raise ValueError(f"GenDD's BEiT takes {self.input_size}x{self.input_size} images (its relative "
                             f"position bias is fixed to the 14x14 patch grid), got "
                             f"{images.shape[1]}x{images.shape[2]}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        grid = self.input_size // PATCH_SIZE
        x = PatchEmbed(self.embed_dim, self.dtype, name="patch_embed")(self.standardize(images))
        cls_token = self.param("cls_token", linear_init, (1, 1, self.embed_dim))
        cls_token = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls_token, x], axis=1)
        for index in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, grid, self.dtype, name=f"blocks_{index}")(x)
        patches = x[:, 1:]
        pooled = layer_norm("fc_norm", jnp.float32)(jnp.mean(patches.astype(jnp.float32), axis=1))
        classifier = nn.Dense(self.num_classes, kernel_init=linear_init, dtype=self.dtype, name="classifier")
        logits = classifier(pooled).astype(jnp.float32)
        if return_features:
            return ResNetOutput(logits, pooled, patches.reshape(x.shape[0], grid, grid, self.embed_dim))
        return logits


# GenDD's model names; its `_1k` variants are the same networks (for other checkpoints).
for _name, _dim, _depth, _heads in (("beitv2_base_patch16_224", 768, 12, 12),
                                    ("beitv2_large_patch16_224", 1024, 24, 16)):
    register_model(_name, aliases=(f"{_name}_1k",))(
        functools.partial(BEiT, embed_dim=_dim, depth=_depth, num_heads=_heads))
