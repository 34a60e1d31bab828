import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.resnet import ResNet, resnet_spec
from models.swag import swag_std
from utils.checkpoints import save_export
from utils.errors import UserError
from utils.teachers import (TEACHER_KIND, balanced_runs, draw_members, ensemble_logits,
                            fixed_members, load_teachers, members_from_runs, teacher_predictor)

MODEL = ResNet(10, depth=8, width=1, pixel_mean=(0.5,), pixel_std=(0.25,))


def run_deviations(run, rank, params):
    """The K = rank deviations [K, ...] that `write_runs` stores for run `run` (NumPy: a JAX draw
    per leaf shape would compile once per shape)."""
    rng = np.random.default_rng(100 + run)
    return jax.tree.map(lambda p: 0.05 * rng.normal(size=(rank, *p.shape)).astype(np.float32), params)


def write_runs(folder, num_runs, data_name="FashionMNIST_x28", rank=0):
    """num_runs exports seed0, seed1, ...; with rank K >= 1 each also holds K deviations."""
    for r in range(num_runs):
        params = MODEL.init(jax.random.PRNGKey(r), jnp.zeros((1, 28, 28, 1)))["params"]
        params2 = jax.tree.map(lambda p: p ** 2 + 0.01, params)  # std 0.1 everywhere
        arrays = {"mean": params, "params2": params2}
        if rank:
            arrays["deviations"] = run_deviations(r, rank, params)
        save_export(os.path.join(folder, f"seed{r}", "model"), arrays,
                    {"kind": TEACHER_KIND, "model": resnet_spec(MODEL), "data_name": data_name,
                     "num_classes": 10, "seed": r})


def test_balanced_runs_cover_every_run_equally():
    for seed in range(20):
        runs = np.asarray(balanced_runs(jax.random.PRNGKey(seed), 12, 4))
        assert np.bincount(runs, minlength=4).tolist() == [3, 3, 3, 3]
    extras = np.zeros(4)
    for seed in range(400):  # 6 members over 4 runs: two runs get a second member, at random
        counts = np.bincount(np.asarray(balanced_runs(jax.random.PRNGKey(seed), 6, 4)), minlength=4)
        assert sorted(counts.tolist()) == [1, 1, 2, 2]
        extras += counts - 1
    np.testing.assert_allclose(extras / 400, 0.5, atol=0.1)
    single = [int(balanced_runs(jax.random.PRNGKey(s), 1, 3)[0]) for s in range(600)]
    np.testing.assert_allclose(np.bincount(single) / 600, 1 / 3, atol=0.06)  # EDFM's per-step run


def test_load_draw_and_forward(tmp_path):
    write_runs(tmp_path, 3)
    teachers = load_teachers(str(tmp_path), data_name="FashionMNIST_x28")
    assert teachers.num_runs == 3
    leaf = jax.tree.leaves(teachers.moments["std"])[0]
    np.testing.assert_allclose(leaf, 0.1, rtol=1e-3)
    members = jax.jit(draw_members, static_argnums=2)(jax.random.PRNGKey(0), teachers.moments, 6)
    assert jax.tree.leaves(members)[0].shape[0] == 6
    images = jax.random.uniform(jax.random.PRNGKey(1), (5, 28, 28, 1))
    sequential = ensemble_logits(teachers.model, members, images, chunk=1)
    vmapped = ensemble_logits(teachers.model, members, images, chunk=None)
    loop = np.stack([teachers.model.apply({"params": jax.tree.map(lambda x: x[m], members)}, images)
                     for m in range(6)])
    np.testing.assert_allclose(sequential, loop, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vmapped, loop, rtol=1e-4, atol=1e-5)
    fixed = fixed_members(jax.random.PRNGKey(0), teachers.moments, 2)
    first = fixed["classifier"]["kernel"]
    assert first.shape[0] == 6
    # run-major: members 0,1 come from run 0, whose mean differs from run 1's
    mean_leaf = teachers.moments["mean"]["classifier"]["kernel"]
    assert np.abs(first[0] - mean_leaf[0]).mean() < np.abs(first[0] - mean_leaf[1]).mean()
    predictor = teacher_predictor(str(tmp_path), samples_per_run=2)
    assert predictor.num_members == 6
    out = predictor.member_logits(predictor.args, images, jax.random.PRNGKey(0))
    assert out.shape == (5, 6, 10)
    # the reference's offline evaluation: member r is run r's SWA mean itself
    means = teacher_predictor(str(tmp_path), samples_per_run=2, mode="swa_means")
    assert means.num_members == 3 and means.name == "Teacher (3 SWA means)"
    out = means.member_logits(means.args, images, jax.random.PRNGKey(0))
    for run in range(3):
        mean_params = jax.tree.map(lambda x: x[run], teachers.moments["mean"])
        np.testing.assert_allclose(out[:, run], teachers.model.apply({"params": mean_params}, images),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="teacher_mode must be one of swag, swa_means"):
        teacher_predictor(str(tmp_path), mode="means")


def test_mismatched_runs_are_named(tmp_path):
    write_runs(tmp_path / "a", 1)
    write_runs(tmp_path / "b", 1, data_name="CIFAR10_x32")
    os.rename(tmp_path / "b" / "seed0", tmp_path / "a" / "seed9")
    with pytest.raises(UserError, match="seed9/model was trained on CIFAR10_x32"):
        load_teachers(str(tmp_path / "a"), data_name="FashionMNIST_x28")
    with pytest.raises(UserError, match="no teacher run"):
        load_teachers(str(tmp_path / "b"))


def test_a_single_batchnorm_network_is_a_one_run_ensemble(tmp_path):
    from utils.checkpoints import save_resnet
    from utils.teachers import sample_teacher_logits

    model = ResNet(10, depth=8, width=1, norm="bn", activation="relu", pixel_mean=(0.5,),
                   pixel_std=(0.25,))
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
    variables = model.init(jax.random.PRNGKey(0), images)
    _, state = model.apply(variables, images, train=True, mutable=["batch_stats"])  # non-trivial stats
    variables = {"params": variables["params"], **state}
    save_resnet(str(tmp_path / "ce" / "model"), model, variables["params"],
                {"batch_stats": state["batch_stats"]}, data_name="FashionMNIST_x28")
    teachers = load_teachers(str(tmp_path / "ce"), data_name="FashionMNIST_x28")
    assert teachers.num_runs == 1
    logits = jax.jit(sample_teacher_logits, static_argnums=(0, 4))(
        teachers.model, teachers.moments, jax.random.PRNGKey(2), images, 3)
    expected = model.apply(variables, images)  # eval mode: the running statistics
    for member in range(3):  # zero deviation: every member is the network itself
        np.testing.assert_allclose(logits[member], expected, rtol=1e-5, atol=1e-5)


def diagonal_members_before_low_rank(key, moments, run_index, scale=1.0):
    """members_from_runs as it was before low-rank SWAG, verbatim: the bit-identity reference."""
    leaves, treedef = jax.tree.flatten(moments["mean"])
    std_leaves = treedef.flatten_up_to(moments["std"])
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    noise = jax.random.normal(key, (run_index.shape[0], sum(sizes)), leaves[0].dtype)
    offsets = np.cumsum([0] + sizes)
    members = []
    for leaf, std, start, stop in zip(leaves, std_leaves, offsets[:-1], offsets[1:]):
        xi = noise[:, start:stop].reshape((run_index.shape[0], *leaf.shape[1:]))
        members.append(leaf[run_index] + scale * std[run_index] * xi)
    return jax.tree.unflatten(treedef, members)


def test_diagonal_folder_loads_and_samples_as_before(tmp_path):
    write_runs(tmp_path, 2)
    moments = load_teachers(str(tmp_path)).moments
    assert set(moments) == {"mean", "std", "model_state"} and moments["model_state"] == {}
    params = [MODEL.init(jax.random.PRNGKey(r), jnp.zeros((1, 28, 28, 1)))["params"] for r in range(2)]
    for got, r0, r1 in zip(jax.tree.leaves(moments["mean"]), *map(jax.tree.leaves, params)):
        np.testing.assert_array_equal(got, np.stack([r0, r1]))
    run_index = jnp.array([1, 0, 1, 1, 0])
    sample, reference = jax.jit(members_from_runs), jax.jit(diagonal_members_before_low_rank)
    for scale in (1.0, 0.7):
        new = sample(jax.random.PRNGKey(3), moments, run_index, scale)
        old = reference(jax.random.PRNGKey(3), moments, run_index, scale)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
            np.testing.assert_array_equal(a, b)


def low_rank_moments():
    """Two runs of a two-leaf tree ({"a": [2], "b": {"c": [1, 2]}}, P = 4) with K = 3 deviations,
    and run 1's flattened std [P] and deviations [K, P]."""
    mean = {"a": np.array([[0.0, 0.0], [1.0, -2.0]]), "b": {"c": np.array([[[0.0, 0.0]], [[0.5, 3.0]]])}}
    variance = {"a": np.array([[1.0, 1.0], [1.0, 0.25]]), "b": {"c": np.array([[[1.0, 1.0]], [[2.25, 0.64]]])}}
    params2 = jax.tree.map(lambda m, v: m ** 2 + v, mean, variance)
    run1_deviations = np.array([[2.0, 1.0, -2.0, 0.0],  # [K, P], in the flattened leaf order
                                [1.0, -2.0, 2.0, 3.0],
                                [-2.0, 2.0, 1.0, 2.0]])
    deviations = {"a": np.stack([np.zeros((3, 2)), run1_deviations[:, :2]]),  # [R, K, 2]
                  "b": {"c": np.stack([np.ones((3, 1, 2)), run1_deviations[:, None, 2:]])}}
    std = swag_std(mean, params2)
    moments = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                           {"mean": mean, "std": std, "deviations": deviations})
    run1_std = np.concatenate([np.ravel(leaf[1]) for leaf in jax.tree.leaves(std)])
    return {**moments, "model_state": {}}, run1_std, run1_deviations


def flatten_members(members):
    return np.concatenate([np.asarray(leaf).reshape(leaf.shape[0], -1)
                           for leaf in jax.tree.leaves(members)], axis=1)


def test_low_rank_members_have_the_swag_covariance():
    moments, std, deviations = low_rank_moments()
    rank, scale, num_members = deviations.shape[0], 0.5, 20000
    # Σ = scale²·(½·diag(std²) + DᵀD/(2(K−1))), D the stored deviations of the member's run.
    expected = scale ** 2 * (np.diag(std ** 2) / 2 + deviations.T @ deviations / (2 * (rank - 1)))
    # Monte-Carlo standard errors of a sample mean and of a sample covariance of Gaussians.
    variances = np.diag(expected)
    mean_error = np.sqrt(variances / num_members)
    covariance_error = np.sqrt((np.outer(variances, variances) + expected ** 2) / num_members)
    # The test has power: the low-rank part couples leaf "a" (0, 1) with leaf "b/c" (2, 3), far
    # beyond the tolerance (with a ξ₂ per leaf these entries would be 0).
    assert np.all(np.abs(expected[:2, 2:]) > 10 * covariance_error[:2, 2:])
    members = jax.jit(members_from_runs)(jax.random.PRNGKey(0), moments,
                                         jnp.ones(num_members, jnp.int32), scale)
    samples = flatten_members(members)
    run1_mean = np.array([1.0, -2.0, 0.5, 3.0])
    assert np.all(np.abs(samples.mean(0) - run1_mean) < 5 * mean_error)
    assert np.all(np.abs(np.cov(samples.T) - expected) < 5 * covariance_error), \
        np.cov(samples.T) - expected


def test_low_rank_members_share_one_xi2_per_member():
    moments, std, deviations = low_rank_moments()
    moments = {**moments, "std": jax.tree.map(jnp.zeros_like, moments["std"])}  # D part only
    members = members_from_runs(jax.random.PRNGKey(1), moments, jnp.array([1, 1, 1]))
    offsets = flatten_members(members) - np.array([1.0, -2.0, 0.5, 3.0])
    # θ − mean = Dᵀξ₂/√(2(K−1)) with one ξ₂ for all leaves: solve it from leaf "a" and
    # the first entry of "b/c", then it must also give the last entry of "b/c".
    xi2 = np.linalg.solve(deviations[:, :3].T, offsets[:, :3].T * np.sqrt(2 * (3 - 1)))
    np.testing.assert_allclose(deviations.T @ xi2 / np.sqrt(4), offsets.T, atol=1e-5)


def test_low_rank_runs_load_stacked_and_sample(tmp_path):
    write_runs(tmp_path, 2, rank=3)
    teachers = load_teachers(str(tmp_path), data_name="FashionMNIST_x28")
    params = [MODEL.init(jax.random.PRNGKey(r), jnp.zeros((1, 28, 28, 1)))["params"] for r in range(2)]
    written = [run_deviations(r, 3, params[r]) for r in range(2)]
    for got, r0, r1 in zip(*map(jax.tree.leaves, (teachers.moments["deviations"], *written))):
        np.testing.assert_array_equal(got, np.stack([r0, r1]))  # [R, K, ...]
    members = jax.jit(draw_members, static_argnums=2)(jax.random.PRNGKey(0), teachers.moments, 4)
    assert jax.tree.leaves(members)[0].shape[0] == 4
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(members))
    predictor = teacher_predictor(str(tmp_path), samples_per_run=2)  # R x S fixed low-rank members
    assert predictor.num_members == 4


@pytest.mark.parametrize("other_rank, kind", [(0, "diagonal SWAG"), (2, "low-rank SWAG with 2")])
def test_runs_of_another_kind_are_named(tmp_path, other_rank, kind):
    write_runs(tmp_path / "a", 1, rank=3)
    write_runs(tmp_path / "b", 1, rank=other_rank)
    os.rename(tmp_path / "b" / "seed0", tmp_path / "a" / "seed9")
    with pytest.raises(UserError, match=f"seed9/model is {kind}") as error:
        load_teachers(str(tmp_path / "a"))
    assert "\n" not in str(error.value) and "seed0/model is low-rank SWAG with 3" in str(error.value)


def test_a_single_deviation_is_refused(tmp_path):
    write_runs(tmp_path, 1, rank=1)
    with pytest.raises(UserError, match="seed0/model has a single SWAG deviation"):
        load_teachers(str(tmp_path))


@pytest.mark.slow  # trains: 15-40 s on one busy CPU core, mostly compilation
def test_sgd_swag_rank_2_exports_a_sampled_low_rank_teacher(fake_fmnist_root, tmp_path):
    import sgd_swag

    run_dir = tmp_path / "teachers" / "seed1"
    sgd_swag.main(["--config", "config/teacher/fmnist_frnrelu_sgd_swag.yaml",
                   "--data_root", fake_fmnist_root, "--model_depth", "8", "--model_width", "1",
                   "--optim_ne", "1", "--optim_bs", "8", "--num_train_examples", "24",
                   "--start_decay_epoch", "0", "--start_swa_epoch", "0", "--rank", "2",
                   "--num_swag_samples", "1", "--save", str(run_dir), "--seed", "1"])
    teachers = load_teachers(str(tmp_path / "teachers"), data_name="FashionMNIST_x28")
    assert teachers.sidecars[0]["num_snapshots"] == 3  # 24 examples / 8: SWAG over 3 steps
    deviations = flatten_members(jax.tree.map(lambda d: d[0], teachers.moments["deviations"]))
    assert deviations.shape[0] == 2 and np.all(np.abs(deviations).max(1) > 0)  # both slots written
    # With the diagonal part off, members − mean lie in the span of the run's two deviations.
    moments = {**teachers.moments, "std": jax.tree.map(np.zeros_like, teachers.moments["std"])}
    members = jax.jit(draw_members, static_argnums=2)(jax.random.PRNGKey(0), moments, 3)
    offsets = flatten_members(members) - flatten_members(teachers.moments["mean"])
    assert np.all(np.abs(offsets).max(1) > 0)
    xi2, *_ = np.linalg.lstsq(deviations.T / np.sqrt(2.0), offsets.T, rcond=None)
    np.testing.assert_allclose(deviations.T @ xi2 / np.sqrt(2.0), offsets.T, atol=1e-6)
