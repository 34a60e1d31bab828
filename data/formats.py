"""Pure readers for the on-disk data set formats. No downloads, no writes, no registry.

Every reader returns plain NumPy arrays: images uint8 NHWC, labels int32 [N], C-contiguous.
Anything malformed raises `utils.errors.UserError` with one line naming the file.

Formats:
- IDX (MNIST / Fashion-MNIST), gzipped or raw: `read_idx`, `parse_idx`.
- The reference `.npy` layout `<dir>/{train,test}_{images,labels}.npy`: `read_npy_layout`.
- The official CIFAR-10 / CIFAR-100 python tarballs: `read_cifar_tarball`.
"""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import zlib

import numpy as np

from utils.errors import UserError

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

NPY_LAYOUT_FILES = ("train_images", "train_labels", "test_images", "test_labels")


# ----------------------------------------------------------------------------------------- IDX


def read_idx_bytes(path: str) -> bytes:
    """The decompressed bytes of an IDX file; gzip is detected by its magic, not the name."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            return f.read()
    except FileNotFoundError:
        raise UserError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"corrupt IDX file {path}: cannot decompress ({error}); delete it and get it again") from None


def parse_idx(payload: bytes, name: str = "<bytes>", *, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX payload into a uint8 array of its declared shape.

    The header is two zero bytes, a type code (0x08 = unsigned byte, the only one accepted
    here), the number of dimensions, then each dimension as a big-endian uint32. The payload
    must be exactly as long as the header says. `ndim` (optional) is the expected number of
    dimensions (3 for images, 1 for labels).
    """
    if len(payload) < 4:
        raise UserError(f"corrupt IDX file {name}: {len(payload)} bytes, too short for a header")
    if payload[0] != 0 or payload[1] != 0:
        raise UserError(f"corrupt IDX file {name}: bad magic number {payload[:4].hex()} (expected 0000xxyy)")
    code, dims = payload[2], payload[3]
    if code not in _IDX_DTYPES:
        raise UserError(f"corrupt IDX file {name}: unknown type code 0x{code:02x}")
    if code != 0x08:
        raise UserError(f"unsupported IDX file {name}: type code 0x{code:02x}, only unsigned bytes (0x08) are read")
    if dims == 0 or (ndim is not None and dims != ndim):
        expected = f", expected {ndim}" if ndim is not None else ""
        raise UserError(f"corrupt IDX file {name}: {dims} dimensions{expected}")
    header = 4 + 4 * dims
    if len(payload) < header:
        raise UserError(f"corrupt IDX file {name}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(payload, dtype=">u4", count=dims, offset=4))
    size = int(np.prod(shape, dtype=np.int64))
    if len(payload) - header != size:
        raise UserError(
            f"corrupt IDX file {name}: header says shape {shape} ({size} bytes) "
            f"but the payload has {len(payload) - header} bytes"
        )
    array = np.frombuffer(payload, dtype=np.uint8, count=size, offset=header).reshape(shape)
    return array.copy()  # own, writable, C-contiguous memory


def read_idx(path: str, *, ndim: int | None = None) -> np.ndarray:
    """Read a gzipped or raw IDX file into a uint8 array (see `parse_idx`)."""
    return parse_idx(read_idx_bytes(path), path, ndim=ndim)


# ------------------------------------------------------------------------------------ .npy layout


def to_uint8_images(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 images as they are; float images in [0, 1] become round(x * 255) as uint8.

    The conversion is exact for images that were made by dividing uint8 by 255 (the
    reference loader's value range). Float values outside [0, 1] and any other dtype raise.
    """
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if images.ndim == 0:
        raise UserError(f"bad images in {name}: a scalar, expected an array of images")
    if np.issubdtype(images.dtype, np.floating):
        out = np.empty(images.shape, dtype=np.uint8)
        flat_in, flat_out = images.reshape(len(images), -1), out.reshape(len(out), -1)
        for start in range(0, len(images), 4096):  # chunked: a float copy of CIFAR is 600 MB
            chunk = np.asarray(flat_in[start:start + 4096], dtype=np.float64)
            if not np.all(np.isfinite(chunk)) or chunk.min(initial=0.0) < -1e-6 or chunk.max(initial=0.0) > 1 + 1e-6:
                raise UserError(f"bad images in {name}: float values must lie in [0, 1]")
            flat_out[start:start + 4096] = np.clip(np.round(chunk * 255.0), 0, 255).astype(np.uint8)
        return out
    raise UserError(f"bad images in {name}: dtype {images.dtype}, expected uint8 or float in [0, 1]")


def to_int32_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Integer labels [N] as int32. One-hot [N, K] labels are accepted and argmax'ed."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        if not np.all((labels == 0) | (labels == 1)) or not np.all(labels.sum(axis=1) == 1):
            raise UserError(f"bad labels in {name}: 2-D labels must be one-hot")
        labels = labels.argmax(axis=1)
    if labels.ndim != 1:
        raise UserError(f"bad labels in {name}: shape {labels.shape}, expected [N]")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise UserError(f"bad labels in {name}: float labels that are not whole numbers")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"bad labels in {name}: dtype {labels.dtype}, expected integers")
    return np.ascontiguousarray(labels.astype(np.int32))


def load_npy(path: str, *, mmap: bool = False) -> np.ndarray:
    """np.load without pickles; a corrupt or non-array file raises a UserError naming it."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"corrupt .npy file {path}: {error}") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"corrupt .npy file {path}: holds several arrays (an .npz), expected one array")
    return array


def npy_layout_paths(directory: str) -> dict[str, str]:
    """The four file paths of the reference layout in `directory`."""
    return {key: os.path.join(directory, key + ".npy") for key in NPY_LAYOUT_FILES}


def read_npy_layout(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read `<directory>/{train,test}_{images,labels}.npy` -> (train_x, train_y, test_x, test_y).

    Images are uint8 NHWC [N, H, W, C]; float images in [0, 1] (the reference loader's
    range after /255) are accepted and converted with round(x * 255) to uint8. Labels become
    int32 [N]. Image and label counts must agree within each split.
    """
    paths = npy_layout_paths(directory)
    out = {}
    for split in ("train", "test"):
        images = load_npy(paths[f"{split}_images"])
        labels = load_npy(paths[f"{split}_labels"])
        if images.ndim != 4:
            raise UserError(f"bad images in {paths[f'{split}_images']}: shape {images.shape}, expected [N, H, W, C]")
        images = to_uint8_images(images, paths[f"{split}_images"])
        labels = to_int32_labels(labels, paths[f"{split}_labels"])
        if len(images) != len(labels):
            raise UserError(
                f"{directory}: {len(images)} {split} images but {len(labels)} {split} labels"
            )
        out[split] = (images, labels)
    return out["train"][0], out["train"][1], out["test"][0], out["test"][1]


# ---------------------------------------------------------------------------------- CIFAR tarballs

CIFAR_MEMBERS = {
    # variant -> (train member basenames, test member basenames, label key)
    "cifar10": (tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"),
    "cifar100": (("train",), ("test",), b"fine_labels"),
}


def cifar_rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """[N, 3072] rows, each R plane then G then B (32x32 row-major) -> uint8 [N, 32, 32, 3]."""
    rows = np.asarray(rows)
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8))


def _read_cifar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, path: str, label_key: bytes):
    name = f"{path}:{member.name}"
    handle = archive.extractfile(member)
    if handle is None:
        raise UserError(f"corrupt CIFAR tarball {name}: not a regular file")
    try:
        # The official tarballs are Python pickles; only load files you trust (downloads are
        # checksummed). encoding='bytes' keeps the Python-2 keys as bytes (b'data', b'labels').
        batch = pickle.load(handle, encoding="bytes")
    except Exception as error:  # noqa: BLE001 -- a corrupt pickle can raise almost anything
        raise UserError(f"corrupt CIFAR tarball {name}: cannot unpickle ({type(error).__name__})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise UserError(f"corrupt CIFAR tarball {name}: expected a dict with b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise UserError(f"corrupt CIFAR tarball {name}: data {data.dtype}{list(data.shape)}, expected uint8[N, 3072]")
    if labels.shape != (len(data),):
        raise UserError(f"corrupt CIFAR tarball {name}: {len(labels)} labels for {len(data)} images")
    return cifar_rows_to_nhwc(data), to_int32_labels(labels, name)


def read_cifar_tarball(path: str, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the official python tarball -> (train_x, train_y, test_x, test_y), NHWC uint8.

    variant "cifar10": `cifar-10-batches-py/data_batch_1..5` and `test_batch`, labels b'labels'.
    variant "cifar100": `cifar-100-python/train` and `test`, labels b'fine_labels'.
    Members are found by their base name and read straight from the archive (no extraction).
    Each holds b'data' uint8 [N, 3072] with each row in CHW row-major order, turned into HWC.
    """
    if variant not in CIFAR_MEMBERS:
        raise ValueError(f"unknown CIFAR variant {variant!r}")
    train_names, test_names, label_key = CIFAR_MEMBERS[variant]
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {}
            for member in archive.getmembers():
                if member.isfile():
                    members.setdefault(os.path.basename(member.name), member)
            missing = [n for n in train_names + test_names if n not in members]
            if missing:
                raise UserError(f"corrupt CIFAR tarball {path}: missing member(s) {', '.join(missing)}")
            parts = {}
            for split, names in (("train", train_names), ("test", test_names)):
                read = [_read_cifar_member(archive, members[n], path, label_key) for n in names]
                parts[split] = (
                    np.concatenate([r[0] for r in read]) if len(read) > 1 else read[0][0],
                    np.concatenate([r[1] for r in read]) if len(read) > 1 else read[0][1],
                )
    except FileNotFoundError:
        raise UserError(f"CIFAR tarball not found: {path}") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise UserError(f"corrupt CIFAR tarball {path}: {error}; delete it and get it again") from None
    return parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]
