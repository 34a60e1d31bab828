"""SWAG (Maddox et al. 2019) as an optax transformation, and its samplers.

`swag(start_step, freq, rank)` goes last in an optax chain. It passes the updates through
untouched and, from update `start_step` on and every `freq` updates, folds the post-update
parameters θ into running moments:
    mean ← mean + (θ − mean)/(n+1),   params2 ← params2 + (θ² − params2)/(n+1),   n ← n+1,
and, with rank R > 0, writes the deviation θ − mean into a ring buffer of the R latest ones.
Unlike the reference ([Q2]) nothing is blended in before the first snapshot, so after N
snapshots `mean` is exactly Σθ/N and `params2` exactly Σθ²/N.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MIN_VARIANCE = 1e-30


class SwagState(NamedTuple):
    step: jax.Array  # optimizer updates seen so far
    num_snapshots: jax.Array
    mean: Any
    params2: Any  # running uncentred second moment
    deviations: Any  # leaves [rank, *shape]: the latest θ − mean, a ring buffer; None if rank 0


def swag(start_step: int, freq: int = 1, rank: int = 0) -> optax.GradientTransformation:
    if freq < 1 or rank < 0 or start_step < 0:
        raise ValueError("swag needs start_step >= 0, freq >= 1 and rank >= 0")

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        # No buffer at all for diagonal SWAG (rank 0): zero-size arrays cannot be checkpointed.
        deviations = (jax.tree.map(lambda p: jnp.zeros((rank, *p.shape), p.dtype), params)
                      if rank else None)
        return SwagState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), zeros, zeros, deviations)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("swag needs the parameters: call update(updates, state, params)")
        new_params = optax.apply_updates(params, updates)
        collect = (state.step >= start_step) & ((state.step - start_step) % freq == 0)
        n = state.num_snapshots.astype(jnp.float32)

        def blend(running, value):
            return running + (value - running) / (n + 1.0)

        mean = jax.tree.map(blend, state.mean, new_params)
        params2 = jax.tree.map(lambda s, p: blend(s, jnp.square(p)), state.params2, new_params)
        deviations = None
        if rank:
            slot = state.num_snapshots % rank
            deviations = jax.tree.map(lambda d, p, m: d.at[slot].set(p - m),
                                      state.deviations, new_params, mean)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(collect, a, b), new, old)
        return updates, SwagState(
            step=state.step + 1,
            num_snapshots=state.num_snapshots + collect.astype(jnp.int32),
            mean=keep(mean, state.mean),
            params2=keep(params2, state.params2),
            deviations=keep(deviations, state.deviations),
        )

    return optax.GradientTransformation(init, update)


def find_swag_state(opt_state) -> SwagState:
    """The SwagState inside an optax chain's state."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, SwagState))
             if isinstance(s, SwagState)]
    if len(found) != 1:
        raise ValueError(f"expected one SwagState in the optimizer state, found {len(found)}")
    return found[0]


def swag_std(mean, params2):
    """Diagonal standard deviation √max(E[θ²] − E[θ]², 1e-30)."""
    return jax.tree.map(lambda m, s: jnp.sqrt(jnp.maximum(s - jnp.square(m), MIN_VARIANCE)),
                        mean, params2)


def _normal_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noise)


def sample_diagonal(key, mean, std, scale: float = 1.0):
    """θ = mean + scale·std⊙ξ (the reference's sampler: no 1/√2 factor)."""
    noise = _normal_like(key, mean)
    return jax.tree.map(lambda m, s, z: m + scale * s * z, mean, std, noise)


def sample_low_rank(key, state: SwagState, scale: float = 1.0):
    """θ = mean + scale·(std⊙ξ₁/√2 + Dᵀξ₂/√(2(R−1))), D the R stored deviations (R ≥ 2)."""
    rank = jax.tree.leaves(state.deviations)[0].shape[0]
    if rank < 2:
        raise ValueError("low-rank SWAG sampling needs rank >= 2")
    diag_key, low_rank_key = jax.random.split(key)
    std = swag_std(state.mean, state.params2)
    diag_noise = _normal_like(diag_key, state.mean)
    # One ξ₂ ∈ R^R shared by every leaf: the low-rank factor spans all parameters jointly.
    low_rank_noise = jax.random.normal(low_rank_key, (rank,))
    return jax.tree.map(lambda m, s, d, z: low_rank_leaf(m, s, d, z, low_rank_noise, scale),
                        state.mean, std, state.deviations, diag_noise)


def low_rank_leaf(mean, std, deviations, diag_noise, low_rank_noise, scale: float = 1.0):
    """One leaf of a low-rank SWAG sample, mean + scale·(std⊙ξ₁/√2 + Dᵀξ₂/√(2(R−1))).

    deviations [R, *shape], diag_noise ξ₁ like mean, low_rank_noise ξ₂ [R]: the caller passes
    the same ξ₂ to every leaf of one sample.
    """
    rank = deviations.shape[0]
    low_rank = jnp.tensordot(low_rank_noise, deviations, axes=1) / jnp.sqrt(2.0 * (rank - 1))
    return mean + scale * (std * diag_noise / jnp.sqrt(2.0) + low_rank)
