import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.resnet import ResNet, resnet_spec
from utils.checkpoints import save_export
from utils.errors import UserError
from utils.teachers import (TEACHER_KIND, balanced_runs, draw_members, ensemble_logits,
                            fixed_members, load_teachers, teacher_predictor)

MODEL = ResNet(10, depth=8, width=1, pixel_mean=(0.5,), pixel_std=(0.25,))


def write_runs(folder, num_runs, data_name="FashionMNIST_x28"):
    for r in range(num_runs):
        params = MODEL.init(jax.random.PRNGKey(r), jnp.zeros((1, 28, 28, 1)))["params"]
        params2 = jax.tree.map(lambda p: p ** 2 + 0.01, params)  # std 0.1 everywhere
        save_export(os.path.join(folder, f"seed{r}", "model"), {"mean": params, "params2": params2},
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
