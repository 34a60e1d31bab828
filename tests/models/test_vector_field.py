"""Tests of models/vector_field.py: the EDFM AdaLN MLP head and its reusable pieces."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.vector_field import (AdaLNBlock, AdaLNMLP, AdaLNModulation, edm_preconditioning,
                                 log_time_feature, modulate, sinusoidal_embedding)


K, C, H, B = 10, 8, 32, 4   # the small head shared by most tests


def _count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _shapes(net, k, c):
    return jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((2, k)), jnp.zeros((2, c)),
                          jnp.zeros((2,)))


def _apply(net, params, *args, **kwargs):
    # jitted: one compilation instead of many eager per-op ones (slow on a busy CPU)
    return jax.jit(net.apply, static_argnames=("train",))(params, *args, **kwargs)


@pytest.fixture(scope="module")
def small():
    """A small EDFM head and its initial parameters (initialised once per module)."""
    net = AdaLNMLP(num_classes=K, hidden_size=H)
    params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((B, K)), jnp.zeros((B, C)),
                               jnp.zeros((B,)))
    return net, params


def _inputs(key=1):
    kx, kc, kt = jax.random.split(jax.random.key(key), 3)
    x = 4.0 * jax.random.normal(kx, (B, K))
    cond = jax.random.normal(kc, (B, C))
    t = jax.random.uniform(kt, (B,))
    return x, cond, t


@pytest.mark.parametrize("k, c, h, expected", [(10, 128, 256, 325_224),
                                               (100, 256, 512, 1_209_360)])
def test_parameter_counts_match_spec(k, c, h, expected):
    assert _count(_shapes(AdaLNMLP(num_classes=k, hidden_size=h), k, c)) == expected


def test_param_shapes_of_first_block():
    shapes = _shapes(AdaLNMLP(num_classes=10, hidden_size=256), 10, 128)["params"]
    b0 = shapes["block_0"]
    assert b0["modulation"]["dense"]["kernel"].shape == (32, 3 * 138)
    assert b0["dense"]["kernel"].shape == (138, 256)
    assert shapes["block_3"]["modulation"]["dense"]["kernel"].shape == (32, 3 * 256)
    assert shapes["out"]["kernel"].shape == (256, 10)
    assert "norm" not in b0  # LayerNorm without scale and bias


def test_initialisation_scheme(small):
    params = small[1]["params"]
    for i in range(4):
        mod = params[f"block_{i}"]["modulation"]["dense"]
        assert not np.any(np.asarray(mod["kernel"])) and not np.any(np.asarray(mod["bias"]))
    denses = [params[f"block_{i}"]["dense"] for i in range(4)] + [params["out"]]
    for d in denses:
        fan_in, fan_out = d["kernel"].shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = np.asarray(d["kernel"])
        assert np.abs(w).max() <= bound + 1e-7
        assert np.abs(w).max() > 0.8 * bound  # uniform over the whole Xavier range
        b = np.asarray(d["bias"])
        assert np.abs(b).max() < 1e-5 and np.abs(b).max() > 0  # N(0, 1e-6^2)


def test_blocks_after_the_first_are_identity_at_init(small):
    full, params = small
    one = AdaLNMLP(num_classes=K, hidden_size=H, num_blocks=1)
    sub = {"params": {"block_0": params["params"]["block_0"], "out": params["params"]["out"]}}
    x, cond, t = _inputs()
    np.testing.assert_allclose(np.asarray(_apply(full, params, x, cond, t)),
                               np.asarray(_apply(one, sub, x, cond, t)), rtol=1e-6, atol=1e-7)


def test_preconditioning_values():
    c_in, c_skip, c_out = edm_preconditioning(jnp.array(0.0), 1.0, 4.0)
    np.testing.assert_allclose([c_in, c_skip, c_out], [0.25, -1.0, 1.0], rtol=1e-6)
    c_in, c_skip, c_out = edm_preconditioning(jnp.array(1.0), 1.0, 4.0)
    np.testing.assert_allclose([c_in, c_skip, c_out], [1.0, 1.0, 4.0], rtol=1e-6)
    c_in, c_skip, c_out = edm_preconditioning(jnp.array(1.0 - 1e-4), 1.0, 4.0)
    np.testing.assert_allclose([c_in, c_skip, c_out], [1.0, 1.0, 4.0], rtol=2e-3)
    # general t against the formulas
    t = np.linspace(0, 1, 11)
    c_in, c_skip, c_out = edm_preconditioning(jnp.asarray(t), 1.0, 4.0)
    ref_in = 1 / np.sqrt(t ** 2 + 16 * (1 - t) ** 2)
    np.testing.assert_allclose(c_in, ref_in, rtol=1e-5)
    np.testing.assert_allclose(c_skip, (t - 16 * (1 - t)) * ref_in ** 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_out, 4 * ref_in, rtol=1e-5)


def test_skip_connection_uses_c_skip(small):
    # With the output layer zeroed, v = c_skip(t) * x_t exactly.
    net, params = small
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "out" in jax.tree_util.keystr(path) else x,
        params)
    x, cond, t = _inputs()
    t = t.at[0].set(0.0).at[1].set(1.0)
    v = _apply(net, params, x, cond, t)
    _, c_skip, _ = edm_preconditioning(t, 1.0, 4.0)
    np.testing.assert_allclose(v, c_skip[:, None] * x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v[0], -x[0], rtol=1e-6)   # t = 0: v = -x_t
    np.testing.assert_allclose(v[1], x[1], rtol=1e-6)    # t = 1: v = x_t


def test_s_noise_field_changes_preconditioning(small):
    net, params = small
    x, cond, t = _inputs()
    other = AdaLNMLP(num_classes=K, hidden_size=H, s_noise=2.0)
    assert not np.allclose(_apply(net, params, x, cond, t), _apply(other, params, x, cond, t))


def test_sinusoidal_embedding_layout():
    x = jnp.array([0.0, 0.7, -1.3])
    e = sinusoidal_embedding(x, 32)
    assert e.shape == (3, 32)
    omega = 10000.0 ** (-np.arange(16) / 16)
    ang = np.asarray(x)[:, None] * omega
    np.testing.assert_allclose(e[:, :16], np.cos(ang), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e[:, 16:], np.sin(ang), rtol=1e-5, atol=1e-6)
    # raw integer timesteps (diffusion-style use) with a wider embedding
    e_int = sinusoidal_embedding(jnp.array([0, 999]), 256)
    assert e_int.shape == (2, 256) and e_int.dtype == jnp.float32
    np.testing.assert_allclose(e_int[1, 128 + 1], np.sin(999 * 10000.0 ** (-1 / 128)),
                               rtol=1e-4)
    with pytest.raises(ValueError):
        sinusoidal_embedding(x, 31)


def test_log_time_feature():
    np.testing.assert_allclose(log_time_feature(jnp.array(0.0)), math.log(1000.0) / 4,
                               rtol=1e-6)
    np.testing.assert_allclose(log_time_feature(jnp.array(1.0)), math.log(1e-12) / 4,
                               rtol=1e-5)
    np.testing.assert_allclose(log_time_feature(jnp.array(0.5), time_scale=10.0),
                               math.log(5.0 + 1e-12) / 4, rtol=1e-6)


def test_modulate():
    x = jnp.array([[1.0, 2.0]])
    np.testing.assert_allclose(modulate(x, jnp.array([[0.5, -1.0]]), jnp.array([[1.0, 0.0]])),
                               [[2.5, 1.0]])


def test_scalar_time_broadcasts_and_jit_grad_are_finite_at_endpoints(small):
    net, params = small
    x, cond, _ = _inputs()
    for tv in (0.0, 0.37, 1.0):
        a = _apply(net, params, x, cond, jnp.asarray(tv))
        b = _apply(net, params, x, cond, jnp.full((B,), tv))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(a))

    @jax.jit
    def loss(p, tv):
        return jnp.sum(net.apply(p, x, cond, tv) ** 2)

    for tv in (0.0, 1.0):
        g = jax.grad(loss)(params, jnp.asarray(tv))
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


def test_wrong_input_width_raises():
    net = AdaLNMLP(num_classes=10, hidden_size=16)
    with pytest.raises(ValueError):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((2, 9)), jnp.zeros((2, 3)),
                       jnp.zeros((2,)))


def test_dropout_only_in_training(small):
    _, params = small
    net = AdaLNMLP(num_classes=K, hidden_size=H, droprate=0.5)
    # make the residual blocks matter so that their dropout is visible
    params = jax.tree.map(lambda p: p + 0.1, params)
    x, cond, t = _inputs()
    eval1 = _apply(net, params, x, cond, t)
    eval2 = _apply(net, params, x, cond, t, train=False)
    np.testing.assert_array_equal(eval1, eval2)
    tr1 = _apply(net, params, x, cond, t, train=True, rngs={"dropout": jax.random.key(3)})
    tr2 = _apply(net, params, x, cond, t, train=True, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(tr1, eval1) and not np.allclose(tr1, tr2)


def test_modulation_chunks_and_activation_order():
    c = jnp.ones((2, 4))
    post = AdaLNModulation(5, num_chunks=2)
    params = post.init(jax.random.key(0), c)
    shift, scale = post.apply(params, c)
    assert shift.shape == scale.shape == (2, 5)
    assert not np.any(np.asarray(shift)) and not np.any(np.asarray(scale))
    # post-activation: SiLU of the Dense output; pre-activation: Dense of SiLU(c)
    params = jax.tree.map(lambda p: jnp.full_like(p, -1.0), params)
    out_post = post.apply(params, c)[0]
    pre = AdaLNModulation(5, num_chunks=2, activation_first=True)
    out_pre = pre.apply(params, c)[0]
    np.testing.assert_allclose(out_post, nn.silu(-5.0) * np.ones((2, 5)), rtol=1e-6)
    np.testing.assert_allclose(out_pre, (-4 * nn.silu(1.0) - 1) * np.ones((2, 5)), rtol=1e-6)


def test_block_configurable_for_a_diffusion_head():
    """A MAR/GenDD-style ResBlock (SiLU before the modulation Dense, affine LayerNorm,
    Dense-SiLU-Dense MLP, zero biases) from the same AdaLNBlock: identity at init."""
    w = 16
    block = AdaLNBlock(w, mlp_hidden=w, activation=nn.silu, residual=True,
                       norm_affine=True, modulation_activation_first=True,
                       bias_init=nn.initializers.zeros)
    h = jax.random.normal(jax.random.key(0), (3, w))
    y = jax.random.normal(jax.random.key(1), (3, w))
    params = block.init(jax.random.key(2), h, y)
    p = params["params"]
    assert set(p) == {"modulation", "norm", "dense_in", "dense_out"}
    assert p["norm"]["scale"].shape == (w,) and p["modulation"]["dense"]["kernel"].shape == (w, 3 * w)
    assert not np.any(np.asarray(p["dense_in"]["bias"]))
    np.testing.assert_array_equal(block.apply(params, h, y), h)
    with pytest.raises(ValueError):
        AdaLNBlock(w + 1).init(jax.random.key(0), h, y)


def test_dropout_acts_on_the_block_output_or_on_its_residual_branch():
    """The reference drops units of each block's output (after the residual add); the other
    placement drops only the residual branch, so with the modulation at zero (gate 0) the
    residual blocks pass h through untouched and only block 0's output can be dropped."""
    from models.vector_field import AdaLNBlock

    block = AdaLNBlock(8, residual=True, droprate=0.5)  # zero-init modulation: gate = 0
    h, c = jax.random.normal(jax.random.key(0), (4, 8)), jnp.ones((4, 3))
    params = block.init(jax.random.key(1), h, c)
    rngs = {"dropout": jax.random.key(2)}
    branch = block.apply(params, h, c, deterministic=False, rngs=rngs)
    np.testing.assert_allclose(branch, h)  # the branch is gated to 0: dropping it changes nothing
    stream = AdaLNBlock(8, residual=True, droprate=0.5, dropout_on_output=True).apply(
        params, h, c, deterministic=False, rngs=rngs)
    kept = np.asarray(stream) != 0
    assert 0 < kept.mean() < 1  # about half of h's units dropped, the rest scaled by 2
    np.testing.assert_allclose(np.asarray(stream)[kept], 2 * np.asarray(h)[kept], rtol=1e-6)
    assert AdaLNMLP(num_classes=K).dropout_on_stream  # the EDFM head's default: the reference's
