"""Test set-up: 4 simulated CPU devices, the repository root on the import path."""
import os
import sys

# Must be set before JAX initialises its backends: tests compare 1, 2 and 4 devices. The tests'
# arrays are tiny, so their time is XLA's compilation: without its LLVM optimisations and CPU
# fusion emitters it compiles several times faster and computes the same operations.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dataclasses
import functools
import gzip
import http.server
import io
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest

from data import datasets


# ------------------------------------------------------------------------------- file writers


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX payload (type 0x08, unsigned bytes) for a uint8 array."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path, array: np.ndarray, *, gz: bool) -> None:
    payload = idx_bytes(array)
    with open(path, "wb") as f:
        f.write(gzip.compress(payload, mtime=0) if gz else payload)


def write_fmnist_dir(directory, arrays: dict, *, gz: bool = True) -> None:
    """arrays: role ("train_images", ...) -> array, written under the official IDX names."""
    directory.mkdir(parents=True, exist_ok=True)
    for role, base in datasets.FASHION_MNIST_FILES.items():
        write_idx(directory / (base + (".gz" if gz else "")), arrays[role], gz=gz)


def make_fmnist_arrays(n_train: int, n_test: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }


def cifar_rows(n: int, offset: int = 0) -> np.ndarray:
    """[n, 3072] rows in the official CHW order whose value encodes (image, channel, row, col)."""
    i, c, y, x = np.meshgrid(np.arange(n) + offset, np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((i * 11 + c * 7 + y * 3 + x) % 256).astype(np.uint8).reshape(n, 3072)


def expected_cifar_nhwc(n: int, offset: int = 0) -> np.ndarray:
    """What the rows of `cifar_rows` must become in NHWC."""
    i, y, x, c = np.meshgrid(np.arange(n) + offset, np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((i * 11 + c * 7 + y * 3 + x) % 256).astype(np.uint8)


def _add_pickle(archive: tarfile.TarFile, name: str, obj) -> None:
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_cifar10_tarball(path, per_batch: int, n_test: int) -> None:
    """A tiny official-format cifar-10-python.tar.gz (5 training batches + test_batch)."""
    with tarfile.open(path, "w:gz") as archive:
        for b in range(5):
            rows = cifar_rows(per_batch, offset=b * per_batch)
            labels = [int(v) for v in (np.arange(per_batch) + b * per_batch) % 10]
            _add_pickle(archive, f"cifar-10-batches-py/data_batch_{b + 1}", {b"data": rows, b"labels": labels})
        labels = [int(v) for v in np.arange(n_test) % 10]
        _add_pickle(archive, "cifar-10-batches-py/test_batch", {b"data": cifar_rows(n_test, 1000), b"labels": labels})
        _add_pickle(archive, "cifar-10-batches-py/batches.meta", {b"label_names": [b"airplane"]})


def write_cifar100_tarball(path, n_train: int, n_test: int) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
            fine = [int(v) for v in (np.arange(n) * 7) % 100]
            coarse = [int(v) for v in np.arange(n) % 20]
            _add_pickle(
                archive,
                f"cifar-100-python/{name}",
                {b"data": cifar_rows(n, offset), b"fine_labels": fine, b"coarse_labels": coarse},
            )


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture
def small_splits(monkeypatch):
    """Shrink the registry's split sizes so generated data can be tiny.

    FashionMNIST_x28: 60 / 40 / 30; CIFAR10_x32 and CIFAR100_x32: 30 / 20 / 10.
    """
    sizes = {"FashionMNIST_x28": (60, 40, 30), "CIFAR10_x32": (30, 20, 10), "CIFAR100_x32": (30, 20, 10)}
    for name, (tr, va, te) in sizes.items():
        monkeypatch.setitem(
            datasets.DATASETS,
            name,
            dataclasses.replace(datasets.DATASETS[name], num_train=tr, num_val=va, num_test=te),
        )
    return sizes


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    """No Debian copy and no payload checks, so only generated Fashion-MNIST files are seen."""
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", [str(tmp_path / "no-system-copy")])
    monkeypatch.setattr(datasets, "FASHION_MNIST_PAYLOAD_SHA256", {})


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 -- the base class's signature
        pass


@pytest.fixture
def http_server(monkeypatch):
    """Serve a directory on 127.0.0.1 (a free port) from a thread; yields start(dir) -> base URL."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def start(directory) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def writers():
    """The file writers above, as a fixture (test modules do not import conftest)."""
    import types

    return types.SimpleNamespace(
        idx_bytes=idx_bytes,
        write_idx=write_idx,
        write_fmnist_dir=write_fmnist_dir,
        make_fmnist_arrays=make_fmnist_arrays,
        cifar_rows=cifar_rows,
        expected_cifar_nhwc=expected_cifar_nhwc,
        write_cifar10_tarball=write_cifar10_tarball,
        write_cifar100_tarball=write_cifar100_tarball,
    )


@pytest.fixture
def fake_fmnist_root(tmp_path, monkeypatch, no_system_fmnist):
    """A generated Fashion-MNIST data root (train/val/test 256/64/64) that models can learn:
    each class is a bright horizontal band at its own height, plus noise. Returns data_root."""
    sizes = (256, 64, 64)
    monkeypatch.setitem(datasets.DATASETS, "FashionMNIST_x28", dataclasses.replace(
        datasets.DATASETS["FashionMNIST_x28"], num_train=sizes[0], num_val=sizes[1], num_test=sizes[2]))
    rng = np.random.default_rng(0)

    def images_for(labels):
        images = rng.integers(0, 60, (len(labels), 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 5 + 2 * label] += 180
        return images

    train_labels = (np.arange(sizes[0] + sizes[1]) % 10).astype(np.uint8)
    test_labels = (np.arange(sizes[2]) % 10).astype(np.uint8)
    arrays = {"train_images": images_for(train_labels), "train_labels": train_labels,
              "test_images": images_for(test_labels), "test_labels": test_labels}
    data_root = tmp_path / "data_root"
    write_fmnist_dir(data_root / datasets.FASHION_MNIST_DIRNAME, arrays)
    return str(data_root)



@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """For the distillation scripts' end-to-end tests: generated Fashion-MNIST-shaped data
    (16 train / 8 val / 8 test), a 2-device mesh and a tiny SWAG teacher folder with two runs
    (ResNet-8x1, the same moments twice)."""
    import shutil

    import jax

    import sgd_swag
    import utils.trainer

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (24, 28, 28)), "train_labels": np.arange(24) % 10,
              "test_images": rng.integers(0, 256, (8, 28, 28)), "test_labels": np.arange(8) % 10}
    write_fmnist_dir(root / "data" / datasets.FASHION_MNIST_DIRNAME, arrays, gz=False)
    mesh_2 = lambda devices=None: utils.trainer.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(datasets.DATASETS, "FashionMNIST_x28", dataclasses.replace(
            datasets.DATASETS["FashionMNIST_x28"], num_train=16, num_val=8, num_test=8))
        patch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", [str(root / "no-system-copy")])
        patch.setattr(datasets, "FASHION_MNIST_PAYLOAD_SHA256", {})
        patch.setattr(utils.trainer, "make_mesh", mesh_2)
        teachers = root / "teachers"
        sgd_swag.main(["--config", os.path.join(ROOT, "config/teacher/fmnist_frnrelu_sgd_swag.yaml"),
                       "--data_root", str(root / "data"), "--model_depth", "8", "--model_width", "1",
                       "--optim_ne", "1", "--optim_bs", "8", "--start_decay_epoch", "0",
                       "--start_swa_epoch", "0", "--save", str(teachers / "seed1"), "--seed", "1"])
        shutil.copytree(teachers / "seed1", teachers / "seed2")
        yield {"root": root, "data_root": str(root / "data"), "teachers": str(teachers),
               "images": np.asarray(arrays["test_images"], np.uint8)[..., None]}


@pytest.fixture(scope="session")
def torch():
    """PyTorch, for the tests that prove a converted network equal to its PyTorch definition. It
    is a test dependency (the dev extra): a missing torch fails these tests, it does not skip them."""
    try:
        import torch
    except ImportError:
        pytest.fail("these tests need torch: pip install -e '.[dev]'")
    torch.set_num_threads(1)  # the tests share the cores with XLA; one thread is as fast here
    return torch
