"""data/shift.py: the Fashion-MNIST corruption suite, the digits OOD set, the CIFAR shift files."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from data import shift
from data.datasets import Split
from utils.errors import UserError


@pytest.fixture(scope="module")
def smooth_images():
    """64 Fashion-MNIST-like images: a bright off-centre blob with smooth texture, dark background."""
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(size=(64, 28, 28)), sigma=(0, 2, 2))
    yy, xx = np.mgrid[:28, :28]
    blob = ((yy - 12) ** 2 / 60.0 + (xx - 15) ** 2 / 25.0 < 1.0).astype(float)
    images = blob * (170 + 400 * texture)
    return np.clip(images, 0, 255).astype(np.uint8)[..., None]


def test_corruptions_deterministic_shapes(smooth_images):
    first = shift.fmnist_corruptions(smooth_images)
    second = shift.fmnist_corruptions(smooth_images.copy())
    assert set(first) == {"rotation", "gaussian_noise", "blur", "contrast"} == set(shift.FMNIST_CORRUPTIONS)
    for name, by_severity in first.items():
        assert sorted(by_severity) == [1, 2, 3]
        for severity, images in by_severity.items():
            assert images.shape == smooth_images.shape and images.dtype == np.uint8
            assert images.flags.c_contiguous
            np.testing.assert_array_equal(images, second[name][severity])
    other_seed = shift.fmnist_corruptions(smooth_images, seed=1)
    assert not np.array_equal(other_seed["gaussian_noise"][2], first["gaussian_noise"][2])
    np.testing.assert_array_equal(other_seed["blur"][2], first["blur"][2])  # blur draws nothing
    squeezed = shift.fmnist_corruptions(smooth_images[..., 0])  # [N, H, W] in, [N, H, W] out
    np.testing.assert_array_equal(squeezed["rotation"][3], first["rotation"][3][..., 0])


def test_severity_increases_distance(smooth_images):
    suite = shift.fmnist_corruptions(smooth_images)
    clean = smooth_images.astype(np.float64)
    for name, by_severity in suite.items():
        distance = [np.abs(by_severity[k].astype(np.float64) - clean).mean() for k in (1, 2, 3)]
        assert 0 < distance[0] < distance[1] < distance[2], (name, distance)


def test_rotation_matches_scipy_inside():
    x = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1)).astype(np.float32)
    mine = shift._rotate_batch(x, 20.0)
    reference = ndimage.rotate(x, -20.0, axes=(1, 2), reshape=False, order=1, mode="constant")
    np.testing.assert_allclose(mine[:, 5:-5, 5:-5], reference[:, 5:-5, 5:-5], atol=1e-3)
    np.testing.assert_array_equal(shift._rotate_batch(x, 0.0), x)


def test_digits_ood():
    digits = shift.digits_ood()
    assert digits.shape == (1797, 28, 28, 1) and digits.dtype == np.uint8
    assert digits.min() == 0 and digits.max() == 255
    np.testing.assert_array_equal(shift.digits_ood(10), digits[:10])
    with pytest.raises(UserError, match="num"):
        shift.digits_ood(0)


def test_fashion_mnist_shift_sets(smooth_images):
    labels = (np.arange(64) % 10).astype(np.int32)
    sets = shift.load_shift_sets("FashionMNIST_x28", "/nonexistent", Split(smooth_images, labels))
    assert sorted(sets.shift) == sorted(f"{c}_s{k}" for c in shift.FMNIST_CORRUPTIONS for k in (1, 2, 3))
    for split in sets.shift.values():
        assert split.images.shape == smooth_images.shape and split.images.dtype == np.uint8
        np.testing.assert_array_equal(split.labels, labels)
    assert list(sets.ood) == ["digits"] and sets.ood["digits"].shape == (1797, 28, 28, 1)


def _cifar_images(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_cifar10_shift_sets(tmp_path):
    c = tmp_path / "CIFAR-10-C"
    c.mkdir()
    fog = _cifar_images(20)  # 5 severities x 4
    np.save(c / "fog.npy", fog)
    np.save(c / "gaussian_noise.npy", _cifar_images(20, 1))
    np.save(c / "labels.npy", np.tile(np.arange(4), 5).astype(np.uint8))
    (tmp_path / "CIFAR-10.1").mkdir()
    np.save(tmp_path / "CIFAR-10.1" / "cifar10.1_v6_data.npy", _cifar_images(6, 2))
    np.save(tmp_path / "CIFAR-10.1" / "cifar10.1_v6_labels.npy", np.arange(6))
    (tmp_path / "CIFAR-10.2").mkdir()
    with open(tmp_path / "CIFAR-10.2" / "cifar102_test.npy", "wb") as f:  # an .npz under the .npy name
        np.savez(f, images=_cifar_images(5, 3), labels=np.arange(5), label_names=np.array(["a", "b"]))
    (tmp_path / "STL10").mkdir()
    stl = np.repeat(np.repeat(_cifar_images(10, 4), 3, axis=1), 3, axis=2)  # 96x96, constant 3x3 blocks
    np.save(tmp_path / "STL10" / "test_images.npy", stl)
    np.save(tmp_path / "STL10" / "test_labels.npy", np.arange(1, 11))  # official 1..10
    (tmp_path / "SVHN").mkdir()
    np.save(tmp_path / "SVHN" / "test_images.npy", _cifar_images(7, 5))

    sets = shift.load_shift_sets("CIFAR10_x32", str(tmp_path))
    expected = {f"{c}_s{k}" for c in ("fog", "gaussian_noise") for k in range(1, 6)}
    assert set(sets.shift) == expected | {"cifar10.1", "cifar10.2", "stl10"}
    np.testing.assert_array_equal(sets.shift["fog_s3"].images, fog[8:12])
    np.testing.assert_array_equal(sets.shift["fog_s3"].labels, np.arange(4))
    assert sets.shift["fog_s1"].labels.dtype == np.int32 and sets.shift["fog_s1"].images.flags.c_contiguous
    assert len(sets.shift["cifar10.1"]) == 6 and len(sets.shift["cifar10.2"]) == 5
    stl10 = sets.shift["stl10"]
    np.testing.assert_array_equal(stl10.labels, [0, 2, 1, 3, 4, 5, 7, 8, 9])  # monkey dropped
    keep = [0, 1, 2, 3, 4, 5, 6, 8, 9]
    np.testing.assert_array_equal(stl10.images, _cifar_images(10, 4)[keep])  # block mean of constant blocks
    assert list(sets.ood) == ["svhn"] and sets.ood["svhn"].shape == (7, 32, 32, 3)

    c100 = shift.load_shift_sets("CIFAR100_x32", str(tmp_path))
    assert c100.shift == {} and list(c100.ood) == ["svhn"]


def test_cifar_missing_sets_skipped_malformed_raise(tmp_path):
    empty = shift.load_shift_sets("CIFAR10_x32", str(tmp_path))
    assert empty.shift == {} and empty.ood == {}
    (tmp_path / "CIFAR-10-C").mkdir()
    np.save(tmp_path / "CIFAR-10-C" / "fog.npy", _cifar_images(10))
    with pytest.raises(UserError, match="labels.npy is missing"):
        shift.load_shift_sets("CIFAR10_x32", str(tmp_path))
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", np.zeros(10, np.int64))
    assert len(shift.load_shift_sets("CIFAR10_x32", str(tmp_path)).shift) == 5
    np.save(tmp_path / "CIFAR-10-C" / "fog.npy", _cifar_images(10, size=28))
    with pytest.raises(UserError, match="fog.npy"):
        shift.load_shift_sets("CIFAR10_x32", str(tmp_path))
    (tmp_path / "CIFAR-10-C" / "fog.npy").unlink()
    (tmp_path / "CIFAR-10.1").mkdir()
    np.save(tmp_path / "CIFAR-10.1" / "cifar10.1_v6_data.npy", _cifar_images(3))
    with pytest.raises(UserError, match="cifar10.1_v6_labels.npy is missing"):
        shift.load_shift_sets("CIFAR10_x32", str(tmp_path))
    with pytest.raises(UserError, match="did you mean"):
        shift.load_shift_sets("cifar10", str(tmp_path))
