"""Distribution-shift and out-of-distribution (OOD) test sets. Test only; never trained on.

`load_shift_sets(data_name, data_root, test_split)` returns a `ShiftSets`:
  shift: dict[name -> Split]     labelled, same classes as the data set (covariate shift)
  ood:   dict[name -> uint8 images [N, H, W, C]]   other classes, no labels
Names: a corruption at severity k is `<corruption>_s<k>` (e.g. `rotation_s1`,
`gaussian_noise_s5`); natural shifts are `cifar10.1`, `cifar10.2`, `stl10`; OOD sets are
`digits`, `svhn`.

FashionMNIST_x28 (always available, made here):
  shift: the deterministic corruption suite `fmnist_corruptions` on the test split:
         rotation, gaussian_noise, blur, contrast, each at severities 1..3, test labels.
  ood:   `digits`: scikit-learn's bundled 8x8 digits (1797 images), upsampled to 28x28.

CIFAR10_x32 / CIFAR100_x32, read from `.npy` files under <data_root> when present; a set whose
files are absent is skipped silently, a set that is present but malformed raises a UserError:
  <data_root>/CIFAR-10-C/<corruption>.npy + labels.npy        (CIFAR10_x32)
  <data_root>/CIFAR-100-C/<corruption>.npy + labels.npy       (CIFAR100_x32)
        the Hendrycks & Dietterich release: uint8 [5*n, 32, 32, 3] per corruption, rows
        (k-1)*n .. k*n are severity k; labels int [5*n]. Names `<corruption>_s<k>`, for the 19
        corruptions in `CIFAR_C_CORRUPTIONS`. Opened as read-only memory maps.
  <data_root>/CIFAR-10.1/cifar10.1_v6_data.npy + cifar10.1_v6_labels.npy   (CIFAR10_x32)
        uint8 [2000, 32, 32, 3], labels 0..9. Name `cifar10.1`.
  <data_root>/CIFAR-10.2/cifar102_test.npz (or the same archive named cifar102_test.npy)
        (CIFAR10_x32) the official release: a NumPy .npz archive with keys `images`
        uint8 [2000, 32, 32, 3] and `labels`; other keys are ignored. Name `cifar10.2`.
  <data_root>/STL10/test_images.npy + test_labels.npy   (CIFAR10_x32)
        uint8 NHWC [N, 96, 96, 3] (resized here to 32x32 by 3x3 block averaging) or already
        [N, 32, 32, 3]; labels in STL-10 order (airplane, bird, car, cat, deer, dog, horse,
        monkey, ship, truck), 0..9, or 1..10 as in the official binary files. The 9 classes
        shared with CIFAR-10 are mapped to CIFAR-10 indices and `monkey` is dropped. Name `stl10`.
  <data_root>/SVHN/test_images.npy        (both) uint8 [N, 32, 32, 3], used as OOD `svhn`.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np
from scipy import ndimage

from data import datasets
from data import formats
from data.datasets import Split
from utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class ShiftSets:
    shift: dict  # name -> Split (labelled, in-distribution classes)
    ood: dict  # name -> uint8 images [N, H, W, C] (no labels)


# --------------------------------------------------------------------- Fashion-MNIST corruptions

SEVERITIES = (1, 2, 3)
# corruption -> its parameter at severities 1, 2, 3 (strength increases with severity)
FMNIST_CORRUPTIONS = {
    "rotation": (15.0, 30.0, 45.0),  # degrees, sign drawn per image
    "gaussian_noise": (0.08, 0.16, 0.28),  # std, in units of the [0, 1] pixel range
    "blur": (0.7, 1.2, 1.8),  # Gaussian sigma in pixels
    "contrast": (0.5, 0.3, 0.15),  # factor on the deviation from each image's mean
}
CORRUPTION_SEED = 20240


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W(, C)], got {images.dtype}{list(images.shape)}")
    return images


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _rotate_batch(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate every image of x [N, H, W, C] by `degrees` about its centre (bilinear, zero fill).

    The sampling grid is the same for every image, so the whole batch is four gathers and a
    weighted sum, with no loop over images.
    """
    n, h, w, c = x.shape
    theta = np.deg2rad(degrees)
    cos, sin = np.cos(theta), np.sin(theta)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    # source coordinates in the zero-padded image (a one-pixel border, hence the +1)
    sy = cos * (yy - cy) - sin * (xx - cx) + cy + 1.0
    sx = sin * (yy - cy) + cos * (xx - cx) + cx + 1.0
    y0, x0 = np.floor(sy), np.floor(sx)
    wy, wx = (sy - y0).astype(np.float32)[None, :, :, None], (sx - x0).astype(np.float32)[None, :, :, None]
    y0i, x0i = np.clip(y0, 0, h + 1).astype(np.intp), np.clip(x0, 0, w + 1).astype(np.intp)
    y1i, x1i = np.clip(y0 + 1, 0, h + 1).astype(np.intp), np.clip(x0 + 1, 0, w + 1).astype(np.intp)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    top = padded[:, y0i, x0i] * (1 - wx) + padded[:, y0i, x1i] * wx
    bottom = padded[:, y1i, x0i] * (1 - wx) + padded[:, y1i, x1i] * wx
    return top * (1 - wy) + bottom * wy


def corrupt(images_u8: np.ndarray, corruption: str, severity: int, *, seed: int = CORRUPTION_SEED) -> np.ndarray:
    """One corruption of a batch of uint8 NHWC images at `severity` (1..3), batched.

    Deterministic: the random draws come from a generator seeded by (seed, corruption, severity),
    so a set does not depend on which other sets were made, or in which order.
    """
    if corruption not in FMNIST_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(FMNIST_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    images = _as_nhwc(images_u8)
    param = FMNIST_CORRUPTIONS[corruption][severity - 1]
    index = list(FMNIST_CORRUPTIONS).index(corruption)
    rng = np.random.default_rng([seed, index, severity])
    x = images.astype(np.float32)
    if corruption == "rotation":
        out = np.empty_like(x)
        negative = rng.random(len(x)) < 0.5
        for sign, mask in ((1.0, ~negative), (-1.0, negative)):
            if mask.any():  # one batched call per rotation direction
                out[mask] = _rotate_batch(x[mask], sign * param)
    elif corruption == "gaussian_noise":
        out = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(param * 255.0)
    elif corruption == "blur":
        out = ndimage.gaussian_filter(x, sigma=(0.0, param, param, 0.0), mode="constant", cval=0.0, truncate=3.0)
    else:  # contrast
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        out = (x - mean) * np.float32(param) + mean
    return _to_uint8(out)


def fmnist_corruptions(images_u8: np.ndarray, *, seed: int = CORRUPTION_SEED) -> dict:
    """The corruption suite: {corruption: {severity (1..3): uint8 images, shape of the input}}.

    Corruptions: rotation (±15/30/45°, bilinear, zero fill), gaussian_noise (std 0.08/0.16/0.28
    of the range), blur (Gaussian, sigma 0.7/1.2/1.8 px), contrast (deviation from the image
    mean scaled by 0.5/0.3/0.15). Deterministic for a given `seed`.
    """
    images = np.asarray(images_u8)
    squeeze = images.ndim == 3
    suite = {}
    for corruption in FMNIST_CORRUPTIONS:
        suite[corruption] = {}
        for severity in SEVERITIES:
            out = corrupt(images, corruption, severity, seed=seed)
            suite[corruption][severity] = out[..., 0] if squeeze else out
    return suite


def digits_ood(num: int | None = None, *, size: int = 28) -> np.ndarray:
    """scikit-learn's bundled digits as uint8 [N, size, size, 1] (N = 1797, or the first `num`).

    The 8x8 images with values 0..16 are scaled to 0..255 and upsampled bilinearly
    (scipy.ndimage.zoom, order 1) to size x size; dark background, like Fashion-MNIST.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    images = load_digits().images.astype(np.float32) * np.float32(255.0 / 16.0)  # [1797, 8, 8]
    if num is not None:
        if not 1 <= num <= len(images):
            raise UserError(f"digits_ood: num must be in 1..{len(images)}, got {num}")
        images = images[:num]
    factor = size / images.shape[1]
    zoomed = ndimage.zoom(images, (1.0, factor, factor), order=1, mode="nearest")
    return _to_uint8(zoomed)[..., None]


# ------------------------------------------------------------------------------- CIFAR shift sets

CIFAR_C_CORRUPTIONS = (
    "brightness", "contrast", "defocus_blur", "elastic_transform", "fog", "frost", "gaussian_blur",
    "gaussian_noise", "glass_blur", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate",
    "saturate", "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur",
)  # fmt: skip
CIFAR_C_SEVERITIES = 5
CIFAR_C_DIRS = {"CIFAR10_x32": "CIFAR-10-C", "CIFAR100_x32": "CIFAR-100-C"}
# STL-10 class index -> CIFAR-10 class index (-1: monkey, no CIFAR-10 counterpart)
STL10_TO_CIFAR10 = np.array([0, 2, 1, 3, 4, 5, 7, -1, 8, 9], dtype=np.int32)


def _check_images(images: np.ndarray, path: str, shape=(32, 32, 3)) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise UserError(
            f"bad images in {path}: {images.dtype}{list(images.shape)}, expected uint8[N, {', '.join(map(str, shape))}]"
        )
    return images


def _check_labels(labels: np.ndarray, n: int, num_classes: int, path: str) -> np.ndarray:
    labels = formats.to_int32_labels(labels, path)
    if len(labels) != n:
        raise UserError(f"{path}: {len(labels)} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")
    return labels


def _pair(images_path: str, labels_path: str) -> bool:
    """True if both files exist, False if neither; a lone half raises."""
    have = os.path.isfile(images_path), os.path.isfile(labels_path)
    if have[0] != have[1]:
        lacking = labels_path if have[0] else images_path
        raise UserError(f"incomplete shift set: {lacking} is missing (its partner file is present)")
    return have[0]


def _cifar_c(directory: str, num_classes: int) -> dict:
    sets = {}
    present = [c for c in CIFAR_C_CORRUPTIONS if os.path.isfile(os.path.join(directory, c + ".npy"))]
    if not present:
        return sets
    labels_path = os.path.join(directory, "labels.npy")
    if not os.path.isfile(labels_path):
        raise UserError(f"incomplete shift set: {labels_path} is missing (corruption files are present)")
    raw_labels = formats.load_npy(labels_path)
    for corruption in present:
        path = os.path.join(directory, corruption + ".npy")
        images = _check_images(formats.load_npy(path, mmap=True), path)
        if len(images) % CIFAR_C_SEVERITIES:
            raise UserError(f"bad images in {path}: {len(images)} rows, expected a multiple of {CIFAR_C_SEVERITIES}")
        labels = _check_labels(raw_labels, len(images), num_classes, labels_path)
        n = len(images) // CIFAR_C_SEVERITIES
        for k in range(1, CIFAR_C_SEVERITIES + 1):
            rows = slice((k - 1) * n, k * n)
            sets[f"{corruption}_s{k}"] = Split(images=images[rows], labels=labels[rows])
    return sets


def _cifar10_1(data_root: str) -> dict:
    directory = os.path.join(data_root, "CIFAR-10.1")
    images_path = os.path.join(directory, "cifar10.1_v6_data.npy")
    labels_path = os.path.join(directory, "cifar10.1_v6_labels.npy")
    if not _pair(images_path, labels_path):
        return {}
    images = _check_images(formats.load_npy(images_path), images_path)
    return {"cifar10.1": Split(images, _check_labels(formats.load_npy(labels_path), len(images), 10, labels_path))}


def _cifar10_2(data_root: str) -> dict:
    directory = os.path.join(data_root, "CIFAR-10.2")
    for name in ("cifar102_test.npz", "cifar102_test.npy"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise UserError(f"bad CIFAR-10.2 file {path}: expected an .npz archive with images and labels")
            with archive:
                if "images" not in archive.files or "labels" not in archive.files:
                    raise UserError(f"bad CIFAR-10.2 file {path}: keys {archive.files}, expected images and labels")
                images, labels = archive["images"], archive["labels"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise UserError(f"corrupt CIFAR-10.2 file {path}: {error}") from None
        images = _check_images(images, path)
        return {"cifar10.2": Split(np.ascontiguousarray(images), _check_labels(labels, len(images), 10, path))}
    return {}


def _block_mean_resize(images: np.ndarray, size: int) -> np.ndarray:
    """[N, k*size, k*size, C] uint8 -> [N, size, size, C] by k x k block averaging, in chunks."""
    n, h, w, c = images.shape
    k = h // size
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for start in range(0, n, 1000):
        chunk = images[start:start + 1000].astype(np.float32).reshape(-1, size, k, size, k, c)
        out[start:start + 1000] = _to_uint8(chunk.mean(axis=(2, 4)))
    return out


def _stl10(data_root: str) -> dict:
    directory = os.path.join(data_root, "STL10")
    images_path = os.path.join(directory, "test_images.npy")
    labels_path = os.path.join(directory, "test_labels.npy")
    if not _pair(images_path, labels_path):
        return {}
    images = formats.load_npy(images_path)
    if images.ndim == 4 and tuple(images.shape[1:]) == (96, 96, 3):
        images = _block_mean_resize(_check_images(images, images_path, (96, 96, 3)), 32)
    images = _check_images(images, images_path)
    labels = formats.to_int32_labels(formats.load_npy(labels_path), labels_path)
    if len(labels) and labels.min() == 1 and labels.max() == 10:  # the official binary's 1..10
        labels = labels - 1
    labels = _check_labels(labels, len(images), 10, labels_path)
    mapped = STL10_TO_CIFAR10[labels]
    keep = mapped >= 0
    return {"stl10": Split(np.ascontiguousarray(images[keep]), np.ascontiguousarray(mapped[keep]))}


def _svhn(data_root: str) -> dict:
    path = os.path.join(data_root, "SVHN", "test_images.npy")
    if not os.path.isfile(path):
        return {}
    return {"svhn": _check_images(formats.load_npy(path), path)}


def load_shift_sets(data_name: str, data_root: str, test_split: Split | None = None) -> ShiftSets:
    """Every shift and OOD set available for `data_name` (see the module docstring).

    test_split: the data set's test split, which the Fashion-MNIST corruption suite corrupts;
    when None it is loaded with `load_dataset(data_name, data_root)`. Unused for CIFAR.
    """
    spec = datasets.get_spec(data_name)
    data_root = os.fspath(data_root)
    if spec.source == "fashion_mnist":
        if test_split is None:
            test_split = datasets.load_dataset(data_name, data_root).test
        suite = fmnist_corruptions(test_split.images)
        shift = {
            f"{corruption}_s{severity}": Split(images, test_split.labels)
            for corruption, by_severity in suite.items()
            for severity, images in by_severity.items()
        }
        return ShiftSets(shift=shift, ood={"digits": digits_ood()})
    shift = {}
    if spec.name in CIFAR_C_DIRS:
        shift.update(_cifar_c(os.path.join(data_root, CIFAR_C_DIRS[spec.name]), spec.num_classes))
    if spec.name == "CIFAR10_x32":
        shift.update(_cifar10_1(data_root))
        shift.update(_cifar10_2(data_root))
        shift.update(_stl10(data_root))
    return ShiftSets(shift=shift, ood=_svhn(data_root))
