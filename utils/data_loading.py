"""The config's data set: on the devices (data/datasets.py) or streamed (data/stream.py).

    dataset = load_data(config)  # .train .val .test (Splits or Streams), .num_classes, .image_shape

`input_pipeline: auto` keeps the small registry sets (Fashion-MNIST, CIFAR) on the devices and
streams the catalog's (ImageNet, the long-tailed lists, CC3M, `tfds:<name>`, `folder:<path>`);
`stream` also streams a small set (its arrays as the source), which is how the streaming path is
tested against the on-device one.
"""
import dataclasses

import jax
import numpy as np

from data import catalog, datasets
from data.stream import Mixing, Stream, StreamedDataset
from utils.errors import UserError


def pipeline_of(config) -> str:
    """"device" or "stream": the config's input_pipeline, with auto resolved."""
    if config.input_pipeline != "auto":
        return config.input_pipeline
    return "stream" if catalog.is_streamed(config.data_name) else "device"


def load_data(config):
    """The config's data set; a `num_classes` key, where the config has one, must match it."""
    if pipeline_of(config) == "device":
        if catalog.is_streamed(config.data_name):
            raise UserError(f"{config.data_name} streams (it does not fit on a device): set "
                            f"input_pipeline to stream or auto")
        dataset = with_split_options(config, datasets.load_dataset(
            config.data_name, config.data_root, download=config.download,
            num_train_examples=config.num_train_examples))
    else:
        dataset = streamed_dataset(config)
    expected = getattr(config, "num_classes", None)
    if expected is not None and expected != dataset.num_classes:
        raise UserError(f"num_classes is {expected} but {dataset.name} has {dataset.num_classes} "
                        f"classes")
    return dataset


def with_split_options(config, dataset):
    """The on-device set with its training split long-tailed when long_tail_ratio is set, and
    with the val split moved into it when train_on_val is."""
    if config.long_tail_ratio is not None:
        train = datasets.long_tailed(dataset.train, dataset.num_classes, config.long_tail_ratio)
        dataset = dataclasses.replace(dataset, train=train)
    if getattr(config, "train_on_val", False):
        train, val = dataset.train, dataset.val
        dataset = dataclasses.replace(
            dataset, train=datasets.Split(np.concatenate([train.images, val.images]),
                                          np.concatenate([train.labels, val.labels])),
            val=datasets.Split(val.images[:0], val.labels[:0]))
    return dataset


def shot_groups(config, dataset):
    """(training images per class, many, few) for metrics.shot_accuracies, when the config asks
    for shot_thresholds; else None."""
    if config.shot_thresholds is None:
        return None
    from data.sources import class_counts

    many, few = config.shot_thresholds
    return class_counts(dataset.train, dataset.num_classes), many, few


def _catalog_sources(config):
    """(spec fields, {split: source or None}) of a catalog set; val and test from
    eval_data_name when given; a set without a test split is tested on its val split."""
    if config.num_train_examples is not None or config.long_tail_ratio is not None or config.train_on_val:
        raise UserError("num_train_examples, long_tail_ratio and train_on_val apply to the on-device sets only; a "
                        "streamed set takes a list file (data/sources.py ListFileSource) of the "
                        "images to use")
    spec = catalog.get_streamed_spec(config.data_name, config.data_root)
    eval_name = config.eval_data_name or config.data_name
    eval_spec = catalog.get_streamed_spec(eval_name, config.data_root)
    if eval_spec.num_classes != spec.num_classes and spec.num_classes is not None:
        raise UserError(f"eval_data_name {eval_name} has {eval_spec.num_classes} classes, "
                        f"{config.data_name} {spec.num_classes}")
    splits = {"train": catalog.open_split(config.data_name, config.data_root, "train")}
    for split in ("val", "test"):
        splits[split] = catalog.open_split(eval_name, config.data_root, split, optional=True)
    if splits["test"] is None and splits["val"] is not None:
        print(f"note: no test split of {eval_name} found; its val split is the test set")
        splits["test"] = splits["val"]
    num_classes = spec.num_classes if spec.num_classes is not None else eval_spec.num_classes
    return (num_classes, spec.image_size, spec.channels, spec.pixel_mean, spec.pixel_std), splits


def _registry_sources(config):
    """A small registry set streamed: its on-device arrays as the sources."""
    from data.sources import ArraySource

    if config.eval_data_name:
        raise UserError("eval_data_name applies to streamed catalog sets only")
    small = with_split_options(config, datasets.load_dataset(
        config.data_name, config.data_root, download=config.download,
        num_train_examples=config.num_train_examples))
    splits = {name: ArraySource(split.images, split.labels, num_classes=small.num_classes,
                                description=f"{small.name} {name} ({small.source})")
              for name, split in (("train", small.train), ("val", small.val), ("test", small.test))
              if len(split)}
    height, _, channels = small.image_shape
    return (small.num_classes, height, channels, small.pixel_mean, small.pixel_std), splits


def streamed_dataset(config) -> StreamedDataset:
    """The config's set as Streams: training crops and flips (and the rest of the stream keys)
    in grain workers, validation on optim_bs batches, the test table on eval_bs batches."""
    from data.image_ops import EvalTransform, TrainTransform

    fields, sources = (_catalog_sources(config) if catalog.is_streamed(config.data_name)
                       else _registry_sources(config))
    num_classes, native_size, channels, mean, std = fields
    size = config.image_size or native_size
    image_shape = (size, size, channels)
    train_transform = TrainTransform(
        size, crop=config.train_crop, scale=tuple(config.rrc_scale),
        pad=getattr(config, "crop_padding", 4), flip=getattr(config, "flip", True),
        randaugment=None if config.rand_augment is None else (int(config.rand_augment[0]),
                                                                config.rand_augment[1]),
        color_jitter=config.color_jitter)
    eval_transform = EvalTransform(size, crop_fraction=config.eval_crop_fraction)
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if config.optim_bs % jax.process_count() or config.eval_bs % jax.process_count():
        raise UserError(f"optim_bs {config.optim_bs} and eval_bs {config.eval_bs} must be multiples "
                        f"of the {jax.process_count()} hosts")

    def stream(split, batch_size, train):
        if sources.get(split) is None:
            return None
        return Stream(sources[split], batch_size, train_transform if train else eval_transform,
                      image_shape, train, seed=config.seed, num_workers=config.data_workers,
                      mixing=mixing_of(config, num_classes) if train else None, **hosts)

    train = stream("train", config.optim_bs, True)
    return StreamedDataset(
        name=config.data_name, num_classes=num_classes, image_shape=image_shape,
        pixel_mean=tuple(mean), pixel_std=tuple(std), train=train,
        val=stream("val", config.optim_bs, False), test=stream("test", config.eval_bs, False),
        source=getattr(sources["train"], "description", ""))


def mixing_of(config, num_classes):
    """The soft-label mixing of a config whose method trains on soft labels (STREAM_SOFT_LABELS)."""
    if not getattr(config, "STREAM_SOFT_LABELS", False):
        return None
    options = dict(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                   label_smoothing=config.label_smoothing)
    if not any(options.values()):
        return None
    if num_classes is None:
        raise UserError("mixup, cutmix and label smoothing need labels; this set has none")
    return Mixing(num_classes, **options)


def check_input_size(model, image_shape, what: str):
    """One line when a network that takes one input size only (the zoo's MobileNetV1 and BEiT:
    their `input_size`) meets images of another."""
    size = getattr(model, "input_size", None)
    if size is not None and tuple(image_shape[:2]) != (size, size):
        raise UserError(f"{what} {getattr(model, 'arch', type(model).__name__)} takes {size}x{size} "
                        f"images, the data are {image_shape[0]}x{image_shape[1]}: set image_size {size} "
                        f"(a streamed set) or choose another network")
