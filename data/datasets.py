"""The data set registry (by `data_name`) and the loader: files -> train / val / test splits.

    ds = load_dataset("CIFAR10_x32", "/data", download=False)
    ds.train.images  # uint8 [40960, 32, 32, 3], C-contiguous
    ds.train.labels  # int32 [40960]

Splits (the reference implementation's): train = the first `num_train` official training
images, val = the remaining `num_val`, test = the official test set. Images stay uint8 here;
the /255 to [0, 1] and the per-channel standardization with `pixel_mean` / `pixel_std` happen
downstream.

Where each data set is looked for, in order:

FashionMNIST_x28
  1. `<data_root>/FashionMNIST/` holding the four IDX files, raw or `.gz`:
     train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte
  2. each directory in `FASHION_MNIST_SYSTEM_DIRS` (the Debian package location
     `/usr/share/datasets/fashion-mnist`, from `apt-get install dataset-fashion-mnist`)
  3. with download=True: `FASHION_MNIST_BASE_URL/<file>.gz` into `<data_root>/FashionMNIST/`,
     each checked against the official MD5 of the .gz (`FASHION_MNIST_GZ_MD5`).
  Whatever the source, the SHA-256 of each decompressed IDX payload is checked against
  `FASHION_MNIST_PAYLOAD_SHA256` (the Debian .gz files differ byte-wise from the official ones,
  the payloads do not), so MNIST digits put in the wrong folder are caught.

CIFAR10_x32 / CIFAR100_x32
  1. the reference layout `<data_root>/<data_name>/{train,test}_{images,labels}.npy`
  2. the official python tarball (`cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`) at
     `<data_root>/` or `<data_root>/<data_name>/`, converted on first use into the layout of 1
     (each .npy written atomically; existing files are never overwritten)
  3. with download=True: `CIFAR_BASE_URL/<tarball>` into `<data_root>/`, checked against
     `CIFAR_TARBALL_MD5`, then converted as in 2.

Nothing found raises a one-line UserError that lists every place looked and how to get the data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import os
import tempfile
import warnings

import numpy as np

from data import download as download_lib
from data import formats
from utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    image_shape: tuple
    pixel_mean: tuple
    pixel_std: tuple
    train: Split
    val: Split
    test: Split
    source: str = ""  # where the files came from, for logs


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    image_shape: tuple  # (H, W, C)
    pixel_mean: tuple
    pixel_std: tuple
    num_train: int
    num_val: int  # num_train + num_val = the official training set
    num_test: int
    source: str  # "fashion_mnist" | "cifar10" | "cifar100"


_CIFAR_MEAN, _CIFAR_STD = (0.49, 0.48, 0.44), (0.2, 0.2, 0.2)

DATASETS: dict[str, DatasetSpec] = {
    "FashionMNIST_x28": DatasetSpec(
        "FashionMNIST_x28", 10, (28, 28, 1), (0.286,), (0.353,), 51200, 8800, 10000, "fashion_mnist"
    ),
    "CIFAR10_x32": DatasetSpec("CIFAR10_x32", 10, (32, 32, 3), _CIFAR_MEAN, _CIFAR_STD, 40960, 9040, 10000, "cifar10"),
    "CIFAR100_x32": DatasetSpec(
        "CIFAR100_x32", 100, (32, 32, 3), _CIFAR_MEAN, _CIFAR_STD, 40960, 9040, 10000, "cifar100"
    ),
}

# --- Fashion-MNIST sources ---------------------------------------------------------------------
FASHION_MNIST_DIRNAME = "FashionMNIST"
FASHION_MNIST_SYSTEM_DIRS = ["/usr/share/datasets/fashion-mnist"]
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # role -> IDX file name without .gz
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_GZ_MD5 = {  # the official .gz downloads
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310",
}
FASHION_MNIST_PAYLOAD_SHA256 = {  # the decompressed IDX files (header included)
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# --- CIFAR sources -----------------------------------------------------------------------------
CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR_TARBALLS = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
CIFAR_TARBALL_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}


def get_spec(data_name: str) -> DatasetSpec:
    """The registry entry for `data_name`; an unknown name raises with the nearest valid ones."""
    if data_name in DATASETS:
        return DATASETS[data_name]
    names = sorted(DATASETS)
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(str(data_name).lower(), list(by_lower), n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(by_lower[c] for c in close)}? " if close else ""
    raise UserError(f"unknown data_name {data_name!r}: {hint}known data sets: {', '.join(names)}")


def load_dataset(
    data_name: str,
    data_root: str,
    *,
    num_train_examples: int | None = None,
    download: bool = False,
) -> Dataset:
    """Load `data_name` from under `data_root` into train / val / test splits (see module doc).

    num_train_examples: keep only the first N training examples (1 <= N <= the train split).
    download: fetch the official files (checksummed) when no local copy is found.
    """
    spec = get_spec(data_name)
    if num_train_examples is not None:
        if isinstance(num_train_examples, bool) or not isinstance(num_train_examples, (int, np.integer)):
            raise UserError(f"num_train_examples must be an integer, got {num_train_examples!r}")
        if not 1 <= num_train_examples <= spec.num_train:
            raise UserError(
                f"num_train_examples={num_train_examples} is out of range for {data_name}: "
                f"it has {spec.num_train} training examples (use 1..{spec.num_train} or null for all)"
            )
    data_root = os.fspath(data_root)
    if spec.source == "fashion_mnist":
        arrays, where = _load_fashion_mnist(spec, data_root, download)
    elif spec.source in CIFAR_TARBALLS:
        arrays, where = _load_cifar(spec, data_root, download)
    else:  # a registry entry without a loader is a programming error
        raise ValueError(f"no loader for source {spec.source!r}")
    return make_dataset(spec, *arrays, num_train_examples=num_train_examples, source=where)


def make_dataset(
    spec: DatasetSpec,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_train_examples: int | None = None,
    source: str = "",
) -> Dataset:
    """Check official train/test arrays against `spec` and cut them into the three splits."""
    official = spec.num_train + spec.num_val
    for split, images, labels, expected in (
        ("training", train_images, train_labels, official),
        ("test", test_images, test_labels, spec.num_test),
    ):
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(spec.image_shape):
            raise UserError(
                f"{spec.name} {split} images from {source or 'the files'} are {images.dtype}{list(images.shape)}, "
                f"expected uint8[N, {', '.join(map(str, spec.image_shape))}]"
            )
        if len(images) != expected or len(labels) != expected:
            raise UserError(
                f"{spec.name} from {source or 'the files'}: {len(images)} {split} images and {len(labels)} labels, "
                f"expected {expected}; are these the right files?"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise UserError(
                f"{spec.name} from {source or 'the files'}: {split} labels span {labels.min()}..{labels.max()}, "
                f"expected 0..{spec.num_classes - 1}"
            )
    n_train = spec.num_train if num_train_examples is None else int(num_train_examples)

    def split(images, labels, start, stop):
        return Split(
            images=np.ascontiguousarray(images[start:stop], dtype=np.uint8),
            labels=np.ascontiguousarray(labels[start:stop], dtype=np.int32),
        )

    return Dataset(
        name=spec.name,
        num_classes=spec.num_classes,
        image_shape=tuple(spec.image_shape),
        pixel_mean=tuple(spec.pixel_mean),
        pixel_std=tuple(spec.pixel_std),
        train=split(train_images, train_labels, 0, n_train),
        val=split(train_images, train_labels, spec.num_train, official),
        test=split(test_images, test_labels, 0, spec.num_test),
        source=source,
    )


def long_tailed(split: Split, num_classes: int, imbalance_ratio: float) -> Split:
    """The split made long-tailed by the exponential profile of CIFAR-LT (Cao et al., 2019):
    class c keeps its first n_c = floor(n_max * imbalance_ratio ** (-c / (C - 1))) images, in
    the split's order, n_max being the smallest class's count (so every class can supply its
    share; class 0 keeps n_max, class C-1 n_max / imbalance_ratio). Deterministic: no draw."""
    if imbalance_ratio < 1:
        raise UserError(f"long_tail_ratio must be >= 1, got {imbalance_ratio}")
    counts = np.bincount(split.labels, minlength=num_classes)
    n_max = int(counts.min())
    keep = np.zeros(len(split), bool)
    for c in range(num_classes):
        n_c = int(np.floor(n_max * imbalance_ratio ** (-c / max(num_classes - 1, 1))))
        keep[np.flatnonzero(split.labels == c)[:max(n_c, 1)]] = True
    return Split(images=np.ascontiguousarray(split.images[keep]),
                 labels=np.ascontiguousarray(split.labels[keep]))


# ------------------------------------------------------------------------------- Fashion-MNIST


def _find_idx_files(directory: str) -> tuple[dict[str, str], list[str]]:
    """role -> path for the IDX files present in `directory` (raw preferred over .gz)."""
    found, missing = {}, []
    for role, base in FASHION_MNIST_FILES.items():
        for candidate in (base, base + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[role] = path
                break
        else:
            missing.append(base)
    return found, missing


def _read_fashion_mnist(paths: dict[str, str]):
    arrays = {}
    for role, path in paths.items():
        payload = formats.read_idx_bytes(path)
        base = FASHION_MNIST_FILES[role]
        expected = FASHION_MNIST_PAYLOAD_SHA256.get(base)
        if expected is not None:
            actual = hashlib.sha256(payload).hexdigest()
            if actual != expected:
                raise UserError(
                    f"{path} is not the Fashion-MNIST {base} (sha256 of its decompressed data {actual}, "
                    f"expected {expected}); replace it with the official file"
                )
        arrays[role] = formats.parse_idx(payload, path, ndim=3 if role.endswith("images") else 1)
    return (
        arrays["train_images"][..., None],
        arrays["train_labels"].astype(np.int32),
        arrays["test_images"][..., None],
        arrays["test_labels"].astype(np.int32),
    )


def _load_fashion_mnist(spec: DatasetSpec, data_root: str, download: bool):
    local_dir = os.path.join(data_root, FASHION_MNIST_DIRNAME)
    searched, partial = [], []
    for directory in [local_dir, *FASHION_MNIST_SYSTEM_DIRS]:
        searched.append(directory)
        found, missing = _find_idx_files(directory)
        if not missing:
            return _read_fashion_mnist(found), directory
        if found:
            partial.append(f"{directory} lacks {', '.join(missing)}")
    if download:
        for base in FASHION_MNIST_FILES.values():
            if base in (os.path.basename(p) for p in _find_idx_files(local_dir)[0].values()):
                continue  # a raw copy is already there
            gz = base + ".gz"
            download_lib.download(
                FASHION_MNIST_BASE_URL + gz, os.path.join(local_dir, gz), md5=FASHION_MNIST_GZ_MD5.get(gz)
            )
        found, missing = _find_idx_files(local_dir)
        return _read_fashion_mnist(found), local_dir + " (downloaded)"
    names = "{" + ",".join(FASHION_MNIST_FILES.values()) + "}[.gz]"
    note = f" ({'; '.join(partial)})" if partial else ""
    raise UserError(
        f"data set {spec.name} not found: looked for {names} in {' and '.join(searched)}{note}; "
        f"get it with `sudo apt-get install {FASHION_MNIST_APT_PACKAGE}`, or run with `--download true`, "
        f"or put the four IDX files in {local_dir}"
    )


# ---------------------------------------------------------------------------------------- CIFAR


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    """np.save to a temporary file beside `path`, then publish it unless `path` exists."""
    if os.path.exists(path):
        return
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        download_lib.publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _convert_tarball(spec: DatasetSpec, tarball: str, npy_dir: str):
    arrays = formats.read_cifar_tarball(tarball, spec.source)
    try:
        os.makedirs(npy_dir, exist_ok=True)
        for key, array in zip(formats.NPY_LAYOUT_FILES, arrays):
            _save_npy_atomic(os.path.join(npy_dir, key + ".npy"), array)
    except OSError as error:  # read-only data_root: use the arrays, convert again next time
        warnings.warn(f"could not write the converted {spec.name} to {npy_dir}: {error}", stacklevel=3)
    return arrays


def _load_cifar(spec: DatasetSpec, data_root: str, download: bool):
    npy_dir = os.path.join(data_root, spec.name)
    paths = formats.npy_layout_paths(npy_dir)
    if all(os.path.isfile(p) for p in paths.values()):
        return formats.read_npy_layout(npy_dir), npy_dir
    tar_name = CIFAR_TARBALLS[spec.source]
    tar_candidates = [os.path.join(data_root, tar_name), os.path.join(npy_dir, tar_name)]
    for tarball in tar_candidates:
        if os.path.isfile(tarball):
            return _convert_tarball(spec, tarball, npy_dir), tarball
    if download:
        tarball = download_lib.download(
            CIFAR_BASE_URL + tar_name, tar_candidates[0], md5=CIFAR_TARBALL_MD5.get(tar_name)
        )
        return _convert_tarball(spec, tarball, npy_dir), tarball + " (downloaded)"
    present = [os.path.basename(p) for p in paths.values() if os.path.isfile(p)]
    note = f" ({npy_dir} has only {', '.join(present)})" if present else ""
    raise UserError(
        f"data set {spec.name} not found: looked for {{train,test}}_{{images,labels}}.npy in {npy_dir}{note} "
        f"and for {tar_name} in {' and '.join(tar_candidates)}; run with `--download true`, "
        f"or put {tar_name} (from {CIFAR_BASE_URL}{tar_name}) in {data_root}, or the four .npy files in {npy_dir}"
    )
