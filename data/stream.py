"""The streaming input path: data sets that do not fit on a device, read through grain.

Small sets (Fashion-MNIST, CIFAR) sit on every device as uint8 and each step gathers its rows
inside the jitted step (utils/trainer.py). Large ones (ImageNet, the long-tailed lists, CC3M,
TFDS by name) stream instead:

    source (data/sources.py: TFDS, JPEG folder, list file, unlabeled)   random access by index
      -> grain MapDataset over this host's rows of every global batch
      -> load + decode + augment per example in grain worker processes (data/image_ops.py)
      -> batch -> (trainer) prefetched onto the devices as the global batch's local shard

Why grain (and not tf.data): it needs no TensorFlow, reads any Python random-access source
(TFDS's array_record sets through `tfds.data_source`, and plain folders), runs the per-example
work in worker processes with deterministic output order, and installs as one small wheel.

The order of a training epoch is `epoch_order(seed, epoch, N, B)`, the same permutation the
on-device path uses, and every example's augmentation draws from a NumPy generator seeded by
(seed, epoch, its position in the epoch). So a batch is a pure function of (seed, epoch, step):
 - the position of the iterator is two integers (epoch, batch), saved with the train state; a
   resumed run starts its MapDataset at that batch and sees exactly the batches an uninterrupted
   one would;
 - the global batch does not depend on the number of worker processes, devices or hosts: host p
   of P reads rows [p B/P, (p+1) B/P) of each global batch and nothing else.
Batch mixing with soft labels (mixup, cutmix, label smoothing: `Mixing`) runs in the workers
too, on each host's rows with one generator per global batch (seeded by (seed, epoch, step)), as
timm's Mixup runs on each process's rows; with several hosts the partners are the host's rows,
so that part of a batch depends on the number of hosts (nothing else does).

A batch is {"augmented_images" (training) or "images" (evaluation): uint8 [b, S, S, C],
"labels": int32 [b] (-1: unlabeled), "mask": bool [b], and with Mixing "soft_labels": float32
[b, C]} for this host's b rows; the last batch of an epoch is padded with masked rows (as on the
device path).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

import numpy as np


def epoch_order(seed: int, epoch: int, num_examples: int, batch_size: int):
    """Shuffled indices padded to whole batches, and the mask of real rows: [S, B] each."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return _padded_batches(order, batch_size)


def sequential_order(num_examples: int, batch_size: int):
    """Indices 0..N-1 in order, padded to whole batches, and the mask of real rows: [S, B]."""
    return _padded_batches(np.arange(num_examples), batch_size)


def _padded_batches(order, batch_size: int):
    num_examples = len(order)
    num_batches = math.ceil(num_examples / batch_size)
    padded = np.zeros(num_batches * batch_size, np.int32)
    padded[:num_examples] = order
    mask = np.arange(num_batches * batch_size) < num_examples
    return padded.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Soft labels for a training stream: data.image_ops.mix_batch's options."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5  # cutmix's share when both alphas are > 0
    label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class _MixBatch:
    """A host batch -> mixed images and soft labels (runs in a grain worker)."""

    mixing: Mixing
    seed: int
    epoch: int
    batch_size: int  # the global batch: a row's position // this is its step

    def __call__(self, batch: dict) -> dict:
        from data.image_ops import mix_batch

        step = int(batch["positions"][0]) // self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch, step, 1])
        m = self.mixing
        images, soft = mix_batch(rng, batch["images"], batch["labels"], m.num_classes,
                                 mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha,
                                 switch_prob=m.switch_prob, label_smoothing=m.label_smoothing,
                                 mask=batch["mask"])
        return {**batch, "images": images, "soft_labels": soft}


@dataclasses.dataclass(frozen=True)
class _LoadRow:
    """Row r of this host's epoch -> one example (runs in a grain worker; pickled there)."""

    source: Any
    transform: Callable  # training: (image, rng) -> uint8 [S, S, C]; evaluation: (image) -> ...
    train: bool
    indices: np.ndarray  # int32 [rows]: the example of each of this host's rows
    mask: np.ndarray  # bool [rows]
    positions: np.ndarray  # int64 [rows]: each row's position in the epoch's global order
    seed: int
    epoch: int
    output_shape: tuple  # (S, S, C) of a transformed image, for the padding rows

    def __call__(self, row: int) -> dict:
        position = np.int64(self.positions[row])
        if not self.mask[row]:  # padding: nothing to read (label 0, a valid class for mixing)
            return {"images": np.zeros(self.output_shape, np.uint8), "labels": np.int32(0),
                    "mask": np.bool_(False), "positions": position}
        example = self.source[int(self.indices[row])]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, int(self.positions[row])])
            image = self.transform(example["image"], rng)
        else:
            image = self.transform(example["image"])
        return {"images": np.asarray(image, np.uint8), "labels": np.int32(example["label"]),
                "mask": np.bool_(True), "positions": position}


def _ensure_absl_flags_parsed():
    """grain reads absl flags; a program that never ran absl.app gets their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class Stream:
    """One split read through grain, as the trainer and the evaluator consume it.

    `batches(epoch, start)` yields this host's part of every global batch of `epoch` from batch
    `start` on. `train`: shuffled by epoch_order, augmented by `transform(image, rng)`; else read
    in order with `transform(image)`."""

    source: Any  # data/sources.py: __len__, __getitem__ -> {"image", "label"}, labels, channels
    batch_size: int  # the global batch
    transform: Callable
    image_shape: tuple  # (S, S, C) after the transform
    train: bool
    seed: int = 0
    num_workers: int = 0  # grain worker processes; 0: in this process
    process_index: int = 0
    process_count: int = 1
    mixing: Optional[Mixing] = None  # training only: soft labels

    def __post_init__(self):
        if self.batch_size % self.process_count:
            raise ValueError(f"batch {self.batch_size} is not a multiple of {self.process_count} hosts")

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels, np.int32)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self) / self.batch_size)

    @property
    def host_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def order(self, epoch: int):
        """(indices, mask) [S, B] of the epoch's global batches."""
        if self.train:
            return epoch_order(self.seed, epoch, len(self), self.batch_size)
        return sequential_order(len(self), self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """This host's rows of global batches start, start+1, ... of `epoch`, as NumPy dicts."""
        import grain

        indices, mask = self.order(epoch)
        b, p = self.host_batch_size, self.process_index
        positions = np.arange(indices.size, dtype=np.int64).reshape(indices.shape)
        host = (slice(None), slice(p * b, (p + 1) * b))  # this host's columns of each batch
        load = _LoadRow(self.source, self.transform, self.train, indices[host].ravel(),
                        mask[host].ravel(), positions[host].ravel(), self.seed, epoch,
                        tuple(self.image_shape))
        rows = grain.MapDataset.range(start * b, indices.shape[0] * b)
        dataset = rows.map(load).batch(b)
        if self.train and self.mixing is not None:
            dataset = dataset.map(_MixBatch(self.mixing, self.seed, epoch, self.batch_size))
        dataset = dataset.to_iter_dataset()
        if self.num_workers:
            _ensure_absl_flags_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        key = "augmented_images" if self.train else "images"
        for batch in dataset:
            out = {key: batch["images"], "labels": batch["labels"], "mask": batch["mask"]}
            if "soft_labels" in batch:
                out["soft_labels"] = batch["soft_labels"]
            yield out


@dataclasses.dataclass(frozen=True)
class StreamedDataset:
    """A data set that streams: the counterpart of data.datasets.Dataset (same fields), its
    splits Streams."""

    name: str
    num_classes: Optional[int]
    image_shape: tuple
    pixel_mean: tuple
    pixel_std: tuple
    train: Stream
    val: Optional[Stream]
    test: Optional[Stream]
    source: str = ""
