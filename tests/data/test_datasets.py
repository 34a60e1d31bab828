"""data/formats.py, data/download.py and data/datasets.py on small generated files.

One test reads the real Fashion-MNIST from the Debian package location.
"""
from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import pytest

from data import datasets, download, formats
from utils.errors import UserError


def _md5(path) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".part"))


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, writers, gz):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    writers.write_idx(tmp_path / "im", images, gz=gz)
    writers.write_idx(tmp_path / "lb", labels, gz=gz)
    got = formats.read_idx(str(tmp_path / "im"), ndim=3)
    assert got.dtype == np.uint8 and got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(formats.read_idx(str(tmp_path / "lb"), ndim=1), labels)


def test_idx_corrupt_files_name_the_file(tmp_path, writers):
    good = writers.idx_bytes(np.zeros((4, 5, 5), np.uint8))
    cases = {
        "magic": b"\x01\x02" + good[2:],
        "dtype": good[:2] + b"\x0d" + good[3:],  # float32 type code
        "unknown": good[:2] + b"\x42" + good[3:],
        "truncated": good[:-3],
        "extra": good + b"\x00",
        "tiny": b"\x00",
        "badgz": b"\x1f\x8b" + b"garbage" * 10,
        "truncgz": gzip.compress(good)[:-10],
    }
    for name, payload in cases.items():
        path = tmp_path / f"{name}-idx3-ubyte"
        path.write_bytes(payload)
        with pytest.raises(UserError, match=name):
            formats.read_idx(str(path), ndim=3)
    path = tmp_path / "dims-idx3-ubyte"
    path.write_bytes(good)
    with pytest.raises(UserError, match="3 dimensions, expected 1"):
        formats.read_idx(str(path), ndim=1)
    with pytest.raises(UserError, match="not found"):
        formats.read_idx(str(tmp_path / "absent"))


def test_npy_layout_uint8_and_float(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "train_images.npy", images)
    np.save(tmp_path / "train_labels.npy", np.arange(6, dtype=np.int64))
    np.save(tmp_path / "test_images.npy", images[:4].astype(np.float32) / 255.0)  # the reference's [0, 1]
    np.save(tmp_path / "test_labels.npy", np.eye(10, dtype=np.float32)[[1, 2, 3, 4]])  # one-hot is accepted
    tx, ty, sx, sy = formats.read_npy_layout(str(tmp_path))
    np.testing.assert_array_equal(tx, images)
    np.testing.assert_array_equal(sx, images[:4])  # round(x * 255) is exact
    assert ty.dtype == np.int32 and sy.dtype == np.int32 and sx.dtype == np.uint8
    np.testing.assert_array_equal(sy, [1, 2, 3, 4])
    np.save(tmp_path / "test_images.npy", np.full((4, 32, 32, 3), 1.5, np.float32))
    with pytest.raises(UserError, match="test_images.npy"):
        formats.read_npy_layout(str(tmp_path))
    (tmp_path / "test_images.npy").write_bytes(b"not an npy file")
    with pytest.raises(UserError, match="corrupt .npy file .*test_images.npy"):
        formats.read_npy_layout(str(tmp_path))


def test_cifar10_tarball_chw_to_hwc(tmp_path, writers):
    path = tmp_path / "cifar-10-python.tar.gz"
    writers.write_cifar10_tarball(path, per_batch=3, n_test=2)
    tx, ty, sx, sy = formats.read_cifar_tarball(str(path), "cifar10")
    assert tx.shape == (15, 32, 32, 3) and sx.shape == (2, 32, 32, 3)
    assert tx.dtype == np.uint8 and tx.flags.c_contiguous and ty.dtype == np.int32
    np.testing.assert_array_equal(tx, writers.expected_cifar_nhwc(15))  # batches in order 1..5
    np.testing.assert_array_equal(sx, writers.expected_cifar_nhwc(2, offset=1000))
    np.testing.assert_array_equal(ty, np.arange(15) % 10)
    # a hand-made pixel: image 0, row 1, col 2, channel G (c=1) is row entry 1*1024 + 1*32 + 2
    assert tx[0, 1, 2, 1] == writers.cifar_rows(1)[0, 1024 + 32 + 2] == (7 + 3 + 2)


def test_cifar100_tarball_fine_labels(tmp_path, writers):
    path = tmp_path / "cifar-100-python.tar.gz"
    writers.write_cifar100_tarball(path, n_train=5, n_test=3)
    tx, ty, sx, sy = formats.read_cifar_tarball(str(path), "cifar100")
    np.testing.assert_array_equal(tx, writers.expected_cifar_nhwc(5))
    np.testing.assert_array_equal(ty, (np.arange(5) * 7) % 100)
    np.testing.assert_array_equal(sy, (np.arange(3) * 7) % 100)
    with pytest.raises(UserError, match="missing member"):
        formats.read_cifar_tarball(str(path), "cifar10")
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="broken.tar.gz"):
        formats.read_cifar_tarball(str(bad), "cifar100")


# ------------------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_root(tmp_path, writers, small_splits, no_system_fmnist, gz):
    arrays = writers.make_fmnist_arrays(100, 30)
    writers.write_fmnist_dir(tmp_path / "FashionMNIST", arrays, gz=gz)
    ds = datasets.load_dataset("FashionMNIST_x28", str(tmp_path))
    assert ds.source == str(tmp_path / "FashionMNIST")
    assert (ds.name, ds.num_classes, ds.image_shape) == ("FashionMNIST_x28", 10, (28, 28, 1))
    assert ds.pixel_mean == (0.286,) and ds.pixel_std == (0.353,)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (60, 40, 30)
    for split in (ds.train, ds.val, ds.test):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.images.flags.c_contiguous and split.labels.flags.c_contiguous
        assert split.images.shape[1:] == (28, 28, 1)
    np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train_images"][:60])  # the first 60
    np.testing.assert_array_equal(ds.val.images[..., 0], arrays["train_images"][60:])  # the rest
    np.testing.assert_array_equal(ds.test.labels, arrays["test_labels"])

    few = datasets.load_dataset("FashionMNIST_x28", str(tmp_path), num_train_examples=7)
    assert len(few.train) == 7 and len(few.val) == 40
    np.testing.assert_array_equal(few.train.images, ds.train.images[:7])
    for bad in (0, -1, 61, True, 2.5):
        with pytest.raises(UserError, match="num_train_examples"):
            datasets.load_dataset("FashionMNIST_x28", str(tmp_path), num_train_examples=bad)


def test_fashion_mnist_system_dir_and_payload_check(tmp_path, monkeypatch, writers, small_splits, no_system_fmnist):
    system = tmp_path / "usr-share"
    arrays = writers.make_fmnist_arrays(100, 30)
    writers.write_fmnist_dir(system, arrays)
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", [str(tmp_path / "nowhere"), str(system)])
    ds = datasets.load_dataset("FashionMNIST_x28", str(tmp_path / "root"))
    assert ds.source == str(system)
    # the payload table catches the wrong data (e.g. MNIST) under the right names
    monkeypatch.setattr(datasets, "FASHION_MNIST_PAYLOAD_SHA256", {"t10k-labels-idx1-ubyte": "0" * 64})
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is not the Fashion-MNIST"):
        datasets.load_dataset("FashionMNIST_x28", str(tmp_path / "root"))


def test_wrong_sizes_and_labels(tmp_path, writers, small_splits, no_system_fmnist):
    writers.write_fmnist_dir(tmp_path / "FashionMNIST", writers.make_fmnist_arrays(99, 30))
    with pytest.raises(UserError, match="99 training images .* expected 100"):
        datasets.load_dataset("FashionMNIST_x28", str(tmp_path))
    arrays = writers.make_fmnist_arrays(100, 30)
    arrays["test_labels"][3] = 10
    writers.write_fmnist_dir(tmp_path / "FashionMNIST", arrays)
    with pytest.raises(UserError, match="labels span 0..10"):
        datasets.load_dataset("FashionMNIST_x28", str(tmp_path))


def test_missing_fashion_mnist_lists_every_place(tmp_path, no_system_fmnist):
    with pytest.raises(UserError) as info:
        datasets.load_dataset("FashionMNIST_x28", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "FashionMNIST") in message
    assert datasets.FASHION_MNIST_SYSTEM_DIRS[0] in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download true" in message


def test_unknown_name_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean CIFAR10_x32"):
        datasets.load_dataset("cifar10_x32", str(tmp_path))
    with pytest.raises(UserError, match="did you mean FashionMNIST_x28"):
        datasets.load_dataset("FashionMNIST", str(tmp_path))
    with pytest.raises(UserError, match="known data sets: CIFAR100_x32, CIFAR10_x32, FashionMNIST_x28"):
        datasets.load_dataset("imagenet", str(tmp_path))


def test_real_fashion_mnist():
    """The real data from `apt-get install dataset-fashion-mnist`: .ci/run installs it, so a
    missing copy fails here rather than skipping."""
    assert any(os.path.isdir(d) for d in datasets.FASHION_MNIST_SYSTEM_DIRS), \
        "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
    ds = datasets.load_dataset("FashionMNIST_x28", "/nonexistent-data-root")
    assert ds.source in datasets.FASHION_MNIST_SYSTEM_DIRS  # payload SHA-256s checked on the way
    assert ds.train.images.shape == (51200, 28, 28, 1) and ds.val.images.shape == (8800, 28, 28, 1)
    assert ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.train.images.dtype == np.uint8 and ds.test.labels.dtype == np.int32
    official = np.concatenate([ds.train.labels, ds.val.labels])
    np.testing.assert_array_equal(np.bincount(official, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels, minlength=10), [1000] * 10)
    assert abs(ds.train.images.mean() / 255 - ds.pixel_mean[0]) < 0.01


# -------------------------------------------------------------------------------------- CIFAR


def test_cifar_tarball_converted_once(tmp_path, writers, small_splits):
    writers.write_cifar10_tarball(tmp_path / "cifar-10-python.tar.gz", per_batch=10, n_test=10)
    ds = datasets.load_dataset("CIFAR10_x32", str(tmp_path))
    assert ds.source == str(tmp_path / "cifar-10-python.tar.gz")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 20, 10)
    assert ds.pixel_mean == (0.49, 0.48, 0.44) and ds.pixel_std == (0.2, 0.2, 0.2)
    np.testing.assert_array_equal(ds.val.images, writers.expected_cifar_nhwc(50)[30:])
    npy_dir = tmp_path / "CIFAR10_x32"
    assert sorted(os.listdir(npy_dir)) == sorted(f + ".npy" for f in formats.NPY_LAYOUT_FILES)  # no temp files
    stamps = {n: os.stat(npy_dir / n).st_mtime_ns for n in os.listdir(npy_dir)}
    again = datasets.load_dataset("CIFAR10_x32", str(tmp_path), num_train_examples=5)
    assert again.source == str(npy_dir)
    assert {n: os.stat(npy_dir / n).st_mtime_ns for n in os.listdir(npy_dir)} == stamps
    np.testing.assert_array_equal(again.train.images, ds.train.images[:5])
    np.testing.assert_array_equal(again.test.labels, ds.test.labels)


def test_cifar100_tarball_inside_name_dir(tmp_path, writers, small_splits):
    (tmp_path / "CIFAR100_x32").mkdir()
    writers.write_cifar100_tarball(tmp_path / "CIFAR100_x32" / "cifar-100-python.tar.gz", 50, 10)
    ds = datasets.load_dataset("CIFAR100_x32", str(tmp_path))
    assert ds.num_classes == 100 and ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(ds.train.labels, (np.arange(30) * 7) % 100)


def test_cifar_npy_shape_checked(tmp_path, small_splits):
    d = tmp_path / "CIFAR10_x32"
    d.mkdir()
    np.save(d / "train_images.npy", np.zeros((50, 28, 28, 3), np.uint8))
    np.save(d / "train_labels.npy", np.zeros(50, np.int64))
    np.save(d / "test_images.npy", np.zeros((10, 28, 28, 3), np.uint8))
    np.save(d / "test_labels.npy", np.zeros(10, np.int64))
    with pytest.raises(UserError, match=r"expected uint8\[N, 32, 32, 3\]"):
        datasets.load_dataset("CIFAR10_x32", str(tmp_path))


def test_missing_cifar_lists_every_place(tmp_path):
    with pytest.raises(UserError) as info:
        datasets.load_dataset("CIFAR100_x32", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "--download true" in message
    for place in (tmp_path / "CIFAR100_x32", tmp_path / "cifar-100-python.tar.gz",
                  tmp_path / "CIFAR100_x32" / "cifar-100-python.tar.gz"):  # fmt: skip
        assert str(place) in message


# ----------------------------------------------------------------------------------- download


def test_download_fashion_mnist_and_cifar(tmp_path, monkeypatch, writers, small_splits, no_system_fmnist, http_server):
    served = tmp_path / "served"
    arrays = writers.make_fmnist_arrays(100, 30)
    writers.write_fmnist_dir(served, arrays)
    writers.write_cifar10_tarball(served / "cifar-10-python.tar.gz", per_batch=10, n_test=10)
    base = http_server(served)
    monkeypatch.setattr(datasets, "FASHION_MNIST_BASE_URL", base)
    monkeypatch.setattr(datasets, "CIFAR_BASE_URL", base)
    monkeypatch.setattr(datasets, "FASHION_MNIST_GZ_MD5", {p.name: _md5(p) for p in served.glob("*.gz")})
    monkeypatch.setattr(datasets, "CIFAR_TARBALL_MD5", {"cifar-10-python.tar.gz": _md5(served / "cifar-10-python.tar.gz")})
    root = tmp_path / "root"

    with pytest.raises(UserError):  # nothing local and download off
        datasets.load_dataset("FashionMNIST_x28", str(root))
    ds = datasets.load_dataset("FashionMNIST_x28", str(root), download=True)
    assert "downloaded" in ds.source
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays["test_images"])
    assert sorted(os.listdir(root / "FashionMNIST")) == sorted(p.name for p in served.glob("*-ubyte.gz"))
    assert datasets.load_dataset("FashionMNIST_x28", str(root)).source == str(root / "FashionMNIST")

    c10 = datasets.load_dataset("CIFAR10_x32", str(root), download=True)
    np.testing.assert_array_equal(c10.train.images, writers.expected_cifar_nhwc(30))
    assert (root / "cifar-10-python.tar.gz").is_file() and (root / "CIFAR10_x32" / "test_labels.npy").is_file()
    assert _leftovers(root) == [] and _leftovers(root / "CIFAR10_x32") == []


def test_download_checksum_mismatch_leaves_nothing(tmp_path, http_server):
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob.bin").write_bytes(b"x" * 5000)
    base = http_server(served)
    dest_dir = tmp_path / "dest"
    with pytest.raises(UserError) as info:
        download.download(base + "blob.bin", str(dest_dir / "blob.bin"), md5="0" * 32)
    message = str(info.value)
    assert "blob.bin" in message and "0" * 32 in message and _md5(served / "blob.bin") in message
    assert os.listdir(dest_dir) == []  # neither the file nor its temporary
    # sha256 works the same way, and a good checksum publishes the file
    good = hashlib.sha256(b"x" * 5000).hexdigest()
    assert download.download(base + "blob.bin", str(dest_dir / "blob.bin"), sha256=good) == str(dest_dir / "blob.bin")
    assert (dest_dir / "blob.bin").read_bytes() == b"x" * 5000 and _leftovers(dest_dir) == []
    with pytest.raises(UserError, match="cannot download"):
        download.download(base + "absent.bin", str(dest_dir / "absent.bin"))
    assert sorted(os.listdir(dest_dir)) == ["blob.bin"]


def test_download_never_overwrites(tmp_path):
    dest = tmp_path / "kept.bin"
    dest.write_bytes(b"local copy")
    dead_url = "http://127.0.0.1:9/never-fetched"  # the discard port: any fetch would fail
    assert download.download(dead_url, str(dest), md5=hashlib.md5(b"local copy").hexdigest()) == str(dest)
    assert download.download(dead_url, str(dest)) == str(dest)  # no checksum: kept as it is
    with pytest.raises(UserError, match="existing file .*kept.bin.*delete it"):
        download.download(dead_url, str(dest), md5="1" * 32)
    assert dest.read_bytes() == b"local copy"
    tmp = tmp_path / "new.part"
    tmp.write_bytes(b"new")
    assert download.publish(str(tmp), str(dest)) is False
    assert dest.read_bytes() == b"local copy" and not tmp.exists()


def test_long_tailed_keeps_an_exponential_profile_of_each_class_first_images():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [120, 100, 110, 130]).astype(np.int32)
    rng.shuffle(labels)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    split = datasets.Split(images, labels)
    tail = datasets.long_tailed(split, 4, imbalance_ratio=10)
    # n_max = the smallest class (100); class c keeps floor(100 * 10^(-c/3))
    assert np.bincount(tail.labels).tolist() == [100, 46, 21, 10]
    for c, n in enumerate([100, 46, 21, 10]):  # the first n of class c, in the split's order
        first = np.flatnonzero(labels == c)[:n]
        np.testing.assert_array_equal(tail.images[tail.labels == c], images[first])
    np.testing.assert_array_equal(datasets.long_tailed(split, 4, 1).labels.size, 400)
    with pytest.raises(UserError, match="long_tail_ratio"):
        datasets.long_tailed(split, 4, 0.5)
