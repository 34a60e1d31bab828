"""Distillation losses of the baselines (spec §4–6): pure functions of logits, no I/O.

Shapes: student logits [B, K]; teacher logits [M, B, K] (M members, e.g. SWAG samples).

- KD (§4): the per-member KL(p_teacher ‖ p_student) at temperature T, averaged over members,
  scaled by max(T, T²). Its gradient equals that of the cross-entropy against the mean teacher
  probabilities.
- ProxyEnDD (§5): a Dirichlet Dir(α) over the class probabilities, α = exp(z/T) + s_offset,
  fitted to the teachers with a proxy precision β. Per example: recon − H(Dir(α))/β.
  `broadcast_bug=True` reproduces the reference's [Q6] (mean recon − mean(1/β)·mean H).
- FED (§6): the biased (V-statistic) squared MMD with a sum of RBF kernels over a bandwidth set.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln


def _mean(values, mask: Optional[jax.Array] = None):
    """Mean over the batch axis; with `mask`, over its True rows only."""
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ------------------------------------------------------------------------------------- KD


def kd_loss_per_example(student_logits, teacher_logits, temperature: float = 1.0):
    """max(T, T²)·mean_m Σ_k p^t_mk (log p^t_mk − log p^s_k), per example: [B]."""
    t_log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s_log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t_log_probs) * (t_log_probs - s_log_probs[None]), axis=-1)  # [M, B]
    return max(temperature, temperature**2) * jnp.mean(kl, axis=0)


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0, mask=None):
    """The KD loss of spec §4: the per-member KL averaged over members and (real) examples."""
    return _mean(kd_loss_per_example(student_logits, teacher_logits, temperature), mask)


# ------------------------------------------------------------------------------ Dirichlet


def dirichlet_concentration(logits, temperature: float = 1.0, s_offset: float = 1.0):
    """α = exp(z/T) + s_offset, as the reference (unclipped: exp may overflow)."""
    return jnp.exp(logits / temperature) + s_offset


def dirichlet_log_concentration(logits, temperature: float = 1.0, s_offset: float = 1.0):
    """log α computed stably: logaddexp(z/T, log s_offset)."""
    scaled = logits / temperature
    if s_offset == 0:
        return scaled
    return jnp.logaddexp(scaled, jnp.log(jnp.asarray(s_offset, scaled.dtype)))


def dirichlet_mean_log_probs(logits, temperature: float = 1.0, s_offset: float = 1.0):
    """log(α/α₀), the log of the Dirichlet mean (the point prediction of ProxyEnDD)."""
    log_alpha = dirichlet_log_concentration(logits, temperature, s_offset)
    return log_alpha - jax.nn.logsumexp(log_alpha, axis=-1, keepdims=True)


def dirichlet_entropy(alpha, eps: float = 1e-8):
    """H(Dir(α)) = Σ lnΓ(α_k) − lnΓ(α₀) − Σ (α_k − 1)(ψ(α_k) − ψ(α₀)), with ε inside every
    lnΓ and ψ as the reference. alpha: [..., K] -> [...]."""
    alpha0 = jnp.sum(alpha, axis=-1)
    digamma_diff = digamma(alpha + eps) - digamma(alpha0 + eps)[..., None]
    return (jnp.sum(gammaln(alpha + eps), axis=-1) - gammaln(alpha0 + eps)
            - jnp.sum((alpha - 1.0) * digamma_diff, axis=-1))


def dirichlet_sample_log_probs(key, logits, num_samples: int, temperature: float = 1.0,
                               s_offset: float = 1.0, min_log_prob: float = -100.0,
                               max_log_alpha: float = 60.0):
    """log p for p ~ Dir(α), num_samples draws per example: [S, B, K].

    Sampled in log space (log-gamma draws, then log-softmax), so a tiny probability does not
    become log 0; log p is clipped at `min_log_prob` and log α at `max_log_alpha` (so that a
    huge logit cannot overflow α). These serve as the member "logits" of ensemble metrics.
    """
    log_alpha = jnp.minimum(dirichlet_log_concentration(logits, temperature, s_offset), max_log_alpha)
    alpha = jnp.exp(log_alpha)
    log_gamma = jax.random.loggamma(key, alpha, shape=(num_samples,) + alpha.shape)
    return jnp.maximum(jax.nn.log_softmax(log_gamma, axis=-1), min_log_prob)


# ------------------------------------------------------------------------------ ProxyEnDD


def proxy_teacher_stats(teacher_logits, temperature: float = 1.0):
    """(π̄ [B, K], 1/β [B]) of M teacher members [M, B, K] (spec §5).

    β = (K−1) / (2·Σ_k π̄_k (log π̄_k − mean_m log π_mk)); returned as 1/β, which stays finite
    (0) when the members agree exactly, where β itself would be infinite.
    """
    num_members, num_classes = teacher_logits.shape[0], teacher_logits.shape[-1]
    log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)  # [M, B, K]
    log_mean = jax.nn.logsumexp(log_probs, axis=0) - jnp.log(num_members)  # log π̄
    mean = jnp.exp(log_mean)
    divergence = jnp.sum(mean * (log_mean - jnp.mean(log_probs, axis=0)), axis=-1)
    inv_beta = 2.0 * divergence / (num_classes - 1)
    return mean, inv_beta


def proxy_endd_terms(student_logits, teacher_logits, *, temperature: float = 1.0,
                     s_offset: float = 1.0, eps: float = 1e-8) -> dict:
    """Per-example pieces of the ProxyEnDD loss: recon, entropy, inv_beta [B], teacher_mean [B, K]."""
    alpha = dirichlet_concentration(student_logits, temperature, s_offset)
    alpha0 = jnp.sum(alpha, axis=-1)
    teacher_mean, inv_beta = proxy_teacher_stats(teacher_logits, temperature)
    digamma_diff = digamma(alpha + eps) - digamma(alpha0 + eps)[:, None]
    recon = -jnp.sum(teacher_mean * digamma_diff, axis=-1)
    return {"recon": recon, "entropy": dirichlet_entropy(alpha, eps), "inv_beta": inv_beta,
            "teacher_mean": teacher_mean}


def proxy_endd_per_example(student_logits, teacher_logits, *, temperature: float = 1.0,
                           s_offset: float = 1.0, eps: float = 1e-8):
    """recon_b − H_b/β_b: [B] (the intended ProxyEnDD loss, before the batch mean)."""
    terms = proxy_endd_terms(student_logits, teacher_logits, temperature=temperature,
                             s_offset=s_offset, eps=eps)
    return terms["recon"] - terms["entropy"] * terms["inv_beta"]


def proxy_endd_loss(student_logits, teacher_logits, *, temperature: float = 1.0,
                    s_offset: float = 1.0, eps: float = 1e-8, broadcast_bug: bool = False,
                    mask=None):
    """The ProxyEnDD loss (scalar): mean_b[recon_b − H_b/β_b].

    broadcast_bug=True: the reference's [Q6], where [B] / [B, 1] broadcasts to a B×B matrix
    whose mean is mean_b recon_b − (mean_b 1/β_b)·(mean_b H_b).
    """
    terms = proxy_endd_terms(student_logits, teacher_logits, temperature=temperature,
                             s_offset=s_offset, eps=eps)
    if broadcast_bug:
        return (_mean(terms["recon"], mask)
                - _mean(terms["inv_beta"], mask) * _mean(terms["entropy"], mask))
    return _mean(terms["recon"] - terms["entropy"] * terms["inv_beta"], mask)


# ------------------------------------------------------------------------------------ MMD


def rbf_kernel(x, y, bandwidths: Sequence[float]):
    """k(a, b) = Σ_h exp(−‖a − b‖² / (2h)) for rows of x [N, D] and y [P, D]: [N, P].

    Note h, not h², divides the squared distance (the reference's convention).
    """
    sq_dist = jnp.sum(jnp.square(x[:, None, :] - y[None, :, :]), axis=-1)
    h = jnp.asarray(bandwidths, sq_dist.dtype)
    return jnp.sum(jnp.exp(-sq_dist[..., None] / (2.0 * h)), axis=-1)


def rbf_mmd2(x, y, bandwidths: Sequence[float]):
    """The biased squared MMD (V-statistic, diagonal terms included) between the sample sets
    x [N, D] and y [P, D]: mean k(x, x') + mean k(y, y') − 2 mean k(x, y)."""
    return (jnp.mean(rbf_kernel(x, x, bandwidths)) + jnp.mean(rbf_kernel(y, y, bandwidths))
            - 2.0 * jnp.mean(rbf_kernel(x, y, bandwidths)))
