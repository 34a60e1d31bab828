"""Tests of utils/optim.py: the optimizer every script builds from its config, against hand NumPy
computations of SGD (L2 before heavy-ball momentum) and AdamW (decoupled, lr-scaled decay), and
the shared learning-rate schedules against their formulas."""
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from utils.config import CommonConfig
from utils.optim import epoch_piecewise, make_optimizer, warmup_cosine

PARAMS = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([0.3, -0.7], np.float32)}
GRADS = [{"w": np.array([0.2, -0.1, 0.4], np.float32), "b": np.array([-0.5, 0.25], np.float32)},
         {"w": np.array([-0.3, 0.6, 0.1], np.float32), "b": np.array([0.1, 0.9], np.float32)}]


def lr_schedule(step):
    """A rate that changes every step, so the step an update reads it at matters."""
    return 0.1 / (1.0 + step)


def run_steps(optimizer, grads=GRADS, params=PARAMS):
    """Parameters after applying the optimizer to each gradient in turn (as the trainer does)."""
    params = {k: jnp.asarray(v) for k, v in params.items()}
    state = optimizer.init(params)
    history = []
    for g in grads:
        updates, state = optimizer.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        history.append({k: np.asarray(v, np.float64) for k, v in params.items()})
    return history


def np_sgd(w, grads, lr, momentum, weight_decay):
    """Heavy-ball SGD with L2 added to the gradient before momentum, float64."""
    w = np.asarray(w, np.float64)
    trace = np.zeros_like(w)
    out = []
    for step, g in enumerate(grads):
        d = np.asarray(g, np.float64) + weight_decay * w
        trace = d + momentum * trace
        w = w - lr(step) * trace
        out.append(w)
    return out


def np_adamw(w, grads, lr, b1, b2, eps, weight_decay):
    """Adam with bias correction and decoupled weight decay scaled by the rate, float64.

    `b2` may be a function of the (0-based) step: the second moment of step t uses b2(t), and
    so does its bias correction."""
    w = np.asarray(w, np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for step, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        beta2 = b2(step) if callable(b2) else b2
        t = step + 1
        m = b1 * m + (1 - b1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - beta2**t)
        w = w - lr(step) * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * w)
        out.append(w)
    return out


def sgd_config(**kw):
    return CommonConfig(optim="sgd", optim_momentum=0.9, optim_weight_decay=0.05, **kw)


def adam_config(optim="adam", weight_decay=0.1):
    return CommonConfig(optim=optim, optim_weight_decay=weight_decay, adam_beta1=0.8,
                        adam_beta2=0.95, adam_eps=1e-3)


# ------------------------------------------------------------------------------------- SGD


def test_sgd_is_l2_then_heavy_ball_momentum():
    history = run_steps(make_optimizer(sgd_config(), lr_schedule))
    for name in PARAMS:
        expected = np_sgd(PARAMS[name], [g[name] for g in GRADS], lr_schedule, 0.9, 0.05)
        for got, want in zip(history, expected):
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-7)
    # decoupled decay (subtracting lr·wd·w after momentum) would give other parameters
    decoupled = np.asarray(PARAMS["w"], np.float64)
    trace = np.zeros(3)
    for step, g in enumerate(GRADS):
        trace = g["w"] + 0.9 * trace
        decoupled = decoupled - lr_schedule(step) * (trace + 0.05 * decoupled)
    assert np.abs(history[1]["w"] - decoupled).max() > 1e-5


def test_sgd_decay_mask_limits_the_decay():
    optimizer = make_optimizer(sgd_config(), lr_schedule, decay_mask={"w": True, "b": False})
    history = run_steps(optimizer)
    decayed = np_sgd(PARAMS["w"], [g["w"] for g in GRADS], lr_schedule, 0.9, 0.05)
    plain = np_sgd(PARAMS["b"], [g["b"] for g in GRADS], lr_schedule, 0.9, 0.0)
    np.testing.assert_allclose(history[1]["w"], decayed[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(history[1]["b"], plain[1], rtol=1e-5, atol=1e-7)


def test_frozen_mask_zeroes_the_updates():
    optimizer = make_optimizer(sgd_config(), lr_schedule, frozen_mask={"w": False, "b": True})
    history = run_steps(optimizer)
    np.testing.assert_array_equal(history[1]["b"], np.asarray(PARAMS["b"], np.float64))
    expected = np_sgd(PARAMS["w"], [g["w"] for g in GRADS], lr_schedule, 0.9, 0.05)
    np.testing.assert_allclose(history[1]["w"], expected[1], rtol=1e-5, atol=1e-7)
    # also for Adam, whose decay would otherwise move a zero-gradient leaf
    history = run_steps(make_optimizer(adam_config(), lr_schedule, frozen_mask={"w": True, "b": False}))
    np.testing.assert_array_equal(history[1]["w"], np.asarray(PARAMS["w"], np.float64))
    assert np.abs(history[1]["b"] - PARAMS["b"]).max() > 1e-3


# ------------------------------------------------------------------------------------ Adam


@pytest.mark.parametrize("optim", ["adam", "adamw"])
def test_adam_is_adamw_with_lr_scaled_decoupled_decay(optim):
    history = run_steps(make_optimizer(adam_config(optim), lr_schedule))
    for name in PARAMS:
        expected = np_adamw(PARAMS[name], [g[name] for g in GRADS], lr_schedule, 0.8, 0.95, 1e-3, 0.1)
        for got, want in zip(history, expected):
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
    # L2 on the gradient (decay before the Adam scaling) would differ
    coupled = run_steps(optax.chain(optax.add_decayed_weights(0.1),
                                    optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-3),
                                    optax.scale_by_learning_rate(lr_schedule)))
    assert np.abs(coupled[1]["w"] - history[1]["w"]).max() > 1e-4


def test_adam_without_decay_is_plain_adam_and_decay_mask_applies():
    history = run_steps(make_optimizer(adam_config(weight_decay=0.0), lr_schedule))
    expected = np_adamw(PARAMS["w"], [g["w"] for g in GRADS], lr_schedule, 0.8, 0.95, 1e-3, 0.0)
    np.testing.assert_allclose(history[1]["w"], expected[1], rtol=1e-5, atol=1e-6)
    masked = run_steps(make_optimizer(adam_config(), lr_schedule, decay_mask={"w": False, "b": True}))
    for name, wd in (("w", 0.0), ("b", 0.1)):
        expected = np_adamw(PARAMS[name], [g[name] for g in GRADS], lr_schedule, 0.8, 0.95, 1e-3, wd)
        np.testing.assert_allclose(masked[1][name], expected[1], rtol=1e-5, atol=1e-6)


def test_callable_b2_is_read_per_step():
    def b2(count):
        return 0.9 - 0.4 * 0.5 ** count  # 0.5 at the first step, 0.7 at the second

    history = run_steps(make_optimizer(adam_config(), lr_schedule, b2=b2))
    for name in PARAMS:
        expected = np_adamw(PARAMS[name], [g[name] for g in GRADS], lr_schedule, 0.8,
                            lambda step: 0.9 - 0.4 * 0.5 ** step, 1e-3, 0.1)
        np.testing.assert_allclose(history[1][name], expected[1], rtol=1e-5, atol=1e-6)
    # the constant config value (0.95) gives another second step
    constant = np_adamw(PARAMS["w"], [g["w"] for g in GRADS], lr_schedule, 0.8, 0.95, 1e-3, 0.1)
    assert np.abs(history[1]["w"] - constant[1]).max() > 1e-5
    # a float b2 replaces the config's too
    history = run_steps(make_optimizer(adam_config(), lr_schedule, b2=0.6))
    expected = np_adamw(PARAMS["w"], [g["w"] for g in GRADS], lr_schedule, 0.8, 0.6, 1e-3, 0.1)
    np.testing.assert_allclose(history[1]["w"], expected[1], rtol=1e-5, atol=1e-6)


def test_constant_rate_is_accepted():
    history = run_steps(make_optimizer(sgd_config(), 0.05))
    expected = np_sgd(PARAMS["w"], [g["w"] for g in GRADS], lambda step: 0.05, 0.9, 0.05)
    np.testing.assert_allclose(history[1]["w"], expected[1], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- schedules


def expected_warmup_cosine(step, base_lr, total, warmup, factor):
    if step < warmup:
        return base_lr * (factor + (1 - factor) * step / warmup)
    t = min(step - warmup, total - warmup) / (total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup, factor", [(4, 0.01), (3, 0.2)])
def test_warmup_cosine_matches_the_formula(warmup, factor):
    total, base_lr = 12, 0.4
    schedule = warmup_cosine(base_lr, total, warmup, factor)
    steps = range(total + 3)
    np.testing.assert_allclose([float(schedule(s)) for s in steps],
                               [expected_warmup_cosine(s, base_lr, total, warmup, factor) for s in steps],
                               rtol=1e-5, atol=1e-7)
    assert abs(float(schedule(0)) - factor * base_lr) < 1e-7
    assert abs(float(schedule(warmup)) - base_lr) < 1e-6
    assert abs(float(schedule(total))) < 1e-7


def test_warmup_cosine_without_warmup_is_a_cosine():
    schedule = warmup_cosine(0.2, 10, 0)
    np.testing.assert_allclose([float(schedule(s)) for s in range(12)],
                               [0.1 * (1 + math.cos(math.pi * min(s, 10) / 10)) for s in range(12)],
                               rtol=1e-5, atol=1e-7)


def test_epoch_piecewise_multiplies_each_scale_from_its_epoch_on():
    base_lr, steps_per_epoch = 0.1, 5
    scales = {"2": 0.1, 4: 0.5}  # epochs may come as strings (from YAML keys)
    schedule = epoch_piecewise(base_lr, steps_per_epoch, scales)

    def expected(step):
        rate = base_lr
        for epoch, scale in scales.items():
            if step >= int(epoch) * steps_per_epoch:
                rate *= scale
        return rate

    steps = range(30)
    np.testing.assert_allclose([float(schedule(s)) for s in steps], [expected(s) for s in steps],
                               rtol=1e-6)
    assert float(schedule(9)) == pytest.approx(0.1) and float(schedule(10)) == pytest.approx(0.01)
