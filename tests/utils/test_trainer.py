"""The shared trainer: device-count invariance, exact resume, NaN guard, padded batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.datasets import Split
from models.resnet import ResNet
from sgd_swag import make_loss_fn
from utils.errors import UserError
from utils.logging import read_metrics
from utils.trainer import Trainer, TrainState, epoch_order, make_mesh, masked_mean
from utils.config import CommonConfig
from utils.optim import make_optimizer

MODEL = ResNet(10, depth=8, width=1, pixel_mean=(0.5,), pixel_std=(0.25,))


def make_split(n, seed):
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                 rng.integers(0, 10, n).astype(np.int32))


def eval_fn(state, frozen, batch, key):
    logits = MODEL.apply({"params": state.params}, batch["images"].astype(jnp.float32) / 255)
    return {"acc": (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)}


def make_trainer(run_dir, devices, num_epochs, lr=0.05):
    optimizer = make_optimizer(CommonConfig(optim_momentum=0.9, optim_weight_decay=5e-4), lr)
    trainer = Trainer(run_dir=str(run_dir), optimizer=optimizer, loss_fn=make_loss_fn(MODEL),
                      eval_fn=eval_fn, seed=3, batch_size=16, num_epochs=num_epochs,
                      mesh=make_mesh(devices), select_metric="acc", select_mode="max", log_every=2)
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    return trainer, TrainState.create(params, optimizer)


TRAIN, VAL = make_split(72, 0), make_split(20, 1)  # 72 = 4 full batches + a padded one of 8


def test_one_and_four_devices_agree(tmp_path):
    assert len(jax.devices()) >= 4, "tests/conftest.py simulates 4 CPU devices"
    finals = []
    # At the other tests' learning rate (0.05) these 10 steps amplify rounding ~2000x: one ulp
    # on the initial weights moves the parameters by 2e-4 after 5 steps, and the 4-device
    # program's other summation order does as much when XLA runs it on one core. At 0.01 a
    # rounding difference stays one, so the tolerances below test the sharding, not the chaos.
    for n in (1, 4):
        trainer, state = make_trainer(tmp_path / f"d{n}", jax.devices()[:n], num_epochs=2, lr=0.01)
        finals.append((trainer.fit(state, TRAIN, VAL), read_metrics(trainer.run_dir)))
    (state1, log1), (state4, log4) = finals
    for a, b in zip(log1, log4):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=2e-5)
        np.testing.assert_allclose(a["val/acc"], b["val/acc"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 state1.params, state4.params)


def die_at_call(trainer, step_attribute: str, call: int):
    """Make the trainer's step (`_train_step` or `_stream_step`) raise KeyboardInterrupt at its
    `call`-th call, as a killed run."""
    real_step, calls = getattr(trainer, step_attribute), []

    def dying_step(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_step(*args)

    setattr(trainer, step_attribute, dying_step)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    trainer, state = make_trainer(tmp_path / "full", jax.devices()[:1], num_epochs=3)
    uninterrupted = trainer.fit(state, TRAIN, VAL)

    trainer, state = make_trainer(tmp_path / "killed", jax.devices()[:1], num_epochs=3)
    die_at_call(trainer, "_train_step", 13)  # in the middle of epoch 3 (5 steps per epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(state, TRAIN, VAL)
    trainer.checkpoints.wait()
    trainer, fresh = make_trainer(tmp_path / "killed", jax.devices()[:1], num_epochs=3)
    resumed = trainer.fit(fresh, TRAIN, VAL)  # picks up the epoch-2 checkpoint by itself
    assert int(resumed.step) == int(uninterrupted.step) == 15
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), resumed.params, uninterrupted.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), resumed.opt_state, uninterrupted.opt_state)
    best, val = trainer.selected(fresh)
    assert int(best.step) == 5 * val["epoch"] and "acc" in val


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer, state = make_trainer(tmp_path / "nan", jax.devices()[:1], num_epochs=2)
    good_loss = trainer.loss_fn
    trainer.fit(state, TRAIN, VAL)  # two good epochs, checkpoints at steps 5 and 10
    trainer, state = make_trainer(tmp_path / "nan", jax.devices()[:1], num_epochs=3)
    nan_loss = lambda p, s, f, b, k: (lambda out: (out[0] * jnp.nan, out[1]))(good_loss(p, s, f, b, k))
    trainer.loss_fn = nan_loss
    trainer.__post_init__()
    with pytest.raises(UserError, match=r"non-finite.*\(step 10\) is kept"):
        trainer.fit(state, TRAIN, VAL)
    assert trainer.checkpoints.latest.latest_step() == 10


def test_non_finite_validation_stops_before_that_epochs_checkpoint(tmp_path):
    """A diverged model whose training loss still looks finite (FED at a huge learning rate)
    shows it in validation: the run stops and the last checkpoint is the previous epoch's."""
    trainer, state = make_trainer(tmp_path / "val", jax.devices()[:1], num_epochs=1)
    trainer.fit(state, TRAIN, VAL)  # one good epoch: checkpoint at step 5
    trainer, state = make_trainer(tmp_path / "val", jax.devices()[:1], num_epochs=2)
    trainer.eval_fn = lambda st, fr, b, k: {"acc": eval_fn(st, fr, b, k)["acc"] * jnp.nan}
    trainer.__post_init__()
    with pytest.raises(UserError, match=r"non-finite validation \{'acc': nan\}.*\(step 5\) is kept"):
        trainer.fit(state, TRAIN, VAL)
    assert trainer.checkpoints.latest.latest_step() == 5


def test_exploding_loss_stops_even_across_a_resume(tmp_path):
    """A finite but exploded loss (sgd_swag once kept a "last good" checkpoint at loss 1e18) stops
    the run before that epoch's checkpoint; the scale is the run's first logged loss, kept in the
    checkpoints, so a resumed run judges by the same scale."""
    trainer, state = make_trainer(tmp_path / "boom", jax.devices()[:1], num_epochs=2)
    good_loss = trainer.loss_fn
    trainer.fit(state, TRAIN, VAL)  # checkpoints at steps 5 and 10
    first = trainer.first_loss
    assert 1 < first < 10  # a cross-entropy over 10 classes
    trainer, state = make_trainer(tmp_path / "boom", jax.devices()[:1], num_epochs=3)
    # an offset: the loss explodes, the gradients (and so the parameters) stay as they were
    exploded = lambda *args: (lambda out: (out[0] + 1e5, out[1]))(good_loss(*args))  # noqa: E731
    trainer.loss_fn = exploded
    trainer.__post_init__()
    with pytest.raises(UserError, match=r"training loss exploded to .*first logged: "
                                        rf"{first:.4g}.*\(step 10\) is kept"):
        trainer.fit(state, TRAIN, VAL)
    assert trainer.checkpoints.latest.latest_step() == 10
    trainer.checkpoints.close()
    # the same growth is allowed with the check off
    trainer, state = make_trainer(tmp_path / "boom", jax.devices()[:1], num_epochs=3)
    trainer.loss_fn, trainer.divergence_factor = exploded, 0
    trainer.__post_init__()
    assert int(trainer.fit(state, TRAIN, VAL).step) == 15


def test_unwritable_run_directory_is_one_line(tmp_path, monkeypatch):
    import errno

    trainer, state = make_trainer(tmp_path / "full", jax.devices()[:1], num_epochs=1)

    def full_disk(record):
        raise OSError(errno.ENOSPC, "No space left on device", trainer.logger.path)

    monkeypatch.setattr(trainer.logger, "log", full_disk)
    with pytest.raises(UserError, match=r"cannot write .*metrics.jsonl: No space left on device; the "
                                        r"checkpoints already saved are kept: fix that, then --resume"):
        trainer.fit(state, TRAIN, VAL)


def test_epoch_order_pads_with_mask_and_masked_mean():
    indices, masks = epoch_order(seed=1, epoch=0, num_examples=10, batch_size=4)
    assert indices.shape == masks.shape == (3, 4)
    assert masks.sum() == 10 and not masks[-1, 2:].any()
    assert sorted(indices[masks].tolist()) == list(range(10))
    assert not np.array_equal(indices, epoch_order(seed=1, epoch=1, num_examples=10, batch_size=4)[0])
    assert float(masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False]))) == 2.0


def test_for_run_takes_the_shared_keys_from_the_config(tmp_path):
    from types import SimpleNamespace

    config = SimpleNamespace(seed=7, optim_bs=8, optim_ne=3, log_every=5, keep_checkpoints=1,
                             wandb=False)
    optimizer = make_optimizer(CommonConfig(optim_momentum=0.9, optim_weight_decay=5e-4), 0.05)
    trainer = Trainer.for_run(str(tmp_path / "run"), config, optimizer=optimizer,
                              loss_fn=make_loss_fn(MODEL), eval_fn=eval_fn,
                              mesh=make_mesh(jax.devices()[:1]), select_metric="val_acc",
                              num_epochs=2)  # a field given overrides the config's
    assert (trainer.seed, trainer.batch_size, trainer.num_epochs) == (7, 8, 2)
    assert (trainer.log_every, trainer.keep_checkpoints, trainer.eval_every) == (5, 1, 1)
    assert trainer.select_mode == "max"  # an accuracy is maximised, anything else minimised
    trainer.checkpoints.close()
    nll = Trainer.for_run(str(tmp_path / "nll"), config, optimizer=optimizer,
                          loss_fn=make_loss_fn(MODEL), eval_fn=eval_fn,
                          mesh=make_mesh(jax.devices()[:1]), select_metric="nll")
    assert nll.select_mode == "min" and nll.num_epochs == 3
    nll.checkpoints.close()


def _ynn_convolutions(hlo: str) -> int:
    """How many of a compiled program's YNNPACK fusions hold a convolution."""
    import re

    called = {m.group(1) for line in hlo.splitlines() if '"__ynn_fusion"' in line
              for m in [re.search(r"calls=%?([\w.\-]+)", line)] if m}
    blocks = re.split(r"\n(?=%?[\w.\-]+ \()", hlo)  # one computation a block
    return sum(" convolution(" in block for block in blocks
               if block.lstrip("%").split(" ", 1)[0] in called)


def test_cpu_training_steps_leave_convolutions_to_xla():
    """On the CPU the steps compile with CPU_STEP_OPTIONS (this jaxlib takes them): YNNPACK keeps
    the reductions and dots but not the convolutions, whose weight gradients it runs ~3x slower
    (bench/gendd_cpu_profile.md); xla_defaults=True is XLA's own choice, with them."""
    from utils.trainer import CPU_STEP_OPTIONS, make_train_step, step_compiler_options

    assert step_compiler_options() == CPU_STEP_OPTIONS
    optimizer = make_optimizer(CommonConfig(optim_momentum=0.9), 0.05)
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    state, mesh = TrainState.create(params, optimizer), make_mesh(jax.devices()[:1])
    args = (TRAIN.images[:16], TRAIN.labels[:16], np.arange(16, dtype=np.int32), np.ones(16, bool))
    hlo = {defaults: make_train_step(make_loss_fn(MODEL), optimizer, 0, 0.0, mesh, xla_defaults=defaults)
           .lower(state, None, *args).compile().as_text() for defaults in (False, True)}
    assert _ynn_convolutions(hlo[True]) > 0  # what the option changes: XLA's default
    assert _ynn_convolutions(hlo[False]) == 0
    assert '"__ynn_fusion"' in hlo[False]  # YNNPACK still fuses the reductions


def test_step_flops_count_through_the_compiler_options():
    """xla_flops of a step jitted with compiler options traces it at the top level (make_jaxpr
    would nest the jit, which JAX refuses for jit-level compiler_options)."""
    from utils.cost import xla_flops
    from utils.trainer import make_train_step

    optimizer = make_optimizer(CommonConfig(optim_momentum=0.9), 0.05)
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    state, mesh = TrainState.create(params, optimizer), make_mesh(jax.devices()[:1])
    args = (None, TRAIN.images[:16], TRAIN.labels[:16], np.arange(16, dtype=np.int32), np.ones(16, bool))
    step = make_train_step(make_loss_fn(MODEL), optimizer, 0, 0.0, mesh)
    assert xla_flops(step, state, *args).flops > 0
