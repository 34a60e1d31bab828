"""AdaLN MLP vector fields (EDFM head) and the reusable pieces they are built from.

The EDFM head (spec `edfm_methods.md` section 2) is an MLP over the noisy logits x_t
concatenated with a condition vector (the pooled backbone feature), modulated by a
sinusoidal embedding of a log-time feature through adaptive LayerNorm (AdaLN), and wrapped
in EDM-style preconditioning:

    v(x_t, c, t) = c_skip(t) * x_t + c_out(t) * F(c_in(t) * x_t, c, t)

The pieces are small and independent so that other heads can reuse them without copying:

* `sinusoidal_embedding`: the cosine-first sinusoid of a scalar per row (EDFM: log-time
  feature, 32 dims; a diffusion timestep embedder: raw integer timestep, 256 dims).
* `edm_preconditioning`: (c_in, c_skip, c_out) of the straight noise-to-data path.
* `log_time_feature`: EDFM's tau = ln(time_scale * (1 - t) + 1e-12) / 4.
* `modulate`: x * (1 + scale) + shift.
* `AdaLNModulation`: zero-initialised Dense of a conditioning vector split into chunks
  (shift/scale/gate, or shift/scale for a final layer); the activation can come after
  the Dense (EDFM) or before it (DiT / MAR / GenDD).
* `AdaLNBlock`: LayerNorm -> modulate -> MLP -> (optionally gated residual). EDFM uses a
  single Dense+GELU MLP and no LayerNorm affine; a GenDD/MAR ResBlock uses
  Dense-SiLU-Dense, an affine LayerNorm and zero biases, all selectable by fields.
* `DiffusionMLP`: GenDD's diffusion head (MAR's SimpleMLPAdaLN) from the pieces above, plus
  a token-position embedding and per-row condition dropout.

No I/O and no training logic lives here.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any
Initializer = Callable[..., Array]

# Dense-layer initialisers of the EDFM head: Xavier-uniform kernels, tiny Gaussian biases.
default_kernel_init: Initializer = nn.initializers.xavier_uniform()
default_bias_init: Initializer = nn.initializers.normal(stddev=1e-6)


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------
def sinusoidal_embedding(x: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Cosine-first sinusoidal embedding of one scalar per row.

    Args:
      x: array of shape [...] (any float or integer values; a time feature or timestep).
      dim: embedding size; must be even. With half = dim // 2 the frequencies are
        omega_i = max_period ** (-i / half), i = 0..half-1.
      max_period: the base of the geometric frequency ladder.

    Returns:
      [..., dim] array: [cos(x * omega_0..half-1), sin(x * omega_0..half-1)].
    """
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal_embedding needs an even dim, got {dim}")
    half = dim // 2
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    freqs = jnp.power(max_period, -jnp.arange(half, dtype=jnp.float32) / half).astype(dtype)
    angles = x.astype(dtype)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def edm_preconditioning(t: Array, s_data: float = 1.0, s_noise: float = 4.0
                        ) -> Tuple[Array, Array, Array]:
    """EDM-style scalings for the path x_t = t * x1 + (1 - t) * s_noise * xi.

    With Var(x1) = s_data^2 the variance of x_t is t^2 s_data^2 + (1 - t)^2 s_noise^2, and

      c_in   = (t^2 s_data^2 + (1 - t)^2 s_noise^2) ** -1/2      (unit-variance input)
      c_skip = (t s_data^2 - (1 - t) s_noise^2) * c_in^2
      c_out  = s_data * s_noise * c_in

    At t = 0 (s_data=1, s_noise=4) these are (1/4, -1, 1); at t = 1 they are (1, 1, 4).
    Works elementwise on any shape of t.
    """
    t = jnp.asarray(t)
    sd2 = s_data * s_data
    sn2 = s_noise * s_noise
    c_in = jnp.reciprocal(jnp.sqrt(t * t * sd2 + (1.0 - t) ** 2 * sn2))
    c_skip = (t * sd2 - (1.0 - t) * sn2) * c_in * c_in
    c_out = s_data * s_noise * c_in
    return c_in, c_skip, c_out


def log_time_feature(t: Array, time_scale: float = 1000.0, eps: float = 1e-12) -> Array:
    """EDFM's time feature tau = ln(time_scale * (1 - t) + eps) / 4 (finite at t = 1)."""
    t = jnp.asarray(t)
    return jnp.log(time_scale * (1.0 - t) + eps) / 4.0


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """AdaLN modulation x * (1 + scale) + shift."""
    return x * (1.0 + scale) + shift


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------
class AdaLNModulation(nn.Module):
    """Chunks of a zero-initialised Dense of the conditioning vector.

    Returns a tuple of `num_chunks` arrays of width `features` each, e.g. (shift, scale,
    gate). `activation_first=False` computes act(Dense(c)) (EDFM); `True` computes
    Dense(act(c)) (DiT / MAR / GenDD). Kernel and bias start at zero, so at initialisation
    every chunk is act(0) = 0 (post-activation with SiLU) or exactly 0 (pre-activation).
    """

    features: int
    num_chunks: int = 3
    activation: Callable[[Array], Array] = nn.silu
    activation_first: bool = False

    @nn.compact
    def __call__(self, c: Array) -> Tuple[Array, ...]:
        if self.activation_first:
            c = self.activation(c)
        out = nn.Dense(self.features * self.num_chunks,
                       kernel_init=nn.initializers.zeros,
                       bias_init=nn.initializers.zeros, name="dense")(c)
        if not self.activation_first:
            out = self.activation(out)
        return tuple(jnp.split(out, self.num_chunks, axis=-1))


class AdaLNBlock(nn.Module):
    """One AdaLN block: LayerNorm -> modulate -> MLP -> gated residual.

    (shift, scale, gate) = AdaLNModulation(dim(h))(c)
    u = modulate(LayerNorm(h), shift, scale)
    u = act(Dense_features(u))                                  if mlp_hidden is None (EDFM)
    u = Dense_features(act(Dense_mlp_hidden(u)))                otherwise (MAR/GenDD ResBlock)
    u = Dropout(u)                            (dropout_on_output: out = Dropout(out) instead)
    out = h + gate * u if residual else u

    The modulation acts on the block input, so its width is dim(h), which may differ from
    `features` when `residual=False` (EDFM's first block maps K+C to the hidden width; its
    gate exists as parameters but is not used).
    """

    features: int
    mlp_hidden: Optional[int] = None
    activation: Callable[[Array], Array] = nn.gelu
    residual: bool = True
    norm_affine: bool = False
    norm_eps: float = 1e-6
    modulation_activation_first: bool = False
    droprate: float = 0.0
    dropout_on_output: bool = False  # dropout on the block's output (the EDFM reference's place)
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = default_bias_init

    @nn.compact
    def __call__(self, h: Array, c: Array, deterministic: bool = True) -> Array:
        dim = h.shape[-1]
        if self.residual and dim != self.features:
            raise ValueError(f"residual AdaLNBlock needs dim(h) == features, got {dim} "
                             f"and {self.features}")
        shift, scale, gate = AdaLNModulation(
            dim, num_chunks=3, activation_first=self.modulation_activation_first,
            name="modulation")(c)
        u = nn.LayerNorm(epsilon=self.norm_eps, use_bias=self.norm_affine,
                         use_scale=self.norm_affine, use_fast_variance=False,
                         name="norm")(h)
        u = modulate(u, shift, scale)
        dense = lambda n, name: nn.Dense(n, kernel_init=self.kernel_init,
                                         bias_init=self.bias_init, name=name)
        if self.mlp_hidden is None:
            u = self.activation(dense(self.features, "dense")(u))
        else:
            u = self.activation(dense(self.mlp_hidden, "dense_in")(u))
            u = dense(self.features, "dense_out")(u)
        dropout = nn.Dropout(rate=self.droprate)
        if not self.dropout_on_output:
            u = dropout(u, deterministic=deterministic)
        out = h + gate * u if self.residual else u
        return dropout(out, deterministic=deterministic) if self.dropout_on_output else out


class AdaLNMLP(nn.Module):
    """EDFM vector field v(x_t, condition, t) over K-dim noisy logits.

    Fields:
      num_classes: output (and x_t) dimension K.
      hidden_size: width H of every block.
      time_embed_dim: size of the sinusoidal embedding of the log-time feature.
      num_blocks: number of AdaLN blocks (block 0 is non-residual, maps K+C -> H).
      s_noise: base-noise std of the path (callers set it to the config's noise_var).
      s_data: data std assumed by the preconditioning.
      time_scale: the 1000 in tau = ln(time_scale * (1 - t) + 1e-12) / 4.
      droprate: dropout rate inside the blocks (needs a 'dropout' rng when training).
      dropout_on_stream: dropout on each block's output, after the residual add, as the
        reference (models/mlp.py); False: on the residual branch only, before the gate.

    Call: (x_t [B, K], condition [B, C], t [B] or scalar in [0, 1], train=False) -> [B, K].
    The condition is the already pooled backbone feature GAP(Z).

    At initialisation all modulations are zero, so blocks 1.. are the identity.
    Parameter counts: K=10, C=128, H=256 -> 325,224; K=100, C=256, H=512 -> 1,209,360.
    """

    num_classes: int
    hidden_size: int = 256
    time_embed_dim: int = 32
    num_blocks: int = 4
    s_noise: float = 4.0
    s_data: float = 1.0
    time_scale: float = 1000.0
    droprate: float = 0.0
    dropout_on_stream: bool = True

    def preconditioning(self, t: Array) -> Tuple[Array, Array, Array]:
        return edm_preconditioning(t, self.s_data, self.s_noise)

    @nn.compact
    def __call__(self, x_t: Array, condition: Array, t: Array, train: bool = False) -> Array:
        if x_t.shape[-1] != self.num_classes:
            raise ValueError(f"x_t has {x_t.shape[-1]} features, expected num_classes="
                             f"{self.num_classes}")
        t = jnp.asarray(t, dtype=x_t.dtype)
        # A scalar time (the ODE solvers') is embedded once and broadcast, not once per row.
        t = (t.reshape((1,) * (x_t.ndim - 1)) if t.ndim == 0
             else jnp.broadcast_to(t, x_t.shape[:-1]))
        c_in, c_skip, c_out = self.preconditioning(t[..., None])
        emb = sinusoidal_embedding(log_time_feature(t, self.time_scale),
                                   self.time_embed_dim)
        h = jnp.concatenate([c_in * x_t, condition.astype(x_t.dtype)], axis=-1)
        for i in range(self.num_blocks):
            h = AdaLNBlock(self.hidden_size, residual=i > 0, droprate=self.droprate,
                           dropout_on_output=self.dropout_on_stream,
                           name=f"block_{i}")(h, emb, deterministic=not train)
        f = nn.Dense(self.num_classes, kernel_init=default_kernel_init,
                     bias_init=default_bias_init, name="out")(h)
        return c_skip * x_t + c_out * f


class DiffusionMLP(nn.Module):
    """GenDD's diffusion head (spec `gendd_method.md` §4, MAR's "SimpleMLPAdaLN"), built from
    the AdaLN pieces above: an ε-prediction network with a learned-range variance channel.

    Inputs per row: a noisy token x_t [N, token_dim], the integer timestep t [N] of the training
    process (0..T-1, *not* rescaled; a scalar: the same for every row), the condition z [N,
    cond_dim] (the student's LayerNormed pooled feature) and the token position k [N] in
    0..num_tokens-1. The time MLP depends on t alone, so it runs once for a scalar t, and once
    per timestep 0..T-1 (gathered by row) when `num_timesteps` = T is given and N > T.

        h = Dense(width)(x_t)
        y = TimeMLP(sinusoidal_embedding(t, 256)) + Dense(width)(z) + Embed(num_tokens, width)[k]
        depth x AdaLNBlock(width, mlp_hidden=width, SiLU, affine LayerNorm eps 1e-6,
                           SiLU-before-Dense modulation, zero biases)       (MAR ResBlock)
        (shift, scale) = AdaLNModulation(width, 2 chunks, activation first)(y)
        out = Dense(2 * token_dim)(modulate(LayerNorm_noaffine(h), shift, scale))

    out[..., :token_dim] is ε̂ and out[..., token_dim:] the variance interpolation v, the layout
    `models.diffusion` expects. TimeMLP is Dense(256 -> width)-SiLU-Dense(width -> width) with
    N(0, 0.02) kernels.

    Condition dropout (classifier-free guidance): with `train=True` and cond_drop_prob > 0 each
    row independently has its condition replaced by zeros with probability cond_drop_prob (the
    token position is kept); it needs a 'dropout' rng. The null condition used for guidance at
    sampling time is the same zero vector, which still passes through the condition Dense's bias
    (spec §9 quirk 4).

    Initialisation: Xavier-uniform kernels and zero biases; every modulation Dense and the output
    Dense are zero, so the head outputs exactly 0 at initialisation (and the residual blocks are
    the identity). Width 1024, depth 3, token_dim 64, cond_dim 64, one token: 19,427,456
    parameters; cond_dim 256, four tokens: 19,627,136 ("about 19.5M").
    """

    token_dim: int
    num_tokens: int = 1
    width: int = 1024
    depth: int = 3
    time_embed_dim: int = 256
    cond_drop_prob: float = 0.0
    max_period: float = 10000.0
    # T, when t is an index 0..T-1 (training): more rows than T embed the T timesteps and gather.
    num_timesteps: Optional[int] = None

    @nn.compact
    def __call__(self, x_t: Array, t: Array, cond: Array, token_ids: Optional[Array] = None,
                 train: bool = False) -> Array:
        if x_t.shape[-1] != self.token_dim:
            raise ValueError(f"x_t has {x_t.shape[-1]} features, expected token_dim="
                             f"{self.token_dim}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        rows = x_t.shape[:-1]
        dtype = x_t.dtype
        cond = cond.astype(dtype)
        if train and self.cond_drop_prob > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.cond_drop_prob, rows)
            cond = jnp.where(drop[..., None], jnp.zeros_like(cond), cond)
        if token_ids is None:
            token_ids = jnp.zeros(rows, jnp.int32)
        token_ids = jnp.broadcast_to(jnp.asarray(token_ids, jnp.int32), rows)

        zeros = nn.initializers.zeros
        dense = lambda n, name, init=default_kernel_init: nn.Dense(
            n, kernel_init=init, bias_init=zeros, name=name)
        time_init = nn.initializers.normal(stddev=0.02)
        time_in = dense(self.width, "time_in", time_init)
        time_out = dense(self.width, "time_out", time_init)

        def time_mlp(steps):
            emb = sinusoidal_embedding(steps, self.time_embed_dim, self.max_period).astype(dtype)
            return time_out(nn.silu(time_in(emb)))

        h = dense(self.width, "input_proj")(x_t)
        # The time MLP is a function of t alone: run it once per distinct timestep where that is
        # fewer rows than one per row (same values, less work).
        t = jnp.asarray(t)
        if t.ndim == 0:  # one timestep for every row (the sampler's steps)
            temb = time_mlp(t)
        elif self.num_timesteps is not None and math.prod(rows) > self.num_timesteps:
            temb = time_mlp(jnp.arange(self.num_timesteps))[jnp.broadcast_to(t, rows)]
        else:
            temb = time_mlp(jnp.broadcast_to(t, rows))
        y = (temb + dense(self.width, "cond_proj")(cond)
             + nn.Embed(self.num_tokens, self.width,
                        embedding_init=nn.initializers.normal(stddev=1.0),
                        name="token_embed")(token_ids).astype(dtype))
        for i in range(self.depth):
            h = AdaLNBlock(self.width, mlp_hidden=self.width, activation=nn.silu, residual=True,
                           norm_affine=True, norm_eps=1e-6, modulation_activation_first=True,
                           bias_init=zeros, name=f"block_{i}")(h, y)
        shift, scale = AdaLNModulation(self.width, num_chunks=2, activation_first=True,
                                       name="final_modulation")(y)
        u = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False,
                         name="final_norm")(h)
        u = modulate(u, shift, scale)
        return nn.Dense(2 * self.token_dim, kernel_init=zeros, bias_init=zeros, name="out")(u)
