"""Tests of the distillation losses (models/losses.py): KD, the Dirichlet helpers and ProxyEnDD
against NumPy/SciPy, and FED's biased RBF MMD² against explicit loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from models import losses


def _np_log_softmax(z):
    return scipy.special.log_softmax(np.asarray(z, np.float64), axis=-1)


def _logits(seed, shape, scale=2.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------ KD


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_kd_loss_matches_numpy_kl(temperature):
    student, teacher = _logits(0, (4, 5)), _logits(1, (3, 4, 5))
    log_q = _np_log_softmax(student / temperature)
    expected = np.zeros(4)
    for m in range(3):
        log_p = _np_log_softmax(teacher[m] / temperature)
        expected += np.sum(np.exp(log_p) * (log_p - log_q), axis=-1) / 3
    expected *= max(temperature, temperature**2)
    got = losses.kd_loss_per_example(student, teacher, temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.kd_loss(student, teacher, temperature), expected.mean(), rtol=1e-5)
    mask = np.array([True, False, True, True])
    np.testing.assert_allclose(losses.kd_loss(student, teacher, temperature, mask=mask),
                               expected[mask].mean(), rtol=1e-5)


def test_kd_gradient_equals_cross_entropy_to_mean_teacher():
    student, teacher = _logits(2, (6, 7)), _logits(3, (5, 6, 7))
    mean_teacher = np.exp(_np_log_softmax(teacher)).mean(0)

    def cross_entropy(z):
        return -jnp.mean(jnp.sum(mean_teacher * jax.nn.log_softmax(z), -1))

    grad_kd = jax.grad(lambda z: losses.kd_loss(z, teacher))(student)
    grad_ce = jax.grad(cross_entropy)(student)
    np.testing.assert_allclose(grad_kd, grad_ce, rtol=1e-5, atol=1e-7)
    # and in closed form: (softmax(z) − p̄_teacher) / B
    expected = (np.exp(_np_log_softmax(student)) - mean_teacher) / 6
    np.testing.assert_allclose(grad_kd, expected, rtol=1e-4, atol=1e-7)
    # a single-member average would give another gradient: the members really are averaged
    grad_first = jax.grad(lambda z: losses.kd_loss(z, teacher[:1]))(student)
    assert np.abs(np.asarray(grad_first) - np.asarray(grad_kd)).max() > 1e-3


# ----------------------------------------------------------------------------- ProxyEnDD


def _np_proxy_endd(student, teacher, temperature, s_offset, eps):
    """Independent float64 NumPy/SciPy computation of the per-example terms of spec §5."""
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    alpha = np.exp(student / temperature) + s_offset
    alpha0 = alpha.sum(-1)
    num_classes = student.shape[-1]
    log_pi = _np_log_softmax(teacher / temperature)  # [M, B, K]
    pi_bar = np.exp(log_pi).mean(0)
    beta = (num_classes - 1) / (2 * np.sum(pi_bar * (np.log(pi_bar) - log_pi.mean(0)), -1))
    dg = scipy.special.digamma
    recon = -np.sum(pi_bar * (dg(alpha + eps) - dg(alpha0 + eps)[:, None]), -1)
    entropy = (np.sum(scipy.special.gammaln(alpha + eps), -1) - scipy.special.gammaln(alpha0 + eps)
               - np.sum((alpha - 1) * (dg(alpha + eps) - dg(alpha0 + eps)[:, None]), -1))
    return recon, entropy, beta


@pytest.mark.parametrize("temperature,s_offset", [(1.0, 1.0), (2.0, 0.5)])
def test_proxy_endd_terms_match_scipy(temperature, s_offset):
    student, teacher = _logits(4, (5, 6)), _logits(5, (4, 5, 6))
    recon, entropy, beta = _np_proxy_endd(student, teacher, temperature, s_offset, 1e-8)
    terms = losses.proxy_endd_terms(student, teacher, temperature=temperature, s_offset=s_offset)
    np.testing.assert_allclose(terms["recon"], recon, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(terms["entropy"], entropy, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(terms["inv_beta"], 1 / beta, rtol=1e-4, atol=1e-7)
    per_example = losses.proxy_endd_per_example(student, teacher, temperature=temperature,
                                                 s_offset=s_offset)
    np.testing.assert_allclose(per_example, recon - entropy / beta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        losses.proxy_endd_loss(student, teacher, temperature=temperature, s_offset=s_offset),
        np.mean(recon - entropy / beta), rtol=1e-4, atol=1e-4)


def test_dirichlet_entropy_is_the_true_entropy():
    alpha = np.array([[1.5, 2.0, 7.0], [1.0, 1.0, 1.0], [30.0, 0.7, 2.2]])
    expected = [scipy.stats.dirichlet(a).entropy() for a in alpha]
    np.testing.assert_allclose(losses.dirichlet_entropy(jnp.asarray(alpha, jnp.float32), eps=0.0),
                               expected, rtol=1e-4, atol=1e-4)


def test_broadcast_bug_reproduces_the_reference():
    student, teacher = _logits(6, (8, 4)), _logits(7, (5, 8, 4), scale=3.0)
    recon, entropy, beta = _np_proxy_endd(student, teacher, 1.0, 1.0, 1e-8)
    # the reference's expression: [B] entropy divided by [B, 1] beta broadcasts to B×B
    reference = np.mean(recon - entropy / beta[:, None])
    closed_form = recon.mean() - np.mean(1 / beta) * entropy.mean()
    np.testing.assert_allclose(reference, closed_form, rtol=1e-10)
    bug = losses.proxy_endd_loss(student, teacher, broadcast_bug=True)
    np.testing.assert_allclose(bug, closed_form, rtol=1e-4, atol=1e-4)
    fixed = losses.proxy_endd_loss(student, teacher)
    assert abs(float(fixed) - float(bug)) > 1e-3  # the two really differ on this batch


def test_proxy_endd_gradient_is_finite_when_teachers_agree():
    student, teacher = _logits(8, (3, 4)), np.repeat(_logits(9, (1, 3, 4)), 4, axis=0)
    terms = losses.proxy_endd_terms(student, teacher)
    np.testing.assert_allclose(terms["inv_beta"], 0.0, atol=1e-6)  # β = ∞
    grad = jax.grad(lambda z: losses.proxy_endd_loss(z, teacher))(student)
    assert np.all(np.isfinite(grad))


def test_dirichlet_mean_and_samples():
    logits = _logits(10, (3, 4))
    alpha = np.exp(logits.astype(np.float64)) + 1.0
    mean = alpha / alpha.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(losses.dirichlet_mean_log_probs(logits)), mean, rtol=1e-5)
    samples = losses.dirichlet_sample_log_probs(jax.random.PRNGKey(0), logits, 4000)
    assert samples.shape == (4000, 3, 4) and np.all(np.isfinite(samples))
    probs = np.exp(np.asarray(samples, np.float64))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.mean(0), mean, atol=0.02)
    var = mean * (1 - mean) / (alpha.sum(-1, keepdims=True) + 1)  # Dirichlet marginal variance
    np.testing.assert_allclose(probs.var(0), var, rtol=0.2, atol=2e-3)
    # a huge logit neither overflows nor gives -inf
    extreme = losses.dirichlet_sample_log_probs(jax.random.PRNGKey(1), jnp.array([[500.0, 0.0, -500.0]]), 5)
    assert np.all(np.isfinite(extreme)) and np.all(np.asarray(extreme) >= -100.0)


# ------------------------------------------------------------------------------------ MMD


def _np_mmd2_loops(x, y, bandwidths):
    """The biased MMD² (V-statistic) with explicit loops, float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(a, b):
        d2 = np.sum((a - b) ** 2)
        return sum(np.exp(-d2 / (2 * h)) for h in bandwidths)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n)) / n**2
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m)) / m**2
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("bandwidths", [(2.0, 10.0, 20.0, 50.0), (10.0, 15.0, 20.0, 50.0), (0.5,)])
def test_rbf_mmd2_matches_explicit_loops(bandwidths):
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(5), size=(4, 3)).reshape(4, 15).astype(np.float32)
    y = rng.dirichlet(np.ones(5) * 0.3, size=(4, 3)).reshape(4, 15).astype(np.float32)
    got = losses.rbf_mmd2(x, y, bandwidths)
    np.testing.assert_allclose(got, _np_mmd2_loops(x, y, bandwidths), rtol=1e-4, atol=1e-6)
    # unequal set sizes, and a single-bandwidth kernel value by hand
    np.testing.assert_allclose(losses.rbf_mmd2(x, y[:3], bandwidths), _np_mmd2_loops(x, y[:3], bandwidths),
                               rtol=1e-4, atol=1e-6)
    d2 = np.sum((x[0] - y[1]) ** 2)
    np.testing.assert_allclose(losses.rbf_kernel(x[:1], y[1:2], bandwidths)[0, 0],
                               sum(np.exp(-d2 / (2 * h)) for h in bandwidths), rtol=1e-5)
    # V-statistic: identical sets give exactly 0; it is >= 0
    np.testing.assert_allclose(losses.rbf_mmd2(x, x, bandwidths), 0.0, atol=1e-6)
    assert float(got) > 0


def test_mmd_gradient_pulls_samples_together():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 6)) + 1.0, jnp.float32)
    grad = jax.grad(lambda a: losses.rbf_mmd2(a, y, (2.0, 10.0)))(x)
    after = losses.rbf_mmd2(x - 0.5 * grad, y, (2.0, 10.0))
    assert float(after) < float(losses.rbf_mmd2(x, y, (2.0, 10.0)))
