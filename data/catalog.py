"""The registry of streamed data sets (by `data_name`): sets that do not fit on a device.

    source = open_split("ImageNet_LT", "/data", "train")   # a data.sources source
    spec = get_streamed_spec("ImageNet_LT")                # classes, image size, pixel statistics

The on-device sets (FashionMNIST_x28, CIFAR10_x32, ...) are data/datasets.py's; `is_streamed`
tells the two apart. `open_split` tries each place below in order and opens the first one present;
nothing found raises a one-line UserError that lists every place looked and how to get the data.
A place that is present but wrong (a malformed list file, a flat ImageNet val folder, a TFDS set
stored as tfrecord) raises its own one-line error instead of being passed over. Paths are relative
to `data_root`.

imagenet2012 (1000 classes, 224 px)
  train: 1. TFDS `imagenet2012` split train in `<data_root>/tensorflow_datasets`
         2. the folder `<data_root>/imagenet/train/<wnid>/*.JPEG`
  val:   1. TFDS `imagenet2012` split validation in `<data_root>/tensorflow_datasets`
         2. the folder `<data_root>/imagenet/val/<wnid>/*.JPEG` (labels by train's class folders
            when `imagenet/train` is present, so both splits index classes alike)
ImageNet_LT (1000 classes, 224 px)
  train / val / test: `<data_root>/ImageNet_LT/ImageNet_LT_{train,val,test}.txt`, images under
         `<data_root>/imagenet` (list paths are like `train/n01440764/n01440764_10026.JPEG`)
iNaturalist2018 (8142 classes, 224 px)
  train / val: `<data_root>/iNaturalist18/iNaturalist18_{train,val}.txt`, images under
         `<data_root>/iNaturalist18`
Places_LT (365 classes, 224 px)
  train / val / test: `<data_root>/Places_LT/Places_LT_{train,val,test}.txt`, images under
         `<data_root>/places365`
cc3m (unlabeled, 224 px)
  train: 1. the list `<data_root>/cc3m/train.txt` (relative paths, images under `<data_root>/cc3m`)
         2. every image under the folder `<data_root>/cc3m/`, recursively
         (its runs validate on ImageNet, which the config names separately)
tfds:<name>[/<config>] for cifar10, cifar100, fashion_mnist, svhn_cropped, cifar10_corrupted,
  cifar10_1, stl10 (e.g. `tfds:cifar10`, `tfds:cifar10_corrupted/gaussian_noise_5`)
  train / test (and svhn_cropped's extra, stl10's unlabelled): TFDS `<name>` in
         `<data_root>/tensorflow_datasets`; cifar10_corrupted and cifar10_1 have only test, and
         none has a val split. Native size and channels (28x28x1 Fashion-MNIST, 32x32x3 CIFAR,
         SVHN, CIFAR-10.1, CIFAR-10-C, 96x96x3 STL-10). CIFAR-10-C and CIFAR-10.1 carry CIFAR-10's
         pixel statistics (they are its shifted test sets).
folder:<path> an ImageNet-style folder with `train/` and `val/` class subfolders (`test/` too when
  present); <path> is absolute or relative to data_root; classes from `train/` (else `val/`).

TFDS sets are built once with `tfds build <name> --data_dir <data_root>/tensorflow_datasets
--file_format=array_record` (random access needs array_record; a manual-download set such as
imagenet2012 needs its tar files in `<data_root>/tensorflow_datasets/downloads/manual` first).
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re

from data import sources
from utils.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TFDS_DIRNAME = "tensorflow_datasets"


@dataclasses.dataclass(frozen=True)
class StreamedSpec:
    name: str  # data_name
    num_classes: int | None  # None for unlabeled
    image_size: int  # training / eval side
    channels: int
    pixel_mean: tuple
    pixel_std: tuple
    splits: dict  # split name ("train", "val", "test") -> tuple of places, tried in order
    how_to_get: str  # one sentence for errors; "<data_root>" is replaced by the real one


class _Absent(Exception):
    """A place that does not hold the data (open_split looks on)."""

    def __init__(self, note: str = ""):
        super().__init__(note)
        self.note = note


# ------------------------------------------------------------------------------------ places


@dataclasses.dataclass(frozen=True)
class TfdsAt:
    """A TFDS data set (name with config) and split, built in <data_root>/<data_dir>."""

    name: str
    split: str
    data_dir: str = TFDS_DIRNAME

    def where(self, data_root: str) -> str:
        return f"TFDS {self.name} ({self.split}) in {os.path.join(data_root, self.data_dir)}"

    def open(self, data_root: str, spec: StreamedSpec, channels: int):
        data_dir = os.path.join(data_root, self.data_dir)
        if not tfds_is_built(data_dir, self.name):
            raise _Absent()
        return sources.TfdsSource(self.name, self.split, data_dir, channels=channels)


@dataclasses.dataclass(frozen=True)
class FolderAt:
    """An ImageNet-style folder <data_root>/<path>/<class>/*; classes_from: a folder whose class
    subfolders set the label indices when present (val uses train's)."""

    path: str
    classes_from: str | None = None

    def where(self, data_root: str) -> str:
        return f"the image folder {os.path.join(data_root, self.path)}/<class>/"

    def open(self, data_root: str, spec: StreamedSpec, channels: int):
        root = os.path.join(data_root, self.path)
        if not os.path.isdir(root):
            raise _Absent()
        classes = None
        if self.classes_from and os.path.isdir(os.path.join(data_root, self.classes_from)):
            classes = sources.list_classes(os.path.join(data_root, self.classes_from))
        try:
            source = sources.ImageFolderSource(root, channels=channels, classes=classes)
        except sources.NoImagesError:
            raise _Absent("present, no images") from None
        if spec.num_classes is not None and source.num_classes != spec.num_classes:
            raise UserError(
                f"{root} has {source.num_classes} class folders, expected {spec.num_classes} for {spec.name}"
            )
        return source


@dataclasses.dataclass(frozen=True)
class ListAt:
    """A `path label` list file <data_root>/<list_file>, images under <data_root>/<image_root>."""

    list_file: str
    image_root: str

    def where(self, data_root: str) -> str:
        return f"the list {os.path.join(data_root, self.list_file)}"

    def open(self, data_root: str, spec: StreamedSpec, channels: int):
        list_file = os.path.join(data_root, self.list_file)
        if not os.path.isfile(list_file):
            raise _Absent()
        return sources.ListFileSource(
            list_file, os.path.join(data_root, self.image_root), num_classes=spec.num_classes, channels=channels
        )


@dataclasses.dataclass(frozen=True)
class UnlabeledAt:
    """Unlabeled images: a list file (kind "list", images under its folder) or every image
    under a folder (kind "folder")."""

    path: str
    kind: str  # "list" | "folder"

    def where(self, data_root: str) -> str:
        path = os.path.join(data_root, self.path)
        return f"the list {path}" if self.kind == "list" else f"images under {path}"

    def open(self, data_root: str, spec: StreamedSpec, channels: int):
        path = os.path.join(data_root, self.path)
        present = os.path.isfile(path) if self.kind == "list" else os.path.isdir(path)
        if not present:
            raise _Absent()
        try:
            return sources.UnlabeledSource(path, channels=channels)
        except sources.NoImagesError:
            raise _Absent("present, no images") from None


_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


def tfds_is_built(data_dir: str, name: str) -> bool:
    """Whether `<data_dir>/<name>/<version>/dataset_info.json` exists (a finished build), checked
    without importing tensorflow_datasets."""
    for info in glob.glob(os.path.join(glob.escape(os.path.join(data_dir, name)), "*", "dataset_info.json")):
        if _VERSION_DIR.match(os.path.basename(os.path.dirname(info))):
            return True
    return False


# ---------------------------------------------------------------------------------- registry


def _lists(directory: str, stem: str, image_root: str, splits) -> dict:
    return {s: (ListAt(f"{directory}/{stem}_{s}.txt", image_root),) for s in splits}


def _list_how_to_get(name: str, directory: str, image_root: str, images: str) -> str:
    return (
        f"put the {name} list files in <data_root>/{directory}/ (from the OLTR release, "
        f"https://github.com/zhmiao/OpenLongTailRecognition-OLTR) and {images} under <data_root>/{image_root}/"
    )


STREAMED: dict[str, StreamedSpec] = {
    "imagenet2012": StreamedSpec(
        "imagenet2012", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        {
            "train": (TfdsAt("imagenet2012", "train"), FolderAt("imagenet/train")),
            "val": (TfdsAt("imagenet2012", "validation"), FolderAt("imagenet/val", classes_from="imagenet/train")),
        },
        "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from https://image-net.org) in "
        "<data_root>/tensorflow_datasets/downloads/manual and run `tfds build imagenet2012 --data_dir "
        "<data_root>/tensorflow_datasets --file_format=array_record`, or extract them to "
        "<data_root>/imagenet/{train,val}/<wnid>/ (val sorted into its class folders)",
    ),
    "ImageNet_LT": StreamedSpec(
        "ImageNet_LT", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        _lists("ImageNet_LT", "ImageNet_LT", "imagenet", ("train", "val", "test")),
        _list_how_to_get("ImageNet_LT", "ImageNet_LT", "imagenet",
                         "ImageNet's images (train/<wnid>/ and val/<wnid>/)"),
    ),
    "iNaturalist2018": StreamedSpec(
        "iNaturalist2018", 8142, 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        _lists("iNaturalist18", "iNaturalist18", "iNaturalist18", ("train", "val")),
        _list_how_to_get("iNaturalist 2018", "iNaturalist18", "iNaturalist18",
                         "the iNaturalist 2018 images (train_val2018/, from https://github.com/visipedia/inat_comp)"),
    ),
    "Places_LT": StreamedSpec(
        "Places_LT", 365, 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        _lists("Places_LT", "Places_LT", "places365", ("train", "val", "test")),
        _list_how_to_get("Places_LT", "Places_LT", "places365",
                         "the Places365-Standard images (from http://places2.csail.mit.edu)"),
    ),
    "cc3m": StreamedSpec(
        "cc3m", None, 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        {"train": (UnlabeledAt("cc3m/train.txt", "list"), UnlabeledAt("cc3m", "folder"))},
        "download Conceptual Captions 3M's images (e.g. with img2dataset, output_format files) into "
        "<data_root>/cc3m/, optionally with a list of their relative paths in <data_root>/cc3m/train.txt",
    ),
}

_CIFAR_MEAN, _CIFAR_STD = (0.49, 0.48, 0.44), (0.2, 0.2, 0.2)  # the reference's, as data/datasets.py


@dataclasses.dataclass(frozen=True)
class _TfdsSet:
    num_classes: int
    image_size: int
    channels: int
    pixel_mean: tuple
    pixel_std: tuple
    splits: dict  # project split -> TFDS split


TFDS_SETS: dict[str, _TfdsSet] = {
    "cifar10": _TfdsSet(10, 32, 3, _CIFAR_MEAN, _CIFAR_STD, {"train": "train", "test": "test"}),
    "cifar100": _TfdsSet(100, 32, 3, _CIFAR_MEAN, _CIFAR_STD, {"train": "train", "test": "test"}),
    "fashion_mnist": _TfdsSet(10, 28, 1, (0.286,), (0.353,), {"train": "train", "test": "test"}),
    "svhn_cropped": _TfdsSet(
        10, 32, 3, (0.438, 0.444, 0.473), (0.198, 0.201, 0.197), {"train": "train", "test": "test", "extra": "extra"}
    ),
    "cifar10_corrupted": _TfdsSet(10, 32, 3, _CIFAR_MEAN, _CIFAR_STD, {"test": "test"}),
    "cifar10_1": _TfdsSet(10, 32, 3, _CIFAR_MEAN, _CIFAR_STD, {"test": "test"}),
    "stl10": _TfdsSet(
        10, 96, 3, (0.447, 0.440, 0.407), (0.260, 0.257, 0.271),
        {"train": "train", "test": "test", "unlabelled": "unlabelled"},
    ),
}

TFDS_PREFIX, FOLDER_PREFIX = "tfds:", "folder:"


def is_streamed(data_name: str) -> bool:
    """Whether `data_name` names a streamed set (this module) rather than an on-device one."""
    name = str(data_name)
    return name in STREAMED or name.startswith((TFDS_PREFIX, FOLDER_PREFIX))


def known_names() -> list[str]:
    return sorted(STREAMED) + [TFDS_PREFIX + n for n in sorted(TFDS_SETS)] + [FOLDER_PREFIX + "<path>"]


def get_streamed_spec(data_name: str, data_root=None) -> StreamedSpec:
    """The entry for `data_name`; an unknown name raises with the nearest valid ones.

    data_root: where a relative `folder:<path>` lies (its classes are read from the folder).
    """
    name = str(data_name)
    if name in STREAMED:
        return STREAMED[name]
    if name.startswith(TFDS_PREFIX):
        return _tfds_spec(name)
    if name.startswith(FOLDER_PREFIX):
        return _folder_spec(name, data_root)
    from data import datasets  # the on-device registry, for a clearer message

    if name in datasets.DATASETS:
        raise UserError(
            f"{name} is an on-device data set (data/datasets.py's load_dataset), not a streamed one; "
            f"streamed data sets: {', '.join(known_names())}"
        )
    raise UserError(f"unknown streamed data_name {name!r}: {_hint(name, known_names())}"
                    f"streamed data sets: {', '.join(known_names())}")


def _hint(name: str, names: list[str]) -> str:
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.4)
    return f"did you mean {' or '.join(by_lower[c] for c in close)}? " if close else ""


def _tfds_spec(data_name: str) -> StreamedSpec:
    tfds_name = data_name[len(TFDS_PREFIX):]
    base = tfds_name.split("/")[0].split(":")[0]
    if base not in TFDS_SETS or not tfds_name or tfds_name.endswith("/"):
        raise UserError(
            f"unknown TFDS data_name {data_name!r}: {_hint(base, sorted(TFDS_SETS))}"
            f"streamed TFDS sets: {', '.join(TFDS_PREFIX + n for n in sorted(TFDS_SETS))} "
            f"(with a config as tfds:<name>/<config>)"
        )
    info = TFDS_SETS[base]
    splits = {split: (TfdsAt(tfds_name, tfds_split),) for split, tfds_split in info.splits.items()}
    how = (
        f"run `{sources.tfds_build_command(tfds_name, '<data_root>/' + TFDS_DIRNAME)}` "
        f"(needs tensorflow-datasets, and TensorFlow for the build)"
    )
    return StreamedSpec(data_name, info.num_classes, info.image_size, info.channels,
                        info.pixel_mean, info.pixel_std, splits, how)


def _folder_root(data_name: str, data_root) -> str:
    path = data_name[len(FOLDER_PREFIX):]
    if not path:
        raise UserError(f"{data_name!r} names no folder: use folder:<path> (absolute, or relative to data_root)")
    return os.path.join(os.fspath(data_root), path) if data_root is not None else path


def _folder_spec(data_name: str, data_root) -> StreamedSpec:
    root = _folder_root(data_name, data_root)
    path = data_name[len(FOLDER_PREFIX):]
    classes = None
    for split in ("train", "val"):
        if os.path.isdir(os.path.join(root, split)):
            classes = sources.list_classes(os.path.join(root, split))
            if classes:
                break
    if not classes:
        raise UserError(
            f"image folder {root} not found: looked for class folders in {root}/train/ and {root}/val/; "
            f"make {root}/train/<class>/<image> and {root}/val/<class>/<image>"
        )
    splits = {
        "train": (FolderAt(os.path.join(path, "train")),),
        "val": (FolderAt(os.path.join(path, "val"), classes_from=os.path.join(path, "train")),),
        "test": (FolderAt(os.path.join(path, "test"), classes_from=os.path.join(path, "train")),),
    }
    return StreamedSpec(data_name, len(classes), 224, 3, IMAGENET_MEAN, IMAGENET_STD, splits,
                        f"make {root}/<split>/<class>/<image>")


def open_split(data_name: str, data_root, split: str, *, channels: int | None = None,
               optional: bool = False):
    """The source of `split` ("train", "val", "test", ...) of `data_name` under `data_root`, from
    the first place that holds it (module doc); channels: None for the data set's own.
    `optional`: None (not an error) when the set has no such split or no place holds it."""
    data_root = os.fspath(data_root)
    spec = get_streamed_spec(data_name, data_root)
    places = spec.splits.get(split)
    if not places and optional:
        return None
    if not places:
        have = ", ".join(spec.splits)
        note = " (hold out part of train, or use the on-device set for a val split)" if split == "val" else ""
        if data_name == "imagenet2012" and split == "test":
            note = " (ImageNet's test labels are not public; its val split is the usual test set)"
        raise UserError(f"{data_name} has no {split!r} split: it has {have}{note}")
    looked = []
    for place in places:
        try:
            return place.open(data_root, spec, spec.channels if channels is None else channels)
        except _Absent as absent:
            looked.append(place.where(data_root) + (f" ({absent.note})" if absent.note else ""))
    if optional:
        return None
    how = spec.how_to_get.replace("<data_root>", data_root)
    raise UserError(f"data set {data_name} ({split} split) not found: looked for {', then '.join(looked)}; {how}")
