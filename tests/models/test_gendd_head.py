"""Tests of models/vector_field.py's DiffusionMLP: GenDD's diffusion head (spec §4)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.vector_field import AdaLNMLP, DiffusionMLP

TD, K, C, W, DEPTH = 4, 3, 6, 16, 2  # a small head shared by most tests


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_shapes(net, td, c):
    return jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((2, td)),
                          jnp.zeros((2,), jnp.int32), jnp.zeros((2, c)), jnp.zeros((2,), jnp.int32))


@pytest.fixture(scope="module")
def small():
    net = DiffusionMLP(token_dim=TD, num_tokens=K, width=W, depth=DEPTH, cond_drop_prob=0.5)
    params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((2, TD)), jnp.zeros((2,), jnp.int32),
                               jnp.zeros((2, C)), jnp.zeros((2,), jnp.int32))
    return net, params


def _perturbed(params, key=7, scale=0.3):
    """All parameters moved off their (partly zero) initial values."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                        for k, x in zip(keys, leaves)])


def _inputs(n=5, key=1):
    kx, kt, kc, kk = jax.random.split(jax.random.key(key), 4)
    return (jax.random.normal(kx, (n, TD)), jax.random.randint(kt, (n,), 0, 1000),
            jax.random.normal(kc, (n, C)), jax.random.randint(kk, (n,), 0, K))


@pytest.mark.parametrize("cond_dim, tokens, expected", [(64, 1, 19_427_456), (256, 4, 19_627_136)])
def test_parameter_count_of_the_spec_head(cond_dim, tokens, expected):
    # width 1024, depth 3, token_dim 64: "about 19.5M" (spec §4)
    assert _count(_init_shapes(DiffusionMLP(token_dim=64, num_tokens=tokens), 64, cond_dim)) == expected


def test_built_from_the_adaln_pieces_and_initialised_as_the_spec(small):
    _, params = small
    p = params["params"]
    assert set(p) == {"input_proj", "time_in", "time_out", "cond_proj", "token_embed",
                      "block_0", "block_1", "final_modulation", "out"}
    # ResBlocks are AdaLNBlocks (affine LayerNorm, Dense-SiLU-Dense) with 3-chunk modulation
    assert set(p["block_0"]) == {"modulation", "norm", "dense_in", "dense_out"}
    assert p["block_0"]["modulation"]["dense"]["kernel"].shape == (W, 3 * W)
    assert p["final_modulation"]["dense"]["kernel"].shape == (W, 2 * W)
    assert p["out"]["kernel"].shape == (W, 2 * TD)
    assert p["time_in"]["kernel"].shape == (256, W) and p["token_embed"]["embedding"].shape == (K, W)
    # zero: every modulation Dense, the output Dense, every bias
    for name in ("block_0", "block_1"):
        assert not np.any(np.asarray(p[name]["modulation"]["dense"]["kernel"]))
        for dense in ("dense_in", "dense_out"):
            assert not np.any(np.asarray(p[name][dense]["bias"]))
    for name in ("out", "final_modulation"):
        leaf = p[name] if name == "out" else p[name]["dense"]
        assert not np.any(np.asarray(leaf["kernel"])) and not np.any(np.asarray(leaf["bias"]))
    for name in ("input_proj", "cond_proj", "time_in", "time_out"):
        assert not np.any(np.asarray(p[name]["bias"]))
    # Xavier-uniform kernels within their bound
    bound = math.sqrt(6.0 / (TD + W))
    assert np.max(np.abs(p["input_proj"]["kernel"])) <= bound
    assert np.max(np.abs(p["input_proj"]["kernel"])) > 0.5 * bound


def test_init_distributions_on_the_spec_sizes():
    net = DiffusionMLP(token_dim=64, num_tokens=4, width=256, depth=1)
    p = jax.jit(net.init)(jax.random.key(3), jnp.zeros((1, 64)), jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1, 32)), jnp.zeros((1,), jnp.int32))["params"]
    assert abs(float(np.std(p["time_in"]["kernel"])) - 0.02) < 0.002  # N(0, 0.02)
    assert abs(float(np.std(p["time_out"]["kernel"])) - 0.02) < 0.002
    assert abs(float(np.std(p["token_embed"]["embedding"])) - 1.0) < 0.1  # N(0, 1)


def test_zero_output_at_init(small):
    net, params = small
    x, t, c, k = _inputs(9)
    out = jax.jit(net.apply)(params, x, t, c, k)
    assert out.shape == (9, 2 * TD)
    np.testing.assert_array_equal(out, np.zeros((9, 2 * TD)))


def _layernorm(h, eps, scale=None, bias=None):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    out = (h - mu) / np.sqrt(var + eps)
    return out if scale is None else out * scale + bias


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _reference_forward(p, x, t, c, k):
    """The spec's SimpleMLPAdaLN written out in NumPy (float64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    dense = lambda q, v: v @ q["kernel"] + q["bias"]
    half = 128
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    angles = np.asarray(t, np.float64)[:, None] * freqs
    temb = np.concatenate([np.cos(angles), np.sin(angles)], -1)  # raw integer t
    temb = dense(p["time_out"], _silu(dense(p["time_in"], temb)))
    y = temb + dense(p["cond_proj"], c) + p["token_embed"]["embedding"][np.asarray(k)]
    h = dense(p["input_proj"], x)
    for i in range(DEPTH):
        b = p[f"block_{i}"]
        shift, scale, gate = np.split(dense(b["modulation"]["dense"], _silu(y)), 3, -1)
        u = _layernorm(h, 1e-6, b["norm"]["scale"], b["norm"]["bias"]) * (1 + scale) + shift
        u = dense(b["dense_out"], _silu(dense(b["dense_in"], u)))
        h = h + gate * u
    shift, scale = np.split(dense(p["final_modulation"]["dense"], _silu(y)), 2, -1)
    return dense(p["out"], _layernorm(h, 1e-6) * (1 + scale) + shift)


def test_forward_matches_the_spec_written_in_numpy(small):
    net, params = small
    params = _perturbed(params)
    x, t, c, k = _inputs(6)
    out = jax.jit(net.apply)(params, x, t, c, k)
    np.testing.assert_allclose(out, _reference_forward(params["params"], x, t, c, k),
                               rtol=2e-4, atol=2e-4)


def test_condition_dropout_is_per_row_and_only_in_training(small):
    net, params = small  # cond_drop_prob = 0.5
    params = _perturbed(params)
    n = 400
    x = jnp.tile(jax.random.normal(jax.random.key(2), (1, TD)), (n, 1))
    t = jnp.full((n,), 500)
    c = jnp.tile(jax.random.normal(jax.random.key(3), (1, C)), (n, 1))
    k = jnp.arange(n) % K
    apply = jax.jit(net.apply, static_argnames="train")
    cond_out = apply(params, x, t, c, k)
    null_out = apply(params, x, t, jnp.zeros_like(c), k)
    train_out = apply(params, x, t, c, k, train=True, rngs={"dropout": jax.random.key(4)})
    kept = np.all(np.isclose(train_out, cond_out, atol=1e-6), axis=-1)
    dropped = np.all(np.isclose(train_out, null_out, atol=1e-6), axis=-1)
    assert np.all(kept ^ dropped)  # every row is exactly one of the two, token id kept
    assert 0.4 < dropped.mean() < 0.6  # independent per row, p = 0.5
    # another key drops other rows; evaluation never drops
    other = apply(params, x, t, c, k, train=True, rngs={"dropout": jax.random.key(5)})
    assert not np.array_equal(np.asarray(other), np.asarray(train_out))
    np.testing.assert_array_equal(apply(params, x, t, c, k, train=False), cond_out)
    # no dropout without a probability
    plain = DiffusionMLP(token_dim=TD, num_tokens=K, width=W, depth=DEPTH)
    np.testing.assert_array_equal(
        jax.jit(plain.apply, static_argnames="train")(params, x, t, c, k, train=True), cond_out)


def test_timestep_and_token_position_are_used(small):
    net, params = small
    params = _perturbed(params)
    x, t, c, k = _inputs(4)
    apply = jax.jit(net.apply)
    base = apply(params, x, t, c, k)
    assert not np.allclose(apply(params, x, t + 1, c, k), base)
    assert not np.allclose(apply(params, x, t, c, (k + 1) % K), base)
    # scalar t and missing token ids broadcast
    assert apply(params, x, 3, c, None).shape == (4, 2 * TD)


def test_time_mlp_once_per_timestep_equals_once_per_row(small):
    """A scalar t (the sampler's steps) and, with num_timesteps = T and more rows than T, the T
    timesteps embedded once and gathered: the same outputs and gradients as one time-MLP row per
    row, and the NumPy spec."""
    _, params = small
    params = _perturbed(params)
    num_timesteps, n = 8, 20  # more rows than timesteps: the table is used
    x, _, c, k = _inputs(n)
    t = jax.random.randint(jax.random.key(11), (n,), 0, num_timesteps)
    per_row = DiffusionMLP(token_dim=TD, num_tokens=K, width=W, depth=DEPTH)
    table = DiffusionMLP(token_dim=TD, num_tokens=K, width=W, depth=DEPTH, num_timesteps=num_timesteps)
    loss = lambda net: jax.jit(jax.value_and_grad(
        lambda p, c: jnp.sum(jnp.sin(net.apply(p, x, t, c, k))), argnums=(0, 1)))
    (value, grads), (value_t, grads_t) = loss(per_row)(params, c), loss(table)(params, c)
    np.testing.assert_allclose(value_t, value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads_t), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.jit(table.apply)(params, x, t, c, k),
                               _reference_forward(params["params"], x, t, c, k), rtol=2e-4, atol=2e-4)
    # a scalar timestep is embedded once and broadcast
    scalar = jax.jit(per_row.apply)(params, x, 5, c, k)
    np.testing.assert_allclose(scalar, jax.jit(per_row.apply)(params, x, jnp.full((n,), 5), c, k),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scalar, _reference_forward(params["params"], x, np.full(n, 5), c, k),
                               rtol=2e-4, atol=2e-4)


def test_wrong_token_width_raises(small):
    net, params = small
    with pytest.raises(ValueError, match="token_dim"):
        net.apply(params, jnp.zeros((2, TD + 1)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, C)))


def test_edfm_head_is_unchanged():
    # the EDFM head's parameter counts, pinned by tests/models/test_vector_field.py, too
    shapes = jax.eval_shape(AdaLNMLP(num_classes=10, hidden_size=256).init, jax.random.key(0),
                            jnp.zeros((2, 10)), jnp.zeros((2, 128)), jnp.zeros((2,)))
    assert _count(shapes) == 325_224
