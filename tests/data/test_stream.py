"""The streaming input path (data/stream.py through utils/trainer.py): the same batches whatever
the workers, devices and hosts; the same training as the on-device path; exact mid-epoch resume."""
import jax
import numpy as np
import pytest

from data.stream import Stream, epoch_order
from utils.logging import read_metrics
from utils.trainer import to_mesh, make_mesh
from tests.utils.test_trainer import TRAIN, VAL, die_at_call, make_trainer


class ArrayList:
    """A minimal random-access source over in-memory arrays."""

    def __init__(self, split):
        self.images, self.labels, self.channels = split.images, split.labels, split.images.shape[-1]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": int(self.labels[index])}


def assert_same_records(run_a, run_b, rel=0.0):
    """Two runs logged the same metrics, epoch by epoch (timings aside)."""
    a, b = read_metrics(run_a), read_metrics(run_b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not k.startswith("time")} == pytest.approx(
            {k: v for k, v in y.items() if not k.startswith("time")}, rel=rel, abs=0)


def keep(image, rng=None):
    return image


def noisy(image, rng):
    """A transform whose output depends on the example's generator."""
    return (image.astype(np.int32) + rng.integers(0, 64, image.shape)).clip(0, 255).astype(np.uint8)


def stream(split, transform=keep, train=True, **fields):
    return Stream(ArrayList(split), 16, transform, split.images.shape[1:], train, seed=3, **fields)


def collect(batches):
    return [{k: np.asarray(v) for k, v in batch.items()} for batch in batches]


def test_a_training_epoch_reads_the_on_device_order_with_padding():
    indices, masks = epoch_order(3, 1, len(TRAIN), 16)
    batches = collect(stream(TRAIN).batches(epoch=1))
    assert len(batches) == len(indices) == 5
    for batch, index, mask in zip(batches, indices, masks):
        np.testing.assert_array_equal(batch["mask"], mask)
        np.testing.assert_array_equal(batch["augmented_images"][mask], TRAIN.images[index[mask]])
        np.testing.assert_array_equal(batch["labels"][mask], TRAIN.labels[index[mask]])
        assert not batch["augmented_images"][~mask].any()  # padding rows are blank
    later = collect(stream(TRAIN).batches(epoch=1, start=3))  # a resumed iterator
    for a, b in zip(later, batches[3:]):
        np.testing.assert_array_equal(a["augmented_images"], b["augmented_images"])


def test_hosts_read_their_rows_of_the_same_global_batches():
    whole = collect(stream(TRAIN, noisy).batches(epoch=0))
    parts = [collect(stream(TRAIN, noisy, process_index=p, process_count=2).batches(epoch=0))
             for p in range(2)]
    for g, batch in enumerate(whole):
        for name in batch:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][g][name], parts[1][g][name]]), batch[name])
            assert len(parts[0][g][name]) == 8


def test_worker_processes_give_the_same_augmented_batches():
    in_process = collect(stream(TRAIN, noisy).batches(epoch=2))
    workers = collect(stream(TRAIN, noisy, num_workers=2).batches(epoch=2))
    assert len(workers) == len(in_process)
    for a, b in zip(workers, in_process):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    other_epoch = collect(stream(TRAIN, noisy).batches(epoch=3))
    assert not np.array_equal(other_epoch[0]["augmented_images"], in_process[0]["augmented_images"])


def test_a_host_batch_lands_on_one_or_two_devices_as_the_same_global_batch():
    host_batch = collect(stream(TRAIN, noisy).batches(epoch=0))[0]
    for n in (1, 2):
        on_mesh = to_mesh(host_batch, make_mesh(jax.devices()[:n]))
        assert len(on_mesh["labels"].sharding.device_set) == n
        for name in host_batch:
            np.testing.assert_array_equal(np.asarray(on_mesh[name]), host_batch[name])


def test_streaming_trains_exactly_as_the_on_device_path(tmp_path):
    """The same order and no augmentation: the two paths take the same steps (to float rounding:
    a gather inside the step and a batch handed to it compile to different programs)."""
    trainer, state = make_trainer(tmp_path / "device", jax.devices()[:2], num_epochs=2)
    on_device = trainer.fit(state, TRAIN, VAL)
    trainer, state = make_trainer(tmp_path / "stream", jax.devices()[:2], num_epochs=2)
    streamed = trainer.fit(state, stream(TRAIN), stream(VAL, train=False))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 streamed.params, on_device.params)
    assert_same_records(tmp_path / "device", tmp_path / "stream", rel=1e-5)


def test_a_run_killed_mid_epoch_resumes_at_the_next_batch(tmp_path):
    train = stream(TRAIN, noisy)
    trainer, state = make_trainer(tmp_path / "full", jax.devices()[:1], num_epochs=2)
    uninterrupted = trainer.fit(state, train, VAL)

    trainer, state = make_trainer(tmp_path / "killed", jax.devices()[:1], num_epochs=2)
    trainer.checkpoint_every = 3
    die_at_call(trainer, "_stream_step", 8)  # epoch 2, batch 3: the last checkpoint is step 6
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(state, train, VAL)
    trainer.checkpoints.wait()
    assert trainer.checkpoints.latest.latest_step() == 6
    trainer, fresh = make_trainer(tmp_path / "killed", jax.devices()[:1], num_epochs=2)
    resumed = trainer.fit(fresh, train, VAL)
    assert int(resumed.step) == int(uninterrupted.step) == 10
    jax.tree.map(np.testing.assert_array_equal, resumed.params, uninterrupted.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, uninterrupted.opt_state)
    # The resumed epoch's training means include the steps before the kill.
    assert_same_records(tmp_path / "full", tmp_path / "killed")
