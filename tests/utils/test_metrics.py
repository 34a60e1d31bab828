"""Tests for utils/metrics.py against independent float64 references (loops, scipy, sklearn)."""
import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment, linprog
from scipy.special import rel_entr
from scipy.special import softmax as sp_softmax
from scipy.stats import entropy as sp_entropy
from sklearn.metrics import brier_score_loss, log_loss

from utils import metrics

N, M, K = 40, 5, 7


def _member_logits(seed, n=N, m=M, k=K, scale=2.0):
    return np.random.default_rng(seed).normal(scale=scale, size=(n, m, k))


def _labels(seed, n=N, k=K):
    return np.random.default_rng(seed + 1000).integers(0, k, size=n)


def _probs(seed, n=N, k=K):
    return np.random.default_rng(seed).dirichlet(np.full(k, 0.7), size=n)


# ----------------------------------------------------------------------------- references
def ref_ensemble(z):
    out = np.zeros((z.shape[0], z.shape[2]))
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            e = np.exp(z[i, j] - z[i, j].max())
            out[i] += e / e.sum() / z.shape[1]
    return out


def ref_ece(p, y, num_bins):
    edges = [b / num_bins for b in range(num_bins + 1)]
    conf = p.max(1)
    correct = [float(np.argmax(p[i]) == y[i]) for i in range(len(y))]
    total = 0.0
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        idx = [i for i in range(len(y))
               if (lo < conf[i] <= hi) or (b == 0 and conf[i] <= lo)
               or (b == num_bins - 1 and conf[i] > hi)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            cf = sum(conf[i] for i in idx) / len(idx)
            total += len(idx) / len(y) * abs(acc - cf)
    return total


def ref_w2_exact_lp(x, y):
    """Exact OT between uniform empirical measures of any sizes, by linear programming."""
    n, m = len(x), len(y)
    c = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    a_eq = np.zeros((n + m, n * m))
    for i in range(n):
        a_eq[i, i * m:(i + 1) * m] = 1.0
    for j in range(m):
        a_eq[n + j, j::m] = 1.0
    b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
    # HiGHS's tolerances are absolute: solve with costs of order 1, then scale back
    unit = c.mean() if c.mean() > 0 else 1.0
    res = linprog(c.ravel() / unit, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    assert res.status == 0
    return math.sqrt(max(res.fun * unit, 0.0))


def ref_w2_assignment(x, y):
    c = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    r, col = linear_sum_assignment(c)
    return math.sqrt(c[r, col].mean())


# ----------------------------------------------------------------------------- ensemble / acc / nll
def test_ensemble_probs_matches_loop_and_accepts_jax():
    import jax.numpy as jnp

    z = _member_logits(0)
    ref = ref_ensemble(z)
    np.testing.assert_allclose(metrics.ensemble_probs(z), ref, rtol=1e-12, atol=1e-14)
    got32 = metrics.ensemble_probs(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got32, ref, atol=1e-6)
    assert got32.shape == (N, K)


def test_accuracy_random_and_ties():
    p, y = _probs(1), _labels(1)
    ref = np.mean([np.argmax(p[i]) == y[i] for i in range(N)])
    assert metrics.accuracy(p, y) == pytest.approx(ref, abs=0)
    # ties go to the lowest index
    p_tie = np.array([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45]])
    assert metrics.accuracy(p_tie, np.array([0, 1])) == 1.0
    assert metrics.accuracy(p_tie, np.array([1, 2])) == 0.0


def test_nll_matches_sklearn_and_loop():
    p, y = _probs(2), _labels(2)
    ref = -np.mean([math.log(p[i, y[i]]) for i in range(N)])
    assert metrics.nll(p, y) == pytest.approx(ref, rel=1e-12)
    assert metrics.nll(p, y) == pytest.approx(log_loss(y, p, labels=list(range(K))), rel=1e-9)
    ref_eps = -np.mean([math.log(p[i, y[i]] + 1e-5) for i in range(N)])
    assert metrics.nll(p, y, eps=1e-5) == pytest.approx(ref_eps, rel=1e-12)


def test_nll_zero_and_one_probabilities():
    p = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert metrics.nll(p, np.array([0, 1])) == 0.0
    # true-class probability exactly 0: finite, clipped at float32 tiny
    v = metrics.nll(p, np.array([1, 1]))
    assert np.isfinite(v)
    assert v == pytest.approx(-math.log(np.finfo(np.float32).tiny) / 2, rel=1e-12)
    assert metrics.nll(p, np.array([1, 1]), eps=1e-8) == pytest.approx(-math.log(1e-8) / 2)


# ----------------------------------------------------------------------------- ece
def test_ece_random_matches_loop():
    for seed in range(3):
        p, y = _probs(10 + seed, n=200), _labels(10 + seed, n=200)
        for nb in (15, 4):
            assert metrics.ece(p, y, num_bins=nb) == pytest.approx(ref_ece(p, y, nb), abs=1e-12)


def test_ece_all_correct_confident_is_zero():
    y = np.array([0, 2, 1, 2])
    p = np.eye(3)[y]
    assert metrics.ece(p, y) == 0.0


def test_ece_hand_computed_two_bins():
    # bins (0, .5], (.5, 1]; conf .5 lies on the edge -> first bin; tie [.5, .5] -> class 0
    p = np.array([[0.5, 0.5], [0.8, 0.2], [0.9, 0.1], [0.3, 0.7]])
    y = np.array([0, 0, 1, 1])
    # bin0: one input, acc 1, conf .5 -> .5; bin1: acc 2/3, conf .8 -> 2/15
    expected = 0.25 * 0.5 + 0.75 * (0.8 - 2 / 3)
    assert expected == pytest.approx(0.225)
    assert metrics.ece(p, y, num_bins=2) == pytest.approx(expected, abs=1e-12)


def test_ece_confidence_outside_all_bins():
    # confidence exactly 0 (degenerate all-zero row) goes to the first bin, > 1 to the last
    p = np.array([[0.0, 0.0, 0.0], [1.0 + 1e-9, 0.0, 0.0]])
    y = np.array([0, 0])
    # row 0: correct (argmax 0), conf 0 -> |1 - 0| / 2; row 1: |1 - (1 + 1e-9)| / 2
    assert metrics.ece(p, y, num_bins=15) == pytest.approx(0.5 + 0.5e-9, abs=1e-15)
    assert metrics.ece(p, y, num_bins=15) == pytest.approx(ref_ece(p, y, 15), abs=1e-15)


# ----------------------------------------------------------------------------- brier / entropy
def test_brier_matches_sklearn_and_loop():
    p, y = _probs(3), _labels(3)
    ref = np.mean([sum((p[i, k] - (k == y[i])) ** 2 for k in range(K)) for i in range(N)])
    assert metrics.brier(p, y) == pytest.approx(ref, rel=1e-12)
    sk = brier_score_loss(y, p, labels=list(range(K)), scale_by_half=False)
    assert metrics.brier(p, y) == pytest.approx(sk, rel=1e-10)
    assert metrics.brier(np.eye(K)[y], y) == 0.0
    assert metrics.brier(np.eye(K)[(y + 1) % K], y) == pytest.approx(2.0)


def test_predictive_entropy():
    p = _probs(4)
    np.testing.assert_allclose(metrics.predictive_entropy(p), sp_entropy(p, axis=1), rtol=1e-12)
    pz = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(metrics.predictive_entropy(pz), [0.0, math.log(2), math.log(3)],
                               atol=1e-15)


# ----------------------------------------------------------------------------- fidelity
def test_kl_to_teacher_matches_scipy():
    t, s = _probs(5), _probs(6)
    ref = np.mean([rel_entr(t[i], s[i]).sum() for i in range(N)])
    assert metrics.kl_to_teacher(t, s) == pytest.approx(ref, rel=1e-12)
    assert metrics.kl_to_teacher(t, s) == pytest.approx(np.mean(sp_entropy(t, s, axis=1)),
                                                         rel=1e-12)
    assert metrics.kl_to_teacher(t, t) == pytest.approx(0.0, abs=1e-15)


def test_kl_to_teacher_zeros():
    tiny = np.finfo(np.float32).tiny
    t = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    s = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])  # s = 0 where t > 0 in row 1
    v = metrics.kl_to_teacher(t, s)
    assert np.isfinite(v)
    ref = np.mean([rel_entr(t[i], np.maximum(s[i], tiny)).sum() for i in range(2)])
    assert v == pytest.approx(ref, rel=1e-12)
    # teacher zeros contribute 0 even where the student is 0 too
    assert metrics.kl_to_teacher(t[:1], s[:1]) == pytest.approx(math.log(2), rel=1e-12)


def test_agreement():
    t, s = _probs(7), _probs(8)
    ref = np.mean([np.argmax(t[i]) == np.argmax(s[i]) for i in range(N)])
    assert metrics.agreement(t, s) == ref
    assert metrics.agreement(t, t) == 1.0
    t_tie = np.array([[0.5, 0.5], [0.2, 0.8]])
    assert metrics.agreement(t_tie, np.array([[0.9, 0.1], [0.6, 0.4]])) == 0.5


# ----------------------------------------------------------------------------- diversity
def test_ambiguity_matches_loop():
    z, y = _member_logits(9), _labels(9)
    avg = np.mean([np.mean([-math.log(sp_softmax(z[i, m])[y[i]]) for m in range(M)])
                   for i in range(N)])
    ens = np.mean([-math.log(sp_softmax(z[i].mean(0))[y[i]]) for i in range(N)])
    got = metrics.ambiguity(z, y)
    assert got[0] == pytest.approx(avg, rel=1e-10)
    assert got[2] == pytest.approx(ens, rel=1e-10)
    assert got[1] == pytest.approx(avg - ens, rel=1e-8)
    assert got[1] > 0
    # logit averaging, not probability averaging
    prob_avg_nll = metrics.nll(metrics.ensemble_probs(z), y)
    assert abs(got[2] - prob_avg_nll) > 1e-3


def test_ambiguity_extreme_logits_finite():
    z = np.array([[[1000.0, -1000.0], [-1000.0, 1000.0]]])
    avg, amb, ens = metrics.ambiguity(z, np.array([0]))
    assert avg == pytest.approx(1000.0)  # mean of 0 and 2000
    assert ens == pytest.approx(math.log(2))
    assert amb == pytest.approx(1000.0 - math.log(2))


def test_brier_variance_matches_loop():
    p = sp_softmax(_member_logits(11), axis=-1)
    ens_unc = 1 - np.mean([sum(p[i, :, k].mean() ** 2 for k in range(K)) for i in range(N)])
    avg_unc = np.mean([1 - np.mean([sum(p[i, m, k] ** 2 for k in range(K)) for i in range(N)])
                       for m in range(M)])
    var = np.mean([sum(np.var(p[i, :, k]) for k in range(K)) for i in range(N)])
    got = metrics.brier_variance(p)
    np.testing.assert_allclose(got, (avg_unc, var, ens_unc), rtol=1e-10)
    assert got[0] + got[1] == pytest.approx(got[2], rel=1e-12)


def test_mutual_information_matches_scipy():
    p = sp_softmax(_member_logits(12), axis=-1)
    ref = [sp_entropy(p[i].mean(0)) - np.mean([sp_entropy(p[i, m]) for m in range(M)])
           for i in range(N)]
    got = metrics.mutual_information(p)
    assert got.shape == (N,)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-14)
    # one-hot members: disagreeing pair of one-hot members has MI = log 2
    p2 = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    np.testing.assert_allclose(metrics.mutual_information(p2), [math.log(2), 0.0], atol=1e-15)


def test_disagreement_matches_pair_loop():
    p = sp_softmax(_member_logits(13, m=6, k=3), axis=-1)
    ref = []
    for i in range(N):
        top = [int(np.argmax(p[i, m])) for m in range(6)]
        pairs = [(a, b) for a, b in itertools.permutations(range(6), 2)]
        ref.append(np.mean([top[a] != top[b] for a, b in pairs]))
    assert metrics.disagreement(p) == pytest.approx(np.mean(ref), rel=1e-12)
    assert 0 < metrics.disagreement(p) < 1


def test_disagreement_ties_and_hand_case():
    # members' argmax: [0, 0, 1] (the tie [.5, .5] counts as 0) -> 4 of 6 ordered pairs differ
    p = np.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]])
    assert metrics.disagreement(p) == pytest.approx(4 / 6)
    assert metrics.disagreement(np.repeat(p[:, :1], 3, axis=1)) == 0.0


def test_single_member():
    z, y = _member_logits(14, m=1), _labels(14)
    p_m = sp_softmax(z, axis=-1)
    avg, amb, ens = metrics.ambiguity(z, y)
    assert amb == 0.0 and avg == ens
    a, v, e = metrics.brier_variance(p_m)
    assert v == 0.0 and a == pytest.approx(e, abs=1e-15)
    assert np.all(metrics.mutual_information(p_m) == 0.0)
    assert metrics.disagreement(p_m) == 0.0
    assert np.all(metrics.covariance_trace(z) == 0.0)
    s = metrics.summarize(z, y, teacher_member_logits=z)
    assert s["amb"] == 0.0 and s["var"] == 0.0 and s["mi"] == 0.0 and s["disagreement"] == 0.0
    assert s["nll"] == pytest.approx(s["ens_nll"], rel=1e-10)
    assert s["kl_to_teacher"] == pytest.approx(0.0, abs=1e-12)
    assert s["agreement"] == 1.0 and s["w2"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- ood
def test_ood_auroc_matches_pair_count():
    rng = np.random.default_rng(15)
    s_in = np.round(rng.normal(size=30), 1)  # rounding makes ties
    s_out = np.round(rng.normal(0.8, size=25), 1)
    ref = np.mean([1.0 if o > i else 0.5 if o == i else 0.0 for o in s_out for i in s_in])
    assert metrics.ood_auroc(s_in, s_out) == pytest.approx(ref, rel=1e-12)
    assert metrics.ood_auroc([0.0, 0.1], [0.5, 0.9]) == 1.0  # higher = more OOD
    assert metrics.ood_auroc([0.5, 0.9], [0.0, 0.1]) == 0.0


# ----------------------------------------------------------------------------- W2 / covariance
def test_covariance_trace():
    z = _member_logits(16)
    zc = z - z.mean(-1, keepdims=True)
    ref = [np.trace(np.cov(zc[i].T, bias=True)) for i in range(N)]
    np.testing.assert_allclose(metrics.covariance_trace(z), ref, rtol=1e-10)
    ref_raw = [np.trace(np.cov(z[i].T, ddof=1)) for i in range(N)]
    np.testing.assert_allclose(metrics.covariance_trace(z, center=False, ddof=1), ref_raw,
                               rtol=1e-10)


def test_wasserstein2_equal_sizes_exact():
    rng = np.random.default_rng(17)
    n, m, k = 12, 6, 4
    x = rng.normal(size=(n, m, k))
    y = rng.normal(size=(n, m, k)) + rng.normal(size=(n, 1, k))
    got = metrics.wasserstein2_per_input(x, y, center=False)
    ref = [ref_w2_assignment(x[i], y[i]) for i in range(n)]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert metrics.wasserstein2(x, y, center=False) == pytest.approx(np.mean(ref), rel=1e-5)
    # centering: a per-member constant shift of the logits is no difference at all
    shift = x + rng.normal(size=(n, m, 1)) * 5
    np.testing.assert_allclose(metrics.wasserstein2_per_input(x, shift[:, ::-1]), 0.0, atol=1e-6)
    assert metrics.wasserstein2(x, shift, center=False) > 1.0
    xc, yc = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    refc = [ref_w2_assignment(xc[i], yc[i]) for i in range(n)]
    assert metrics.wasserstein2(x, y) == pytest.approx(np.mean(refc), rel=1e-5)


def test_wasserstein2_unequal_sizes_exact_and_sinkhorn():
    rng = np.random.default_rng(18)
    n, k = 6, 3
    x = rng.normal(size=(n, 6, k))
    y = rng.normal(size=(n, 4, k)) + 0.5
    ref = [ref_w2_exact_lp(x[i], y[i]) for i in range(n)]
    # lcm(6, 4) = 12: replicated Hungarian is exact
    np.testing.assert_allclose(metrics.wasserstein2_per_input(x, y, center=False), ref, rtol=1e-5)
    # forced Sinkhorn fallback: close to the exact value (entropic bias + marginal tolerance)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # must converge
        sk = metrics.wasserstein2_per_input(x, y, center=False, exact_max_points=1)
    np.testing.assert_allclose(sk, ref, rtol=3e-4)


def test_wasserstein2_chunking_consistent():
    rng = np.random.default_rng(19)
    x, y = rng.normal(size=(7, 4, 3)), rng.normal(size=(7, 4, 3))
    full = metrics.wasserstein2_per_input(x, y)
    chunked = metrics.wasserstein2_per_input(x, y, chunk_elements=3 * 16)  # chunks of 3, padded
    np.testing.assert_allclose(chunked, full, rtol=1e-12)


# ----------------------------------------------------------------------------- summarize
def test_summarize_matches_individual_metrics():
    z, y = _member_logits(20), _labels(20)
    zt = _member_logits(21, m=3)
    s = metrics.summarize(z, y, teacher_member_logits=zt)
    expected_keys = {"acc", "nll", "ece", "brier", "avg_nll", "amb", "ens_nll", "avg_unc",
                     "var", "ens_unc", "mi", "disagreement", "kl_to_teacher", "agreement", "w2"}
    assert set(s) == expected_keys
    assert all(isinstance(v, float) for v in s.values())
    p_m = sp_softmax(z, axis=-1)
    p = p_m.mean(1)
    pt = sp_softmax(zt, axis=-1).mean(1)
    assert s["acc"] == metrics.accuracy(p, y)
    assert s["nll"] == pytest.approx(log_loss(y, p, labels=list(range(K))), rel=1e-9)
    assert s["ece"] == pytest.approx(ref_ece(p, y, 15), abs=1e-12)
    assert s["brier"] == pytest.approx(metrics.brier(p, y), rel=1e-12)
    np.testing.assert_allclose([s["avg_nll"], s["amb"], s["ens_nll"]], metrics.ambiguity(z, y),
                               rtol=1e-12)
    np.testing.assert_allclose([s["avg_unc"], s["var"], s["ens_unc"]],
                               metrics.brier_variance(p_m), rtol=1e-12)
    assert s["mi"] == pytest.approx(metrics.mutual_information(p_m).mean(), rel=1e-12)
    assert s["disagreement"] == pytest.approx(metrics.disagreement(p_m), rel=1e-12)
    assert s["kl_to_teacher"] == pytest.approx(np.mean(sp_entropy(pt, p, axis=1)), rel=1e-10)
    assert s["agreement"] == metrics.agreement(pt, p)
    zc, ztc = z - z.mean(-1, keepdims=True), zt - zt.mean(-1, keepdims=True)
    ref_w2 = np.mean([ref_w2_exact_lp(ztc[i], zc[i]) for i in range(N)])
    assert s["w2"] == pytest.approx(ref_w2, rel=1e-5)
    # chunked processing gives the same numbers
    s_chunk = metrics.summarize(z, y, teacher_member_logits=zt, chunk_elements=M * K * 7)
    for key in s:
        assert s_chunk[key] == pytest.approx(s[key], rel=1e-12, abs=1e-15), key
    assert "w2" not in metrics.summarize(z, y)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy(_probs(0), np.zeros(N + 1, int))
    with pytest.raises(ValueError, match="labels"):
        metrics.nll(_probs(0), np.full(N, K))
    with pytest.raises(ValueError, match="same shape"):
        metrics.kl_to_teacher(_probs(0), _probs(0, k=K + 1))
    with pytest.raises(ValueError, match="3 dimensions"):
        metrics.ambiguity(_probs(0), _labels(0))


# ----------------------------------------------------------------------------- W2 in float32 far from the origin
def _ref_w2_sets(x, y, center):
    """Float64 reference per input (scipy assignment, or LP for unequal sizes)."""
    if center:
        x, y = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    ref = ref_w2_assignment if x.shape[1] == y.shape[1] else ref_w2_exact_lp
    return np.array([ref(x[i], y[i]) for i in range(len(x))])


@pytest.mark.parametrize("center", [False, True])
def test_wasserstein2_tight_sets_far_from_origin_exact(center):
    # member spread 1e-3 around a random per-input point: the solver works in float32, where
    # ||x||^2 + ||y||^2 - 2 x.y of such points is all cancellation error (W2 came out ~20% high)
    rng = np.random.default_rng(30)
    n, m, k = 16, 8, 10
    base = rng.normal(scale=3.0, size=(n, 1, k))
    x = base + 1e-3 * rng.normal(size=(n, m, k))
    y = base + 1e-3 * rng.normal(size=(n, m, k)) + 2e-4 * rng.normal(size=(n, 1, k))
    ref = _ref_w2_sets(x, y, center)
    got = metrics.wasserstein2_per_input(x, y, center=center)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert metrics.wasserstein2(x, y, center=center) == pytest.approx(ref.mean(), rel=1e-4)
    # unequal sizes, replicated Hungarian (lcm(6, 4) = 12)
    xu, yu = x[:, :6], y[:, :4]
    np.testing.assert_allclose(metrics.wasserstein2_per_input(xu, yu, center=center),
                               _ref_w2_sets(xu, yu, center), rtol=1e-4)


@pytest.mark.parametrize("center", [False, True])
def test_wasserstein2_common_offset_invariant_and_exact(center):
    rng = np.random.default_rng(31)
    n, m, k = 16, 16, 32
    x = 0.3 * rng.normal(size=(n, m, k))
    y = 0.3 * rng.normal(size=(n, m, k)) + 0.1 * rng.normal(size=(n, 1, k))
    ref = _ref_w2_sets(x, y, center)
    base = metrics.wasserstein2_per_input(x, y, center=center)
    np.testing.assert_allclose(base, ref, rtol=1e-4)
    # a common offset of 300 on every logit, and one of +-300 per class (not removed by
    # centring), added to every teacher and student member alike
    offsets = [np.full((1, 1, k), 300.0), 300.0 * np.sign(rng.normal(size=(n, 1, k)))]
    for c in offsets:
        got = metrics.wasserstein2_per_input(x + c, y + c, center=center)
        np.testing.assert_allclose(got, ref, rtol=1e-4)
        np.testing.assert_allclose(got, base, rtol=1e-6)  # the plan does not move at all
        assert metrics.wasserstein2(x + c, y + c, center=center) == pytest.approx(
            metrics.wasserstein2(x, y, center=center), rel=1e-6)


def test_wasserstein2_sinkhorn_far_from_origin():
    # the Sinkhorn fallback too: offset 300 and spread 1e-3 give the same (relative) accuracy
    rng = np.random.default_rng(32)
    n, k = 6, 3
    x = rng.normal(size=(n, 6, k))
    y = rng.normal(size=(n, 4, k)) + 0.5
    ref = _ref_w2_sets(x, y, center=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # must converge
        base = metrics.wasserstein2_per_input(x, y, center=False, exact_max_points=1)
        shifted = metrics.wasserstein2_per_input(x + 300.0, y + 300.0, center=False,
                                                 exact_max_points=1)
        p = rng.normal(scale=3.0, size=(n, 1, k))
        tight = metrics.wasserstein2_per_input(p + 1e-3 * x, p + 1e-3 * y, center=False,
                                               exact_max_points=1)
    np.testing.assert_allclose(base, ref, rtol=3e-4)
    np.testing.assert_allclose(shifted, ref, rtol=3e-4)
    np.testing.assert_allclose(shifted, base, rtol=1e-6)
    np.testing.assert_allclose(tight, 1e-3 * ref, rtol=3e-4)


def test_top_k_accuracy_counts_the_label_among_the_k_most_probable():
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    labels = np.array([1, 0, 3])  # 2nd of 4, last of 4, last of 4
    assert metrics.top_k_accuracy(probs, labels, 1) == 0.0
    assert metrics.top_k_accuracy(probs, labels, 2) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(probs, labels, 4) == 1.0


def test_shot_accuracies_average_per_class_accuracy_within_each_group():
    # classes 0, 1: many (200, 150 > 100); 2: medium (50); 3: few (5 < 20)
    counts = np.array([200, 150, 50, 5])
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    predicted = np.array([0, 0, 0, 1, 1, 0, 2, 0, 0, 3])  # class accuracies 3/4, 1/2, 1/3, 1
    probs = np.eye(4)[predicted]
    shots = metrics.shot_accuracies(probs, labels, counts, many=100, few=20)
    assert shots == pytest.approx({"many_acc": (0.75 + 0.5) / 2, "medium_acc": 1 / 3, "few_acc": 1.0})
    # a class exactly at a threshold is medium (more than `many`, fewer than `few`)
    edge = metrics.shot_accuracies(probs, labels, np.array([100, 150, 20, 5]), many=100, few=20)
    assert edge["many_acc"] == 0.5 and edge["medium_acc"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert metrics.shot_accuracies(probs[:4], labels[:4], counts)["few_acc"] is None


def test_summarize_eps_is_the_references_log_of_p_plus_eps():
    """eps 0: exact log-softmax NLLs; eps > 0: -log(p_y + eps) in nll, avg_nll and ens_nll, as
    the EDFM reference's offline evaluation (1e-5) computes them."""
    z, y = _member_logits(0) * 8, _labels(1)  # sharp members: some p_y near 0, where eps matters
    exact, with_eps = metrics.summarize(z, y), metrics.summarize(z, y, eps=1e-5)
    p_m = sp_softmax(z, axis=-1)
    rows = np.arange(len(y))
    avg = -np.log(p_m[rows, :, y] + 1e-5).mean()
    ens = -np.log(sp_softmax(z.mean(axis=1), axis=-1)[rows, y] + 1e-5).mean()
    assert with_eps["avg_nll"] == pytest.approx(avg, rel=1e-9)
    assert with_eps["amb"] == pytest.approx(avg - ens, rel=1e-9)
    assert with_eps["nll"] == pytest.approx(-np.log(p_m.mean(axis=1)[rows, y] + 1e-5).mean(), rel=1e-9)
    assert with_eps["avg_nll"] < exact["avg_nll"]  # eps bounds each member's loss
