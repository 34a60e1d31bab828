import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.swag import (find_swag_state, low_rank_leaf, sample_diagonal, sample_low_rank, swag,
                         swag_std)


def run_sequence(updates_list, start_step, freq, rank):
    """Feed known updates through sgd(lr=1)+swag; return the post-update params and the state."""
    params = {"w": jnp.zeros(3), "b": {"c": jnp.zeros((2, 2))}}
    opt = optax.chain(optax.sgd(1.0), swag(start_step, freq, rank))
    state = opt.init(params)
    history = []
    for grads in updates_list:
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, find_swag_state(state)


def make_grads(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(rng.normal(size=3), jnp.float32),
             "b": {"c": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}} for _ in range(n)]


@pytest.mark.parametrize("start_step, freq", [(0, 1), (3, 1), (2, 3)])
def test_moments_match_numpy_without_spurious_zero(start_step, freq):
    grads = make_grads(11)
    history, state = run_sequence(grads, start_step, freq, rank=0)
    collected = [h for k, h in enumerate(history) if k >= start_step and (k - start_step) % freq == 0]
    assert int(state.num_snapshots) == len(collected)
    for path in (("w",), ("b", "c")):
        get = lambda tree: tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]
        stack = np.stack([np.asarray(get(h)) for h in collected])
        np.testing.assert_allclose(get(state.mean), stack.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(get(state.params2), (stack ** 2).mean(0), rtol=1e-5, atol=1e-6)
    assert state.deviations is None


def test_low_rank_deviation_ring_buffer():
    grads = make_grads(7, seed=1)
    history, state = run_sequence(grads, 0, 1, rank=3)
    # Snapshot n writes θ_n − mean_n (the mean including θ_n) into slot n % 3.
    ws = np.stack([np.asarray(h["w"]) for h in history])
    for n in range(4, 7):
        np.testing.assert_allclose(state.deviations["w"][n % 3], ws[n] - ws[: n + 1].mean(0),
                                   rtol=1e-5, atol=1e-5)


def test_updates_pass_through_unchanged():
    params = {"w": jnp.ones(4)}
    grads = {"w": jnp.arange(4.0)}
    plain = optax.sgd(0.1)
    with_swag = optax.chain(optax.sgd(0.1), swag(0, 1))
    u1, _ = plain.update(grads, plain.init(params), params)
    u2, _ = with_swag.update(grads, with_swag.init(params), params)
    np.testing.assert_array_equal(u1["w"], u2["w"])


def test_diagonal_sampler_statistics():
    mean = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    params2 = {"a": jnp.array([1.0 + 0.25, 4.0 + 4.0]), "b": jnp.array([[0.25]])}  # var .25, 4, 0
    std = swag_std(mean, params2)
    np.testing.assert_allclose(std["a"], [0.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(std["b"], [[1e-15]], rtol=1e-3)  # floored variance 1e-30
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    samples = jax.vmap(lambda k: sample_diagonal(k, mean, std))(keys)
    np.testing.assert_allclose(samples["a"].mean(0), [1.0, -2.0], atol=0.05)
    np.testing.assert_allclose(samples["a"].std(0), [0.5, 2.0], rtol=0.03)


def test_low_rank_sampler_covariance():
    grads = make_grads(30, seed=2)
    _, state = run_sequence(grads, 0, 1, rank=5)
    keys = jax.random.split(jax.random.PRNGKey(1), 40000)
    samples = np.asarray(jax.vmap(lambda k: sample_low_rank(k, state))(keys)["w"])
    d = np.asarray(state.deviations["w"])  # [R, 3]
    diag = np.asarray(swag_std(state.mean, state.params2)["w"]) ** 2
    expected = np.diag(diag) / 2 + d.T @ d / (2 * (5 - 1))
    np.testing.assert_allclose(np.cov(samples.T), expected, rtol=0.08, atol=0.02)


def test_low_rank_leaf_formula():
    # mean + scale·(std⊙ξ₁/√2 + Dᵀξ₂/√(2(R−1))) with R = 3, worked out by hand.
    mean, std, diag_noise = jnp.array([1.0, -1.0]), jnp.array([2.0, 4.0]), jnp.array([1.0, 0.5])
    deviations = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]])  # [R, 2]
    low_rank_noise = jnp.array([2.0, 1.0, -1.0])  # Dᵀξ₂ = [-1, 3], /√4 = [-0.5, 1.5]
    got = low_rank_leaf(mean, std, deviations, diag_noise, low_rank_noise, scale=2.0)
    expected = np.array([1.0, -1.0]) + 2.0 * (np.array([2.0, 2.0]) / np.sqrt(2.0) + np.array([-0.5, 1.5]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
