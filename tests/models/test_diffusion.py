"""Tests for models/diffusion.py against independent float64 numpy / scipy computations.

The 1-D Gaussian target x0 ~ N(MU, S²) has an analytic optimal network:
E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ), Var(x0 | x_t) = s²(1−ᾱ)/(ᾱ s² + 1 − ᾱ),
and its optimal reverse variance σ̃² + coef1²·Var(x0|x_t), which fixes an optimal v per step.
"""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from models import diffusion as D

MU, S = 0.5, 0.3
T = 1000


@pytest.fixture(scope="module")
def betas64():
    return D.cosine_betas(T)


@pytest.fixture(scope="module")
def full(betas64):
    return D.make_diffusion(betas64)


@pytest.fixture(scope="module")
def sampler(betas64):
    return D.respace(np.cumprod(1.0 - betas64), 100)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# ---- reference maths in float64 numpy, written independently of the module ----

def bayes_posterior(betas, x0, x_t, t):
    """q(x_{t−1}|x_t, x0) ∝ q(x_t|x_{t−1}) q(x_{t−1}|x0), t ≥ 1, by the Gaussian product rule."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = ac[t - 1]
    # q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t): as a function of x_{t−1}, precision α_t/β_t
    # and mean x_t/√α_t. q(x_{t−1} | x0) = N(√ᾱ_{t−1} x0, 1 − ᾱ_{t−1}).
    prec = alphas[t] / betas[t] + 1.0 / (1.0 - ac_prev)
    var = 1.0 / prec
    mean = var * (np.sqrt(alphas[t]) / betas[t] * x_t + np.sqrt(ac_prev) / (1.0 - ac_prev) * x0)
    return mean, var


def kl_quadrature(m1, v1, m2, v2):
    """∫ p log(p/q) for p = N(m1, v1), q = N(m2, v2), numerically."""
    s1 = math.sqrt(v1)
    f = lambda x: norm.pdf(x, m1, s1) * (norm.logpdf(x, m1, s1) - norm.logpdf(x, m2, math.sqrt(v2)))
    val, _ = integrate.quad(f, m1 - 30 * s1, m1 + 30 * s1, epsabs=1e-12, epsrel=1e-10, limit=200)
    return val


def exact_eps(alphas_cumprod, x, t):
    ac = alphas_cumprod[t].reshape(t.shape + (1,) * (x.ndim - 1))
    return jnp.sqrt(1 - ac) * (x - jnp.sqrt(ac) * MU) / (ac * S ** 2 + 1 - ac)


def optimal_v(diff):
    """v per step of `diff` such that σ² = σ̃² + coef1²·Var(x0|x_t) (v = 0 at step 0, unused)."""
    ac = _f64(diff.alphas_cumprod)
    var_x0 = S ** 2 * (1 - ac) / (ac * S ** 2 + 1 - ac)
    target = _f64(diff.posterior_variance) + _f64(diff.posterior_mean_coef1) ** 2 * var_x0
    lo, hi = _f64(diff.posterior_log_variance_clipped), _f64(diff.log_betas)
    frac = (np.log(target) - lo) / (hi - lo)
    frac[0] = 0.5
    return 2 * frac - 1


def gaussian_model(full, v_by_orig_t):
    """The exact ε̂ for the Gaussian target, v looked up by the original timestep index."""
    v_table = jnp.asarray(v_by_orig_t, dtype=jnp.float32)

    def model_fn(x, t):
        eps = exact_eps(full.alphas_cumprod, x, t)
        return jnp.concatenate([eps, jnp.broadcast_to(v_table[t][:, None], x.shape)], -1)
    return model_fn


# ---- schedule and respacing ----

def test_cosine_betas(betas64):
    assert betas64.dtype == np.float64 and betas64.shape == (T,)
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 1, 500, 998):
        assert betas64[i] == pytest.approx(1 - abar((i + 1) / T) / abar(i / T), rel=1e-12)
    assert betas64[-1] == 0.999  # the last step is clipped
    assert np.all(betas64 > 0) and np.all(betas64 <= 0.999)


def test_make_diffusion_tables(full, betas64):
    ac = np.cumprod(1 - betas64)
    assert full.num_timesteps == T
    assert all(a.dtype == jnp.float32 for a in full[:-1])
    np.testing.assert_allclose(_f64(full.alphas_cumprod), ac, rtol=1e-6)
    np.testing.assert_allclose(_f64(full.alphas_cumprod_prev), np.append(1, ac[:-1]), rtol=1e-6)
    pv = betas64 * (1 - np.append(1, ac[:-1])) / (1 - ac)
    assert float(full.posterior_variance[0]) == 0.0
    clipped = _f64(full.posterior_log_variance_clipped)
    assert clipped[0] == clipped[1]
    np.testing.assert_allclose(clipped[1:], np.log(pv[1:]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(full.timestep_map), np.arange(T))


def _expected_kept(num_steps):
    # exact rational arithmetic; Python's round() on a Fraction rounds halves to even
    return [round(Fraction(i * (T - 1), num_steps - 1)) for i in range(num_steps)]


@pytest.mark.parametrize("num_steps, second, second_last", [(100, 10, 989), (64, 16, 983)])
def test_respace_indices_and_alphas(betas64, full, num_steps, second, second_last):
    ac = np.cumprod(1 - betas64)
    kept = D.respaced_indices(T, num_steps)
    assert list(kept) == _expected_kept(num_steps)
    assert (kept[0], kept[1], kept[-2], kept[-1]) == (0, second, second_last, T - 1)
    assert len(set(kept)) == num_steps
    for diff in (D.respace(ac, num_steps), D.respace(full, num_steps)):
        assert diff.num_timesteps == num_steps
        np.testing.assert_array_equal(np.asarray(diff.timestep_map), kept)
        # respaced ᾱ equals the original ᾱ at the kept indices
        np.testing.assert_allclose(_f64(diff.alphas_cumprod), ac[kept], rtol=2e-6, atol=1e-12)
        np.testing.assert_allclose(_f64(diff.alphas_cumprod_prev),
                                   np.append(1, ac[kept][:-1]), rtol=2e-6, atol=1e-12)
        np.testing.assert_allclose(_f64(diff.betas),
                                   1 - ac[kept] / np.append(1, ac[kept][:-1]), rtol=2e-6)


def test_respace_edge_cases(betas64, full):
    ac = np.cumprod(1 - betas64)
    ident = D.respace(ac, T)
    np.testing.assert_allclose(_f64(ident.betas), betas64, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ident.timestep_map), np.arange(T))
    # respacing a respaced process still maps to original indices
    twice = D.respace(D.respace(full, 100), 10)
    once = D.respaced_indices(T, 100)
    expected = once[D.respaced_indices(100, 10)]
    np.testing.assert_array_equal(np.asarray(twice.timestep_map), expected)
    np.testing.assert_allclose(_f64(twice.alphas_cumprod), ac[expected], rtol=5e-6)
    assert list(D.respaced_indices(T, 1)) == [0]


# ---- forward process and posterior ----

def test_q_sample_statistics(full):
    ts = jnp.array([0, 100, 500, 900, 999])
    n = 100_000
    x0 = jnp.full((5, n), 0.7)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = _f64(D.q_sample(full, x0, ts, noise))
    ac = _f64(full.alphas_cumprod)[np.asarray(ts)]
    mean, var = xt.mean(1), xt.var(1)
    # tolerance: 5 standard errors
    assert np.all(np.abs(mean - np.sqrt(ac) * 0.7) < 5 * np.sqrt((1 - ac) / n) + 1e-6)
    assert np.all(np.abs(var / (1 - ac) - 1) < 5 * math.sqrt(2 / n))


def test_posterior_matches_bayes(betas64, full, sampler):
    rng = np.random.default_rng(0)
    ts = np.array([1, 2, 10, 99, 500, 998, 999])
    x0 = rng.normal(size=(len(ts), 3))
    xt = rng.normal(size=(len(ts), 3))
    for diff, betas in ((full, betas64), (sampler, None)):
        if betas is None:  # respaced betas, computed independently from float64 ᾱ
            kept_ac = np.cumprod(1 - betas64)[D.respaced_indices(T, 100)]
            betas = 1 - kept_ac / np.append(1, kept_ac[:-1])
        t = np.minimum(ts, diff.num_timesteps - 1)
        mean, var, log_var = D.q_posterior_mean_variance(
            diff, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
        ref_mean, ref_var = bayes_posterior(betas, x0, xt, t[:, None])
        np.testing.assert_allclose(_f64(mean), ref_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_f64(var), np.broadcast_to(ref_var, xt.shape), rtol=1e-4)
        np.testing.assert_allclose(_f64(log_var), np.log(np.broadcast_to(ref_var, xt.shape)),
                                   atol=1e-4)
        # t = 0: q(x_{−1}|x_0, x0) is a point mass at x0 (variance 0, log variance clipped)
        mean0, var0, log_var0 = D.q_posterior_mean_variance(
            diff, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32),
            jnp.zeros(len(ts), jnp.int32))
        np.testing.assert_allclose(_f64(mean0), x0, rtol=1e-5, atol=1e-6)
        assert np.all(_f64(var0) == 0)
        np.testing.assert_allclose(_f64(log_var0), float(diff.posterior_log_variance_clipped[1]))


def test_p_mean_variance(full):
    rng = np.random.default_rng(1)
    t = jnp.array([0, 3, 400, 999])
    x0 = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    xt = D.q_sample(full, x0, t, eps)
    lo = _f64(full.posterior_log_variance_clipped)[np.asarray(t)][:, None]
    hi = np.log(_f64(full.betas))[np.asarray(t)][:, None]
    for v, expected in ((-1.0, lo), (1.0, hi), (0.0, 0.5 * (lo + hi)), (0.5, 0.75 * hi + 0.25 * lo)):
        out = D.p_mean_variance(full, jnp.concatenate([eps, jnp.full_like(eps, v)], -1), xt, t)
        np.testing.assert_allclose(_f64(out["log_variance"]), np.broadcast_to(expected, (4, 2)),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_f64(out["variance"]), np.exp(_f64(out["log_variance"])),
                                   rtol=1e-5)
    # with the true noise, x0 is recovered (t = 999 is ill-conditioned: ᾱ ≈ 2e-9) and the mean
    # is the true posterior mean
    out = D.p_mean_variance(full, jnp.concatenate([eps, jnp.zeros_like(eps)], -1), xt, t)
    np.testing.assert_allclose(_f64(out["pred_x0"])[:3], _f64(x0)[:3], atol=1e-3)
    true_mean, _, _ = D.q_posterior_mean_variance(full, out["pred_x0"], xt, t)
    np.testing.assert_allclose(_f64(out["mean"]), _f64(true_mean), rtol=1e-6)


# ---- likelihood terms ----

@pytest.mark.parametrize("m1, v1, m2, v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0),
                                             (1.0, 1e-3, 1.05, 4e-3), (-2.0, 3.0, 0.5, 0.2)])
def test_normal_kl_against_quadrature(m1, v1, m2, v2):
    got = float(D.normal_kl(jnp.float32(m1), jnp.float32(math.log(v1)),
                            jnp.float32(m2), jnp.float32(math.log(v2))))
    assert got == pytest.approx(kl_quadrature(m1, v1, m2, v2), rel=1e-4, abs=1e-6)


def test_vb_term_matches_quadrature(betas64, full):
    """The t > 0 vb of training_losses is KL(q(x_{t−1}|x_t,x0) ‖ p)/ln 2, KL by quadrature."""
    ts = np.array([1, 7, 250, 800])
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=(4, 1))
    noise = rng.normal(size=(4, 1))
    a, vconst = 0.8, 0.3  # a deliberately imperfect network: ε̂ = a·x_t, v = 0.3

    def model_fn(x, t):
        return jnp.concatenate([a * x, jnp.full_like(x, vconst)], -1)

    out = D.training_losses(full, model_fn, jax.random.key(0), jnp.asarray(x0, jnp.float32),
                            t=jnp.asarray(ts), noise=jnp.asarray(noise, jnp.float32))
    ac = np.cumprod(1 - betas64)
    for i, t in enumerate(ts):
        xt = math.sqrt(ac[t]) * x0[i, 0] + math.sqrt(1 - ac[t]) * noise[i, 0]
        q_mean, q_var = bayes_posterior(betas64, x0[i, 0], xt, t)
        x0_hat = (xt - math.sqrt(1 - ac[t]) * a * xt) / math.sqrt(ac[t])
        p_mean, _ = bayes_posterior(betas64, x0_hat, xt, t)
        f = (vconst + 1) / 2
        p_var = math.exp(f * math.log(betas64[t]) + (1 - f) * math.log(q_var))
        ref = kl_quadrature(q_mean, q_var, p_mean, p_var) / math.log(2)
        assert float(out["vb"][i]) == pytest.approx(ref, rel=2e-3, abs=1e-6)
        assert float(out["mse"][i]) == pytest.approx((noise[i, 0] - a * xt) ** 2, rel=1e-4)


@pytest.mark.parametrize("mean", [-0.5, 0.0, 0.9, 1.3])
@pytest.mark.parametrize("scale", [0.002, 0.05, 0.5, 1.0])
def test_discretized_likelihood_sums_to_one(mean, scale):
    grid = -1.0 + 2.0 * np.arange(256) / 255.0
    logp = D.discretized_gaussian_log_likelihood(
        jnp.asarray(grid, jnp.float32), jnp.float32(mean), jnp.float32(math.log(scale)))
    p = np.exp(_f64(logp))
    assert p.sum() == pytest.approx(1.0, abs=1e-4)
    # interior and edge bins match the exact normal CDF up to the tanh approximation (<2e-4)
    lo = np.where(grid < -0.999, -np.inf, grid - 1 / 255)
    hi = np.where(grid > 0.999, np.inf, grid + 1 / 255)
    exact = norm.cdf(hi, mean, scale) - norm.cdf(lo, mean, scale)
    np.testing.assert_allclose(p, exact, atol=5e-4)


# ---- training loss ----

def test_training_losses_shapes_and_t0(full):
    n = 512
    x0 = MU + S * jax.random.normal(jax.random.key(3), (n, 4))
    model_fn = gaussian_model(full, np.zeros(T))
    out = jax.jit(lambda k: D.training_losses(full, model_fn, k, x0))(jax.random.key(4))
    for name in ("loss", "mse", "vb"):
        assert out[name].shape == (n,) and out[name].dtype == jnp.float32
        assert np.all(np.isfinite(_f64(out[name])))
    t = np.asarray(out["t"])
    assert t.min() >= 0 and t.max() < T and len(np.unique(t)) > 300
    np.testing.assert_allclose(_f64(out["loss"]), _f64(out["mse"]) + _f64(out["vb"]), rtol=1e-6)

    # t = 0 rows: negative discretized log-likelihood of x0, averaged over dims, in bits
    noise = jax.random.normal(jax.random.key(5), x0.shape)
    t0 = jnp.zeros(n, jnp.int32)
    out0 = D.training_losses(full, model_fn, jax.random.key(6), x0, t=t0, noise=noise)
    xt = D.q_sample(full, x0, t0, noise)
    p = D.p_mean_variance(full, model_fn(xt, t0), xt, t0)
    ref = -_f64(D.discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]))
    np.testing.assert_allclose(_f64(out0["vb"]), ref.mean(1) / math.log(2), rtol=1e-5)


def test_training_losses_near_minimal(full):
    """Exact ε̂ gives the minimal mse E[Var(ε|x_t)]; the optimal v gives the minimal vb.

    Both Monte Carlo means have a relative standard error of about √(2/n) = 0.8%.
    """
    n = 32768
    x0 = MU + S * jax.random.normal(jax.random.key(7), (n, 1))
    v_opt = optimal_v(full)
    key = jax.random.key(8)
    ac = _f64(full.alphas_cumprod)

    @jax.jit
    def mean_losses(v_table, eps_scale, t_val):
        def model_fn(x, t):
            out = gaussian_model(full, v_table)(x, t)
            return out.at[:, :1].multiply(eps_scale)
        out = D.training_losses(full, model_fn, key, x0, t=jnp.full((n,), t_val, jnp.int32))
        return out["mse"].mean(), out["vb"].mean()

    for t_val in (1, 10, 300):
        mse, vb = (float(a) for a in mean_losses(v_opt, 1.0, t_val))
        min_mse = ac[t_val] * S ** 2 / (ac[t_val] * S ** 2 + 1 - ac[t_val])
        assert mse == pytest.approx(min_mse, rel=0.04)
        if t_val >= 10:  # at t = 1, ε̂ ≈ 0 and any scaling of it is within Monte Carlo noise
            assert float(mean_losses(v_opt, 0.0, t_val)[0]) > mse
            assert float(mean_losses(v_opt, 1.5, t_val)[0]) > mse
        # at the optimum E[KL] = ½ log(σ²_opt/σ̃²)
        pv = float(full.posterior_variance[t_val])
        c1 = float(full.posterior_mean_coef1[t_val])
        var_x0 = S ** 2 * (1 - ac[t_val]) / (ac[t_val] * S ** 2 + 1 - ac[t_val])
        expected_vb = 0.5 * math.log((pv + c1 ** 2 * var_x0) / pv) / math.log(2)
        assert vb == pytest.approx(expected_vb, rel=0.04)
        for dv in (-0.3, 0.3):
            assert float(mean_losses(v_opt + dv, 1.0, t_val)[1]) > vb


def test_vb_does_not_train_eps(full):
    """Stop-gradient: vb has no gradient through ε̂, mse none through v; all gradients finite."""
    n = 256
    x0 = MU + S * jax.random.normal(jax.random.key(9), (n, 2))

    def losses(params, key):
        a, b = params

        def model_fn(x, t):
            return jnp.concatenate([a * exact_eps(full.alphas_cumprod, x, t),
                                    jnp.full_like(x, b)], -1)
        out = D.training_losses(full, model_fn, key, x0)
        return out["vb"].mean(), out["mse"].mean()

    params = (jnp.float32(0.9), jnp.float32(0.2))
    g_vb, g_mse = jax.jit(jax.jacrev(losses))(params, jax.random.key(10))
    assert float(g_vb[0]) == 0.0 and float(g_vb[1]) != 0.0
    assert float(g_mse[1]) == 0.0 and float(g_mse[0]) != 0.0
    assert all(np.isfinite(float(g)) for g in (*g_vb, *g_mse))


# ---- sampling ----

def linear_gaussian_moments(diff, v_steps):
    """Exact mean/variance of the sampler's output for the Gaussian model, float64 recursion."""
    ac = _f64(diff.alphas_cumprod)
    r, rm1 = _f64(diff.sqrt_recip_alphas_cumprod), _f64(diff.sqrt_recipm1_alphas_cumprod)
    c1, c2 = _f64(diff.posterior_mean_coef1), _f64(diff.posterior_mean_coef2)
    lo, hi = _f64(diff.posterior_log_variance_clipped), _f64(diff.log_betas)
    m, var = 0.0, 1.0
    for j in range(diff.num_timesteps - 1, -1, -1):
        c = math.sqrt(1 - ac[j]) / (ac[j] * S ** 2 + 1 - ac[j])  # ε̂ = c (x − √ᾱ μ)
        scale = c1[j] * (r[j] - rm1[j] * c) + c2[j]
        shift = c1[j] * rm1[j] * c * math.sqrt(ac[j]) * MU
        f = (v_steps[j] + 1) / 2
        noise_var = math.exp(f * hi[j] + (1 - f) * lo[j]) if j > 0 else 0.0
        m, var = scale * m + shift, scale ** 2 * var + noise_var
    return m, math.sqrt(var)


@pytest.mark.parametrize("variance", ["optimal", "posterior"])
def test_sampler_recovers_gaussian(full, sampler, variance):
    n = 20_000
    v_steps = optimal_v(sampler) if variance == "optimal" else -np.ones(sampler.num_timesteps)
    v_by_orig = np.zeros(T)
    v_by_orig[np.asarray(sampler.timestep_map)] = v_steps
    model_fn = gaussian_model(full, v_by_orig)  # uses ᾱ at the ORIGINAL index it receives
    sample = jax.jit(lambda k: D.p_sample_loop(sampler, model_fn, k, (n, 1)))
    x = _f64(sample(jax.random.key(11)))[:, 0]
    assert np.all(np.isfinite(x))
    m_exact, s_exact = linear_gaussian_moments(sampler, v_steps)
    tol_m, tol_s = 5 * S / math.sqrt(n), 5 * S / math.sqrt(2 * n)
    assert abs(x.mean() - m_exact) < tol_m and abs(x.std() - s_exact) < tol_s
    if variance == "optimal":  # the exact reverse conditionals: the target itself (up to the
        # final noiseless step returning E[x0|x_0], which lowers the std by ≈ 7e-5)
        assert m_exact == pytest.approx(MU, abs=1e-4) and s_exact == pytest.approx(S, abs=1e-4)
        assert abs(x.mean() - MU) < tol_m and abs(x.std() - S) < tol_s
    else:  # σ̃² under-disperses slightly, still close
        assert abs(x.mean() - MU) < 0.02 and S * 0.85 < x.std() < S * 1.01


def test_sampler_details(full, sampler):
    model_fn = gaussian_model(full, np.zeros(T))
    x = jnp.linspace(-2, 2, 16)[:, None]
    # no noise at the last step (j = 0), noise elsewhere
    a = D.p_sample(sampler, model_fn, jax.random.key(0), x, 0)
    b = D.p_sample(sampler, model_fn, jax.random.key(1), x, 0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a = D.p_sample(sampler, model_fn, jax.random.key(0), x, 5)
    b = D.p_sample(sampler, model_fn, jax.random.key(1), x, 5)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # temperature 0 is deterministic; same key gives the same samples
    loop = jax.jit(lambda k, temp: D.p_sample_loop(sampler, model_fn, k, (8, 1),
                                                   temperature=temp, x_init=jnp.ones((8, 1))))
    np.testing.assert_array_equal(np.asarray(loop(jax.random.key(0), 0.0)),
                                  np.asarray(loop(jax.random.key(1), 0.0)))
    # the process is a pytree: it can be a traced argument of a jitted sampler
    traced = jax.jit(lambda diff, k: D.p_sample_loop(diff, model_fn, k, (8, 1), temperature=0.0,
                                                      x_init=jnp.ones((8, 1))))
    np.testing.assert_allclose(np.asarray(traced(sampler, jax.random.key(2))),
                               np.asarray(loop(jax.random.key(0), 0.0)), rtol=1e-6)
    # the network receives the original indices, largest first
    seen = []

    def recording_fn(xx, t):
        seen.append(int(t[0]))
        return jnp.zeros(xx.shape[:-1] + (2 * xx.shape[-1],))
    coarse = D.respace(full, 8)
    y = jnp.zeros((2, 1))
    for j in range(coarse.num_timesteps - 1, -1, -1):
        y = D.p_sample(coarse, recording_fn, jax.random.key(j), y, j)
    assert seen == [999, 856, 714, 571, 428, 285, 143, 0]


def test_cfg(sampler):
    wc = jnp.array([[1.0, -2.0, 0.3, 0.5]])
    wu = jnp.array([[0.5, 1.0, -0.7, -0.1]])
    fc = lambda x, t: jnp.concatenate([x, x], -1) * wc + 0.001 * t[:, None]
    fu = lambda x, t: jnp.concatenate([x, x], -1) * wu
    x = jnp.ones((3, 2)) * jnp.array([[0.5], [1.0], [2.0]])
    t = jnp.array([0, 10, 999])
    out = D.cfg_model_fn(fc, fu, 2.0)(x, t)
    oc, ou = fc(x, t), fu(x, t)
    np.testing.assert_allclose(np.asarray(out[:, :2]), np.asarray(ou[:, :2] + 2 * (oc - ou)[:, :2]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[:, 2:]), np.asarray(oc[:, 2:]))

    def doubled(x2, t2):  # rows [:n] conditional, [n:] unconditional
        n = x2.shape[0] // 2
        return jnp.concatenate([fc(x2[:n], t2[:n]), fu(x2[n:], t2[n:])], 0)
    np.testing.assert_allclose(np.asarray(D.cfg_model_fn_doubled(doubled, 2.0)(x, t)),
                               np.asarray(out), rtol=1e-6)
    # p_sample_loop's guidance arguments are the same as a wrapped model
    key = jax.random.key(12)
    a = D.p_sample_loop(sampler, fc, key, (3, 2), model_fn_uncond=fu, guidance_scale=2.0)
    b = D.p_sample_loop(sampler, D.cfg_model_fn(fc, fu, 2.0), key, (3, 2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError):
        D.p_sample_loop(sampler, fc, key, (3, 2), guidance_scale=2.0)


def test_x0_clip_bounds_the_step_and_is_off_by_default(full, sampler):
    xt = jnp.linspace(-3, 3, 8)[:, None]
    t = jnp.full((8,), 999, jnp.int32)
    wild = jnp.concatenate([jnp.full_like(xt, 5.0), jnp.zeros_like(xt)], -1)  # ε̂ far off
    free = D.p_mean_variance(full, wild, xt, t)
    clipped = D.p_mean_variance(full, wild, xt, t, x0_clip=1.0)
    assert float(jnp.abs(free["pred_x0"]).max()) > 100  # the unclipped first step explodes
    np.testing.assert_allclose(clipped["pred_x0"], jnp.clip(free["pred_x0"], -1, 1))
    mean, _, _ = D.q_posterior_mean_variance(full, clipped["pred_x0"], xt, t)
    np.testing.assert_allclose(clipped["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(clipped["variance"], free["variance"])
    # the whole loop: a network that always predicts ε̂ = 5 stays inside the clip box (plus the
    # last step's noise-free mean, a convex mix of x̂0 and x_1 that ends near x̂0)
    model_fn = lambda x, t: jnp.concatenate([jnp.full_like(x, 5.0), jnp.zeros_like(x)], -1)
    loop = lambda clip: D.p_sample_loop(sampler, model_fn, jax.random.key(0), (64, 1), x0_clip=clip)
    assert float(jnp.abs(loop(None)).max()) > 10
    assert float(jnp.abs(loop(1.0)).max()) <= 1.0 + 1e-4
