"""MultiSWAG runs trained together (issue #18 item 2): R runs in one compiled step, each equal to
the run of its seed trained alone, exported as R ordinary teacher runs."""
import os

import jax
import numpy as np
import jax.numpy as jnp
import optax
import pytest

import sgd_swag
from jax.sharding import Mesh
from models.swag import find_swag_state, swag
from utils.checkpoints import load_export
from utils.config import parse_config
from utils.teachers import load_teachers
from utils.trainer import (epoch_order, make_mesh, make_runs_train_step, runs_epoch_order,
                           stack_runs, train_step_fn, unstack_runs,
                           TrainState, masked_mean)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory, writers):
    """(data_root, Dataset): generated Fashion-MNIST files of 20 train (2 full batches of 8 and a
    padded one) / 8 val / 8 test images, and the data set the script loads from them."""
    import dataclasses

    from data import datasets

    root = tmp_path_factory.mktemp("multiswag_data")
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (28, 28, 28)), "train_labels": np.arange(28) % 10,
              "test_images": rng.integers(0, 256, (8, 28, 28)), "test_labels": np.arange(8) % 10}
    writers.write_fmnist_dir(root / datasets.FASHION_MNIST_DIRNAME, arrays, gz=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(datasets.DATASETS, "FashionMNIST_x28", dataclasses.replace(
            datasets.DATASETS["FashionMNIST_x28"], num_train=20, num_val=8, num_test=8))
        patch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", [str(root / "no-system-copy")])
        patch.setattr(datasets, "FASHION_MNIST_PAYLOAD_SHA256", {})
        yield str(root), datasets.load_dataset("FashionMNIST_x28", str(root))


def tiny_argv():
    return ["--config", os.path.join(ROOT, "config/teacher/fmnist_frnrelu_sgd_swag.yaml"),
            "--model_depth", "8", "--model_width", "1", "--optim_ne", "2", "--optim_bs", "8",
            "--start_decay_epoch", "1", "--start_swa_epoch", "1", "--seed", "5",
            "--num_swag_samples", "1"]


def tiny_config(**overrides):
    argv = tiny_argv()
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return parse_config(sgd_swag.SwagConfig, argv)


@pytest.fixture(scope="module")
def alone(data):
    """Seeds 5 and 6 trained one after the other with the single-run step the Trainer compiles
    (utils.trainer.train_step_fn; its key from the seed), each on its own epoch_order."""
    dataset, states = data[1], []
    runs = {seed: sgd_swag.build(tiny_config(seed=seed), dataset) for seed in (5, 6)}
    step = jax.jit(train_step_fn(runs[5].loss_fn, runs[5].optimizer, 0.0))
    for seed, run in runs.items():
        state = run.state
        for epoch in range(2):
            indices, masks = epoch_order(seed, epoch, len(dataset.train), 8)
            for index, mask in zip(indices, masks):
                state, _ = step(state, seed, None, dataset.train.images, dataset.train.labels,
                                index, mask)
        states.append(state)
    return states


def one_device_mesh(devices=None):
    return Mesh(np.asarray(jax.devices()[:1]), ("data",))


@pytest.fixture(scope="module")
def together(data, tmp_path_factory):
    """The teacher folder of `sgd_swag.py --num_runs 2` (seeds 5 and 6, 2 epochs, uninterrupted)."""
    import utils.trainer

    folder = str(tmp_path_factory.mktemp("together") / "teachers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils.trainer, "make_mesh", one_device_mesh)
        sgd_swag.main(tiny_argv() + ["--num_runs", "2", "--data_root", data[0], "--save", folder])
    return folder


@pytest.fixture
def steps(monkeypatch):
    """Counts the calls of the runs' step that train_together compiles (one device); set
    `steps.die_at = n` to raise KeyboardInterrupt at the n-th, as a killed job."""
    import utils.trainer

    real_make = utils.trainer.make_runs_train_step

    class Steps(list):
        die_at = None

    calls = Steps()

    def make(*args, **kwargs):
        step = real_make(*args, **kwargs)

        def counted(*step_args):
            calls.append(1)
            if len(calls) == calls.die_at:
                raise KeyboardInterrupt
            return step(*step_args)

        return counted

    monkeypatch.setattr(utils.trainer, "make_mesh", one_device_mesh)
    monkeypatch.setattr(utils.trainer, "make_runs_train_step", make)
    return calls


def test_runs_trained_together_export_the_runs_trained_alone(together, alone):
    """`sgd_swag.py --num_runs 2` (lax.map over the runs in one program on the CPU) through to
    the exported teachers, against the runs trained one by one."""
    run_dirs = sorted(os.path.join(together, d) for d in os.listdir(together) if d.startswith("seed"))
    assert [os.path.basename(d) for d in run_dirs] == ["seed5", "seed6"]
    # The folder's own checkpoints/, best/, metrics.jsonl and config.yaml are not teacher runs.
    assert {"checkpoints", "metrics.jsonl", "config.yaml"} <= set(os.listdir(together))
    teachers = load_teachers(together, data_name="FashionMNIST_x28")
    assert teachers.num_runs == 2 and teachers.model.depth == 8
    assert [s["seed"] for s in teachers.sidecars] == [5, 6]
    assert all(s["num_snapshots"] == 3 and 0 <= s["val"]["acc"] <= 1 for s in teachers.sidecars)
    for run_dir, state in zip(run_dirs, alone):
        exported = load_export(os.path.join(run_dir, "model"))[0]
        swag_state = find_swag_state(state.opt_state)
        assert int(swag_state.num_snapshots) == 3  # epoch 2's 3 steps
        for name in ("mean", "params2"):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         exported[name], getattr(swag_state, name))
    means = [jax.tree.leaves(find_swag_state(state.opt_state).mean)[0] for state in alone]
    assert not np.allclose(means[0], means[1])  # two runs, not one twice


def exports(folder) -> dict:
    """{seed directory: the arrays of its export, flattened}."""
    return {d: jax.tree.leaves(load_export(os.path.join(folder, d, "model"))[0])
            for d in sorted(os.listdir(folder)) if d.startswith("seed")}


@pytest.mark.parametrize("die_at, checkpoint_every, resumed_steps, resumed_from", [
    (4, 0, 3, "from epoch 1 (step 3)"),  # epoch 2's first step: from epoch 1's checkpoint
    (6, 1, 1, "from epoch 1, batch 2 (step 5)"),  # epoch 2's last step: from its second
])
def test_killed_runs_resume_to_the_uninterrupted_exports(data, together, steps, tmp_path, capsys,
                                                         die_at, checkpoint_every, resumed_steps,
                                                         resumed_from):
    """Killed in epoch 2 (3 steps an epoch), then `--resume DIR`: the resumed job trains the
    steps after the last checkpoint alone (an epoch's end, or with --checkpoint_every 1 the
    step before) and exports the runs bit for bit as the uninterrupted job."""
    from utils.logging import read_metrics

    folder = str(tmp_path / "teachers")
    steps.die_at = die_at
    with pytest.raises(SystemExit) as exit_info:
        sgd_swag.main(tiny_argv() + ["--num_runs", "2", "--data_root", data[0], "--save", folder,
                                     "--checkpoint_every", str(checkpoint_every)])
    assert exit_info.value.code == 130
    assert f"python sgd_swag.py --resume {folder}" in capsys.readouterr().err
    assert not any(d.startswith("seed") for d in os.listdir(folder))  # nothing exported yet
    assert [r["epoch"] for r in read_metrics(folder)] == [1]
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:  # logged, killed before its checkpoint
        f.write('{"epoch": 2, "step": 6}\n')

    steps.clear()
    steps.die_at = None
    sgd_swag.main(["--resume", folder])
    assert len(steps) == resumed_steps  # the steps before came from the checkpoint
    assert resumed_from in capsys.readouterr().out
    resumed, uninterrupted = exports(folder), exports(together)
    assert list(resumed) == ["seed5", "seed6"]
    for seed_dir, arrays in uninterrupted.items():
        assert len(arrays) == len(resumed[seed_dir])
        assert all(np.array_equal(a, b) for a, b in zip(arrays, resumed[seed_dir]))
    records = read_metrics(folder)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert {f"seed{s}/train/{k}" for s in (5, 6) for k in ("loss", "nll", "acc")} <= set(record)
        assert record["seed5/train/loss"] != record["seed6/train/loss"]
    assert {"seed5/val/acc", "seed6/val/nll"} <= set(records[1])
    by_epoch = {r["epoch"]: r for r in read_metrics(together)}
    assert records[1]["seed6/train/loss"] == by_epoch[2]["seed6/train/loss"]


def test_resuming_a_finished_folder_changes_nothing(together, steps, tmp_path, capsys):
    import shutil

    folder = str(tmp_path / "teachers")
    shutil.copytree(together, folder)
    files = lambda: {os.path.join(root, name): (open(os.path.join(root, name), "rb").read(),
                                                os.stat(os.path.join(root, name)).st_mtime_ns)
                     for root, _, names in os.walk(folder) for name in names if name != ".lock"}
    before = files()
    sgd_swag.main(["--resume", folder])
    assert "is finished" in capsys.readouterr().out
    assert steps == []  # no step trained
    assert files() == before  # exports, logs, config and checkpoints as they were


def toy_loss(params, model_state, frozen, batch, key):
    """A linear model whose loss also draws from the step key: any mix-up of the runs' keys,
    rows or states shows."""
    x = batch["images"].reshape(len(batch["labels"]), -1).astype(jnp.float32) / 255
    noise = jax.random.normal(key, params["w"].shape)
    logits = x @ (params["w"] + 0.01 * noise)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], 1)[:, 0]
    loss = masked_mean(nll, batch["mask"])
    return loss, (model_state, {"nll": loss})


def test_vmapped_runs_step_equals_single_run_steps(data):
    """The accelerators' path (jax.vmap over the runs), here on a linear model: on the CPU a
    vmapped convolution sums in another order (a ResNet's runs then agree to ~1e-5 absolute)."""
    dataset, mesh, seeds = data[1], make_mesh(jax.devices()[:1]), [5, 6, 7]
    optimizer = optax.chain(optax.sgd(0.1, momentum=0.9), swag(2, rank=2))
    inits = [TrainState.create({"w": jax.random.normal(jax.random.PRNGKey(s), (784, 10)) * 0.01},
                               optimizer) for s in seeds]
    single = jax.jit(train_step_fn(toy_loss, optimizer, 0.0))
    together = make_runs_train_step(toy_loss, optimizer, 0.0, mesh, vectorize=True)
    states, alone = stack_runs(inits), list(inits)
    for epoch in range(2):
        indices, masks = runs_epoch_order(seeds, epoch, len(dataset.train), 8)
        for i in range(len(indices)):
            states, metrics = together(states, np.asarray(seeds, np.int32), None,
                                       dataset.train.images, dataset.train.labels, indices[i], masks[i])
            alone = [single(state, seed, None, dataset.train.images, dataset.train.labels,
                            indices[i, r], masks[i, r])[0] for r, (state, seed) in enumerate(zip(alone, seeds))]
    assert metrics["loss"].shape == (3,)
    for a, b in zip(unstack_runs(states, 3), alone):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_num_runs_is_checked():
    from utils.errors import UserError

    with pytest.raises(UserError, match="num_runs"):
        tiny_config(num_runs=0)
