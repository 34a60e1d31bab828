"""Gaussian diffusion for GenDD's head (spec §4): cosine schedule, ε-prediction, learned-range
variance, the hybrid mse + vb loss, respacing and ancestral sampling with classifier-free guidance.

Network-agnostic: a network is any `model_fn(x_t, t) -> out` with x_t [N, ..., d], t int32 [N]
(the timestep index *of the training process*, 0..T-1) and out [N, ..., 2d]; out[..., :d] is ε̂
and out[..., d:] the variance interpolation v ∈ [-1, 1] (not clipped here). Per-row arrays such
as the timestep broadcast against the leading (row) axis. To condition a network, close over the
condition: `model_fn = lambda x, t: net.apply(params, x, t, z, k)`.

Schedules are computed in float64 numpy and stored as float32 jax arrays in a `GaussianDiffusion`,
a NamedTuple (a pytree, so it can be passed through `jax.jit`). A respaced process is the same
type; its `timestep_map[j]` is the original index that the network receives at respaced step j.

    diffusion = make_diffusion(cosine_betas(1000))      # training, T = 1000
    sampler = respace(diffusion, 100)                   # CIFAR sampling, S = 100
    losses = training_losses(diffusion, model_fn, key, x0)   # dict of per-row [N] arrays
    guided = cfg_model_fn(model_fn_cond, model_fn_uncond, 2.0)
    x = jax.jit(lambda k: p_sample_loop(sampler, guided, k, (n, d)))(key)

Follows the reference's behaviour (improved-DDPM maths as used by MAR): no x0 clipping unless
asked for (`x0_clip`, a departure GenDD's configs may opt into), no 1/1000
loss rescale, β at the respaced steps recomputed from ᾱ, the standard normal CDF of the t = 0
decoder term approximated as Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715x³))) (see
`approx_standard_normal_cdf`).
"""
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

_LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

def cosine_alpha_bar(u):
    """ᾱ(u) = cos²(((u + 0.008)/1.008)·π/2) for u ∈ [0, 1], in float64 (unnormalised: ᾱ(0) < 1)."""
    u = np.asarray(u, dtype=np.float64)
    return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta), i = 0..T−1, as float64 numpy."""
    if num_steps < 1:
        raise ValueError(f"cosine_betas needs num_steps >= 1, got {num_steps}")
    i = np.arange(num_steps, dtype=np.float64)
    betas = 1.0 - cosine_alpha_bar((i + 1) / num_steps) / cosine_alpha_bar(i / num_steps)
    return np.minimum(betas, max_beta)


class GaussianDiffusion(NamedTuple):
    """Per-step coefficients of a discrete Gaussian diffusion, float32 arrays of length T.

    Indexing is by the step index j = 0..T−1 of *this* process; `timestep_map[j]` is the index the
    network receives (the identity unless the process was made by `respace`).
    """
    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array  # ᾱ_{j−1}, with ᾱ_{−1} = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array  # σ̃²_j = β_j (1 − ᾱ_{j−1}) / (1 − ᾱ_j); 0 at j = 0
    posterior_log_variance_clipped: jax.Array  # log σ̃²_j with entry 0 replaced by entry 1
    posterior_mean_coef1: jax.Array  # multiplies x0
    posterior_mean_coef2: jax.Array  # multiplies x_t
    timestep_map: jax.Array  # int32: original timestep index fed to the network

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_diffusion(betas, timestep_map: Optional[Sequence[int]] = None) -> GaussianDiffusion:
    """Build a `GaussianDiffusion` from betas (computed in float64, stored as float32)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"make_diffusion needs a non-empty 1-D array of betas, got {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("make_diffusion needs 0 < beta <= 1 at every step")
    num = betas.shape[0]
    timestep_map = np.arange(num) if timestep_map is None else np.asarray(timestep_map)
    if timestep_map.shape != (num,):
        raise ValueError(f"timestep_map has shape {timestep_map.shape}, expected ({num},)")

    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # Entry 0 of σ̃² is 0 (ᾱ_{−1} = 1): its log is clipped to entry 1. With a single step there is
    # no entry 1; fall back on β_0 then (only the loss at t = 0 would use it and it does not).
    first = post_var[1] if num > 1 else betas[0]
    post_log_var = np.log(np.append(first, post_var[1:]))
    coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)

    f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64), dtype=jnp.float32)
    return GaussianDiffusion(
        betas=f32(betas),
        log_betas=f32(np.log(betas)),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(coef1),
        posterior_mean_coef2=f32(coef2),
        timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
    )


def make_cosine_diffusion(num_steps: int = 1000, num_sampling_steps: Optional[int] = None):
    """The spec's process: T cosine steps, respaced to `num_sampling_steps` when given."""
    betas = cosine_betas(num_steps)
    if num_sampling_steps is None:
        return make_diffusion(betas)
    return respace(np.cumprod(1.0 - betas), num_sampling_steps)


def respaced_indices(num_timesteps: int, num_sampling_steps: int) -> np.ndarray:
    """Kept original indices round(i·(T−1)/(S−1)), i = 0..S−1, with Python's round().

    Python rounds halves to even; for the spec's cases no i·(T−1)/(S−1) is a half
    (999/99 = 111/11 and 999/63 = 111/7), so S = 100 gives {0, 10, …, 989, 999} and S = 64 gives
    {0, 16, …, 983, 999}. Duplicates (only possible when S > T) are dropped, so fewer than S
    steps may be kept. S = 1 keeps {0}.
    """
    if not 1 <= num_sampling_steps:
        raise ValueError(f"num_sampling_steps must be >= 1, got {num_sampling_steps}")
    if num_sampling_steps == 1:
        return np.zeros([1], dtype=np.int64)
    stride = (num_timesteps - 1) / (num_sampling_steps - 1)
    kept = sorted({round(i * stride) for i in range(num_sampling_steps)})
    return np.asarray(kept, dtype=np.int64)


def respace(diffusion_or_alphas_cumprod: Union[GaussianDiffusion, np.ndarray],
            num_sampling_steps: int) -> GaussianDiffusion:
    """A process over S of the T steps: β'_j = 1 − ᾱ_{k_j}/ᾱ_{k_{j−1}} with ᾱ_{k_{−1}} = 1.

    Given a `GaussianDiffusion`, ᾱ is rebuilt in float64 from its float32 tables as the product
    of the per-step ratios ᾱ_i/ᾱ_{i−1}, taken as 1 − β_i where β_i < ½ and as the quotient of the
    stored ᾱ where β_i ≥ ½, so every ratio keeps float32 relative precision (1 − β alone loses it
    for β near 1, ᾱ alone for ᾱ near 1); its `timestep_map` is composed, so a respaced respaced
    process still feeds the network original indices. Given an array, it is taken as ᾱ of the
    original process (pass float64 for exactness).
    """
    if isinstance(diffusion_or_alphas_cumprod, GaussianDiffusion):
        diff = diffusion_or_alphas_cumprod
        betas = np.asarray(diff.betas, dtype=np.float64)
        stored = np.asarray(diff.alphas_cumprod, dtype=np.float64)
        quotient = stored / np.append(1.0, stored[:-1])
        ac = np.cumprod(np.where(betas < 0.5, 1.0 - betas, quotient))
        base_map = np.asarray(diff.timestep_map, dtype=np.int64)
    else:
        ac = np.asarray(diffusion_or_alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1:
            raise ValueError(f"respace needs a 1-D array of alphas_cumprod, got {ac.shape}")
        base_map = np.arange(ac.shape[0])
    kept = respaced_indices(ac.shape[0], num_sampling_steps)
    kept_ac = ac[kept]
    betas = 1.0 - kept_ac / np.append(1.0, kept_ac[:-1])
    return make_diffusion(betas, timestep_map=base_map[kept])


# ----------------------------------------------------------------------------------------------
# Forward process and posterior
# ----------------------------------------------------------------------------------------------

def _extract(arr: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """arr[t] reshaped to broadcast against an array of rank `ndim` whose leading axes are t's."""
    t = jnp.asarray(t)
    values = arr[t]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(diffusion: GaussianDiffusion, x0, t, noise):
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε."""
    return (_extract(diffusion.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(diffusion: GaussianDiffusion, x0, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t−1} | x_t, x0)."""
    n = x_t.ndim
    mean = (_extract(diffusion.posterior_mean_coef1, t, n) * x0
            + _extract(diffusion.posterior_mean_coef2, t, n) * x_t)
    var = jnp.broadcast_to(_extract(diffusion.posterior_variance, t, n), x_t.shape)
    log_var = jnp.broadcast_to(_extract(diffusion.posterior_log_variance_clipped, t, n), x_t.shape)
    return mean, var, log_var


def predict_x0_from_eps(diffusion: GaussianDiffusion, x_t, t, eps):
    """x0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, written as √(1/ᾱ) x_t − √(1/ᾱ − 1) ε; no clipping."""
    n = x_t.ndim
    return (_extract(diffusion.sqrt_recip_alphas_cumprod, t, n) * x_t
            - _extract(diffusion.sqrt_recipm1_alphas_cumprod, t, n) * eps)


def p_mean_variance(diffusion: GaussianDiffusion, model_output, x_t, t,
                    x0_clip: Optional[float] = None):
    """p(x_{t−1} | x_t) from a network output [..., 2d] = (ε̂, v), learned-range variance.

    log σ² = f·log β_t + (1−f)·log σ̃²_t (clipped), f = (v+1)/2; x0 from ε̂, clipped to
    [−x0_clip, x0_clip] when given (the reference does not clip: x0_clip=None);
    mean = posterior mean given (x0, x_t). Returns a dict with mean, variance, log_variance,
    pred_x0 and eps.
    """
    d = x_t.shape[-1]
    if model_output.shape[-1] != 2 * d:
        raise ValueError(f"model output has {model_output.shape[-1]} channels, expected 2*{d}")
    eps, v = model_output[..., :d], model_output[..., d:]
    n = x_t.ndim
    min_log = _extract(diffusion.posterior_log_variance_clipped, t, n)
    max_log = _extract(diffusion.log_betas, t, n)
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    pred_x0 = predict_x0_from_eps(diffusion, x_t, t, eps)
    if x0_clip is not None:
        pred_x0 = jnp.clip(pred_x0, -x0_clip, x0_clip)
    mean, _, _ = q_posterior_mean_variance(diffusion, pred_x0, x_t, t)
    return {"mean": mean, "variance": jnp.exp(log_var), "log_variance": log_var,
            "pred_x0": pred_x0, "eps": eps}


# ----------------------------------------------------------------------------------------------
# Likelihood terms
# ----------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715x³))), the approximation the reference uses.

    Its absolute error is below 2e-4 (1.8e-4 at worst). The argument is clipped to ±40 first
    (Φ is 0 or 1 there in float32 either way), so the cube cannot overflow and poison gradients
    with inf·0.
    """
    x = jnp.clip(x, -40.0, 40.0)
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for x on the 256-level grid of [−1, 1] under N(means, e^{2 log_scales}), in nats.

    The bin of x is [x − 1/255, x + 1/255]; below −0.999 it extends to −∞ and above 0.999 to +∞,
    so the 256 bins of the grid −1 + 2k/255 partition the line. Probabilities are clamped at 1e-12
    before the log. Uses `approx_standard_normal_cdf`.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_over_row(a):
    return jnp.mean(a, axis=tuple(range(1, a.ndim))) if a.ndim > 1 else a


# ----------------------------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------------------------

def training_losses(diffusion: GaussianDiffusion, model_fn: ModelFn, key, x0,
                    t=None, noise=None) -> dict:
    """Per-row hybrid loss (spec §4 "Loss per row"); returns a dict of [N] float32 arrays.

    keys: "loss" = mse + vb, "mse", "vb" (bits), "t" (the drawn timesteps). x0 is [N, ..., d];
    t ~ U{0..T−1} and ε ~ N(0, I) per row are drawn from `key` unless given. The network is
    called once, on x_t with the timestep index t (through `timestep_map`, the identity for a
    process that is not respaced). vb sees ε̂ through stop_gradient, so it trains v only:
    KL(q(x_{t−1}|x_t,x0) ‖ p)/ln 2 for t > 0, the discretized-Gaussian NLL of x0/ln 2 at t = 0,
    both averaged over the non-row dims. The caller averages "loss" over rows.
    """
    n = x0.shape[0]
    k_t, k_noise = jax.random.split(key)
    if t is None:
        t = jax.random.randint(k_t, (n,), 0, diffusion.num_timesteps)
    t = jnp.asarray(t, dtype=jnp.int32)
    if noise is None:
        noise = jax.random.normal(k_noise, x0.shape, dtype=x0.dtype)
    x_t = q_sample(diffusion, x0, t, noise)
    out = model_fn(x_t, diffusion.timestep_map[t])
    d = x0.shape[-1]
    eps, v = out[..., :d], out[..., d:]
    mse = _mean_over_row(jnp.square(noise - eps))

    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    p = p_mean_variance(diffusion, frozen, x_t, t)
    true_mean, _, true_log_var = q_posterior_mean_variance(diffusion, x0, x_t, t)
    kl = _mean_over_row(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / _LOG2
    nll = -_mean_over_row(discretized_gaussian_log_likelihood(
        x0, p["mean"], 0.5 * p["log_variance"])) / _LOG2
    vb = jnp.where(t == 0, nll, kl)
    return {"loss": mse + vb, "mse": mse, "vb": vb, "t": t}


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def cfg_model_fn(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance as a model_fn: two passes on the same (x_t, t).

    ε = ε_u + scale·(ε_c − ε_u); the variance channel v comes from the conditional pass. Only
    the conditional chain is run, so the initial noise is trivially shared (as in the reference,
    where the unconditional half of its doubled batch is discarded).
    """
    def guided(x_t, t):
        out_c = model_fn_cond(x_t, t)
        out_u = model_fn_uncond(x_t, t)
        d = x_t.shape[-1]
        eps = out_u[..., :d] + scale * (out_c[..., :d] - out_u[..., :d])
        return jnp.concatenate([eps, out_c[..., d:]], axis=-1)
    return guided


def cfg_model_fn_doubled(model_fn_doubled: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance with one network call on a doubled batch.

    `model_fn_doubled(x2, t2)` gets x2 = [x_t; x_t] and t2 = [t; t] (rows 0..N−1 to be run with
    the condition, rows N..2N−1 with the null condition, which the caller arranges, e.g. by
    closing over conds [z; 0]) and returns [2N, ..., 2d]. Same result as `cfg_model_fn`.
    """
    def guided(x_t, t):
        n = x_t.shape[0]
        out = model_fn_doubled(jnp.concatenate([x_t, x_t], axis=0),
                               jnp.concatenate([t, t], axis=0))
        out_c, out_u = out[:n], out[n:]
        d = x_t.shape[-1]
        eps = out_u[..., :d] + scale * (out_c[..., :d] - out_u[..., :d])
        return jnp.concatenate([eps, out_c[..., d:]], axis=-1)
    return guided


def p_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, key, x, j, temperature=1.0,
             x0_clip: Optional[float] = None):
    """One ancestral step at step j of `diffusion` (a scalar, may be traced).

    The network gets the original index timestep_map[j]; x_{j−1} = mean + [j > 0]·σ·z·temperature.
    """
    t = jnp.full((x.shape[0],), j, dtype=jnp.int32)
    out = p_mean_variance(diffusion, model_fn(x, diffusion.timestep_map[t]), x, t, x0_clip)
    noise = jax.random.normal(key, x.shape, dtype=x.dtype)
    nonzero = (jnp.asarray(j) != 0).astype(x.dtype)
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature


def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, key, shape,
                  temperature: float = 1.0, model_fn_uncond: Optional[ModelFn] = None,
                  guidance_scale: Optional[float] = None, x_init=None,
                  x0_clip: Optional[float] = None):
    """Ancestral DDPM sampling over all steps of `diffusion` (usually a `respace`d one).

    Starts from x ~ N(0, I) of `shape` (or `x_init`) and runs steps S−1..0 in a `lax.scan`;
    every step uses its own key folded from `key`; no noise is added at step 0. With
    `guidance_scale` and `model_fn_uncond` given, `model_fn` is the conditional network and the
    two are combined with `cfg_model_fn`. `x0_clip` clips every step's x̂0 (see
    p_mean_variance). Pure and jittable: close over the networks, e.g.
    `jax.jit(lambda k: p_sample_loop(sampler, fn, k, (n, d)))`.
    """
    if (guidance_scale is None) != (model_fn_uncond is None):
        raise ValueError("classifier-free guidance needs both guidance_scale and model_fn_uncond")
    if guidance_scale is not None:
        model_fn = cfg_model_fn(model_fn, model_fn_uncond, guidance_scale)
    k_init, k_steps = jax.random.split(key)
    x = jax.random.normal(k_init, tuple(shape), dtype=jnp.float32) if x_init is None else x_init
    steps = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)

    def body(x, j):
        step_key = jax.random.fold_in(k_steps, j)
        return p_sample(diffusion, model_fn, step_key, x, j, temperature, x0_clip), None

    x, _ = jax.lax.scan(body, x, steps)
    return x
