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


def test_runs_trained_together_export_the_runs_trained_alone(data, alone, tmp_path, monkeypatch):
    """`sgd_swag.py --num_runs 2` (lax.map over the runs in one program on the CPU) through to
    the exported teachers, against the runs trained one by one."""
    import utils.trainer

    monkeypatch.setattr(utils.trainer, "make_mesh", lambda devices=None: Mesh(
        np.asarray(jax.devices()[:1]), ("data",)))
    folder = str(tmp_path / "teachers")
    sgd_swag.main(tiny_argv() + ["--num_runs", "2", "--data_root", data[0], "--save", folder])
    run_dirs = sorted(os.path.join(folder, d) for d in os.listdir(folder) if d.startswith("seed"))
    assert [os.path.basename(d) for d in run_dirs] == ["seed5", "seed6"]
    teachers = load_teachers(str(tmp_path / "teachers"), data_name="FashionMNIST_x28")
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
