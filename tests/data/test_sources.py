"""data/sources.py and data/catalog.py on small files written by the tests (TFDS through its mock)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from data import catalog, sources
from utils.errors import UserError


def rgb(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(h: int = 32, w: int = 32) -> np.ndarray:
    """A gradient: JPEG keeps it within a few levels."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def save(path, array: np.ndarray, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path, **kwargs)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def roundtrip(source):
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy) == len(source)
    return copy


# ------------------------------------------------------------------------------- image folders


def test_image_folder_classes_sorted_and_png_exact(tmp_path):
    images = {("zebra", "b.png"): rgb(0), ("zebra", "a.png"): rgb(1), ("ant", "x.png"): rgb(2),
              ("moth", "sub/deep.png"): rgb(3)}
    for (cls, name), array in images.items():
        save(tmp_path / cls / name, array)
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    source = sources.ImageFolderSource(tmp_path)
    assert source.class_names == ["ant", "moth", "zebra"] and source.num_classes == 3
    assert len(source) == 4 and source.channels == 3
    expected = [("ant", "x.png"), ("moth", "sub/deep.png"), ("zebra", "a.png"), ("zebra", "b.png")]
    assert source.labels.dtype == np.int32 and source.labels.tolist() == [0, 1, 2, 2]
    for i, key in enumerate(expected):
        item = source[i]
        assert item["image"].dtype == np.uint8 and isinstance(item["label"], int)
        np.testing.assert_array_equal(item["image"], images[key])
        assert item["label"] == source.class_names.index(key[0])
    np.testing.assert_array_equal(source[-1]["image"], images[("zebra", "b.png")])
    with pytest.raises(IndexError):
        source[4]


def test_jpeg_within_tolerance_grayscale_and_one_channel(tmp_path):
    image = smooth()
    save(tmp_path / "a" / "img.JPEG", image, quality=95)
    gray = np.random.default_rng(5).integers(0, 256, (7, 9, 1), dtype=np.uint8)
    save(tmp_path / "b" / "gray.png", gray)
    source = sources.ImageFolderSource(tmp_path)
    decoded = source[0]["image"]
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded.astype(int) - image).mean() < 3
    as_rgb = source[1]["image"]  # grayscale file in an RGB source: three equal channels
    assert as_rgb.shape == (7, 9, 3)
    for c in range(3):
        np.testing.assert_array_equal(as_rgb[:, :, c], gray[:, :, 0])
    single = sources.ImageFolderSource(tmp_path, channels=1)
    assert single.channels == 1
    np.testing.assert_array_equal(single[1]["image"], gray)
    lum = single[0]["image"]
    assert lum.shape == (32, 32, 1)
    expected = np.asarray(Image.open(tmp_path / "a" / "img.JPEG").convert("L"))
    np.testing.assert_array_equal(lum[:, :, 0], expected)


def test_image_folder_errors(tmp_path):
    save(tmp_path / "flat" / "img.png", rgb(0))
    with pytest.raises(UserError, match="no class folders") as error:
        sources.ImageFolderSource(tmp_path / "flat")
    one_line(error)
    (tmp_path / "empty_class" / "a").mkdir(parents=True)
    save(tmp_path / "empty_class" / "b" / "x.png", rgb(0))
    with pytest.raises(UserError, match="empty_class/a holds no image"):
        sources.ImageFolderSource(tmp_path / "empty_class")
    # with the label set given, an empty or absent class is fine and indices follow the set
    given = sources.ImageFolderSource(tmp_path / "empty_class", classes=["a", "b", "c"])
    assert given.num_classes == 3 and given.labels.tolist() == [1]
    with pytest.raises(UserError, match="lacks: b"):
        sources.ImageFolderSource(tmp_path / "empty_class", classes=["a"])
    with pytest.raises(UserError, match="does not exist"):
        sources.ImageFolderSource(tmp_path / "nowhere")


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "c" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    source = sources.ImageFolderSource(tmp_path)
    with pytest.raises(UserError, match="broken.jpg") as error:
        source[0]
    assert str(bad) in one_line(error)
    os.unlink(bad)
    with pytest.raises(UserError, match="does not exist"):
        source[0]


# ---------------------------------------------------------------------------------- list files


def write_list_set(root, entries, *, blank_lines=True):
    """Images under root/images and a list file root/list.txt of `path label` lines."""
    lines = []
    for rel, label, array in entries:
        save(root / "images" / rel, array)
        lines.append(f"{rel} {label}")
        if blank_lines:
            lines.append("")
    (root / "list.txt").write_text("\n".join(lines) + "\n\n")
    return root / "list.txt", root / "images"


def test_list_file_labels_paths_and_blank_lines(tmp_path):
    entries = [("train/n02/b.png", 7, rgb(0)), ("train/n01/a.png", 2, rgb(1)), ("val/c.png", 2, rgb(2))]
    list_file, image_root = write_list_set(tmp_path, entries)
    source = sources.ListFileSource(list_file, image_root)
    assert len(source) == 3 and source.num_classes == 8  # max label + 1
    assert source.labels.tolist() == [7, 2, 2]
    for i, (rel, label, array) in enumerate(entries):
        assert source.path(i) == os.path.join(str(image_root), rel)
        item = source[i]
        assert item["label"] == label
        np.testing.assert_array_equal(item["image"], array)
    assert sources.ListFileSource(list_file, image_root, num_classes=1000).num_classes == 1000
    counts = sources.class_counts(source)
    assert counts.tolist() == [0, 0, 2, 0, 0, 0, 0, 1]
    assert sources.class_counts(source, num_classes=10).shape == (10,)


def test_list_file_errors(tmp_path):
    save(tmp_path / "a.png", rgb(0))
    for bad, number in [("a.png 1\n\nb c.png 2\n", 3), ("a.png 1\nb.png\n", 2), ("a.png x\n", 1),
                        ("a.png 0\na.png -1\n", 2)]:
        (tmp_path / "l.txt").write_text(bad)
        with pytest.raises(UserError, match=f"l.txt line {number}:") as error:
            sources.ListFileSource(tmp_path / "l.txt", tmp_path)
        one_line(error)
    (tmp_path / "l.txt").write_text("a.png 0\n\na.png 5\n")
    with pytest.raises(UserError, match="line 3: label 5 is out of range for 3 classes"):
        sources.ListFileSource(tmp_path / "l.txt", tmp_path, num_classes=3)
    with pytest.raises(UserError, match="is the image root"):
        sources.ListFileSource(tmp_path / "l.txt", tmp_path / "elsewhere")
    with pytest.raises(UserError, match="does not exist"):
        sources.ListFileSource(tmp_path / "missing.txt", tmp_path)


def test_unlabeled_folder_recursive_and_list(tmp_path):
    arrays = {"b/2.png": rgb(0), "a/x/1.png": rgb(1), "c.png": rgb(2)}
    for rel, array in arrays.items():
        save(tmp_path / "imgs" / rel, array)
    (tmp_path / "imgs" / "captions.txt").write_text("ignored")
    folder = sources.UnlabeledSource(tmp_path / "imgs")
    assert len(folder) == 3 and folder.num_classes is None
    assert folder.labels.tolist() == [-1, -1, -1]
    for i, rel in enumerate(sorted(arrays)):
        item = folder[i]
        assert item["label"] == -1
        np.testing.assert_array_equal(item["image"], arrays[rel])
    # a list file: relative paths, an optional trailing label ignored; images beside the list
    (tmp_path / "imgs" / "train.txt").write_text("c.png\n\nb/2.png 4\n")
    listed = sources.UnlabeledSource(tmp_path / "imgs" / "train.txt")
    assert len(listed) == 2 and listed.labels.tolist() == [-1, -1]
    np.testing.assert_array_equal(listed[1]["image"], arrays["b/2.png"])
    assert listed[1]["label"] == -1
    elsewhere = tmp_path / "train.txt"
    elsewhere.write_text("a/x/1.png\n")
    np.testing.assert_array_equal(
        sources.UnlabeledSource(elsewhere, image_root=tmp_path / "imgs")[0]["image"], arrays["a/x/1.png"]
    )
    assert sources.class_counts(listed).tolist() == []
    (tmp_path / "bad.txt").write_text("a b c\n")
    with pytest.raises(UserError, match="bad.txt line 1"):
        sources.UnlabeledSource(tmp_path / "bad.txt")
    (tmp_path / "none").mkdir()
    with pytest.raises(sources.NoImagesError):
        sources.UnlabeledSource(tmp_path / "none")


def test_array_source():
    images = np.stack([rgb(i) for i in range(4)])
    source = sources.ArraySource(images, np.array([3, 1, 1, 0]), num_classes=5)
    assert len(source) == 4 and source.channels == 3 and source.num_classes == 5
    np.testing.assert_array_equal(source[2]["image"], images[2])
    assert source[2]["label"] == 1
    assert sources.class_counts(source).tolist() == [1, 2, 0, 1, 0]
    assert sources.ArraySource(images).labels.tolist() == [-1] * 4
    with pytest.raises(ValueError):
        sources.ArraySource(images.astype(np.float32))


def test_every_file_source_pickles_and_reads(tmp_path):
    save(tmp_path / "f" / "k" / "a.png", rgb(0))
    (tmp_path / "f" / "l.txt").write_text("k/a.png 3\n")
    made = [
        sources.ImageFolderSource(tmp_path / "f"),
        sources.ListFileSource(tmp_path / "f" / "l.txt", tmp_path / "f"),
        sources.UnlabeledSource(tmp_path / "f"),
        sources.UnlabeledSource(tmp_path / "f" / "l.txt"),
        sources.ArraySource(rgb(0)[None], [3]),
    ]
    for source in made:
        copy = roundtrip(source)
        np.testing.assert_array_equal(copy[0]["image"], rgb(0))
        assert copy[0]["label"] == source[0]["label"]
        assert copy.description == source.description and copy.channels == 3


# ---------------------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_source_through_mock(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.TfdsSource("cifar10", "train", tmp_path)
        assert len(source) == 6 and source.num_classes == 10 and source.channels == 3
        first = source[0]
        assert first["image"].shape == (32, 32, 3) and first["image"].dtype == np.uint8
        assert isinstance(first["label"], int) and 0 <= first["label"] < 10
        assert source._data_source is not None
        copy = roundtrip(source)
        assert copy._data_source is None  # the open data source does not travel
        again = copy[0]
        np.testing.assert_array_equal(again["image"], first["image"])
        assert again["label"] == first["label"]
        labels = [source[i]["label"] for i in range(6)]
        assert source.labels.tolist() == labels
        assert sources.class_counts(source).tolist() == np.bincount(labels, minlength=10).tolist()
        gray = sources.TfdsSource("fashion_mnist", "test", tmp_path)
        assert gray.channels == 1 and gray[0]["image"].shape == (28, 28, 1)
        as_rgb = sources.TfdsSource("fashion_mnist", "test", tmp_path, channels=3)[0]["image"]
        assert as_rgb.shape == (28, 28, 3)
        np.testing.assert_array_equal(as_rgb, np.repeat(gray[0]["image"], 3, axis=-1))


def write_tfds_cifar10(tfds, data_dir, images, labels, *, file_format="array_record"):
    """A real TFDS cifar10 train split of `images` in `data_dir`, written without TensorFlow: PNG
    bytes in tf.train.Example records in one array_record shard, and TFDS's metadata."""
    import io

    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.proto import tf_example_pb2

    builder = tfds.builder("cifar10", data_dir=data_dir, file_format=file_format)
    os.makedirs(builder.data_dir)
    writer = ArrayRecordWriter(os.path.join(builder.data_dir, "cifar10-train.array_record-00000-of-00001"),
                               "group_size:1")
    for i, (image, label) in enumerate(zip(images, labels)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        example = tf_example_pb2.Example()
        example.features.feature["image"].bytes_list.value.append(buffer.getvalue())
        example.features.feature["label"].int64_list.value.append(int(label))
        example.features.feature["id"].bytes_list.value.append(f"train_{i}".encode())
        writer.write(example.SerializeToString())
    writer.close()
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name="cifar10", split="train", filetype_suffix="array_record",
    )
    split = tfds.core.SplitInfo(name="train", shard_lengths=[len(labels)], num_bytes=0, filename_template=template)
    builder.info.set_splits(tfds.core.SplitDict([split]))
    builder.info.write_to_directory(builder.data_dir)


def test_tfds_source_on_real_array_record_files(tfds, tmp_path, monkeypatch):
    images = np.stack([rgb(i, 32, 32) for i in range(5)])
    labels = [3, 1, 4, 1, 5]
    data_dir = tmp_path / "tensorflow_datasets"
    write_tfds_cifar10(tfds, data_dir, images, labels)
    source = sources.TfdsSource("cifar10", "train", data_dir)
    assert len(source) == 5 and source.num_classes == 10
    for i in range(5):
        np.testing.assert_array_equal(source[i]["image"], images[i])
        assert source[i]["label"] == labels[i]
    copy = roundtrip(source)
    np.testing.assert_array_equal(copy[4]["image"], images[4])
    # the labels are read without decoding an image
    monkeypatch.setattr(tfds.features.Image, "decode_example_np", lambda *a, **k: 1 / 0)
    assert copy.labels.tolist() == labels
    assert sources.class_counts(copy).tolist() == [0, 2, 0, 1, 1, 1, 0, 0, 0, 0]
    monkeypatch.undo()
    # the catalog finds it under <data_root>/tensorflow_datasets
    found = catalog.open_split("tfds:cifar10", tmp_path, "train")
    np.testing.assert_array_equal(found[0]["image"], images[0])
    with pytest.raises(UserError, match="no split 'test'; its splits: train") as error:
        sources.TfdsSource("cifar10", "test", data_dir)
    one_line(error)
    # a set built as tfrecord has no random access: say so, and how to rebuild
    write_tfds_cifar10(tfds, tmp_path / "tfrecord", images, labels, file_format="tfrecord")
    with pytest.raises(UserError, match="tfrecord.*no random access.*--file_format=array_record") as error:
        sources.TfdsSource("cifar10", "train", tmp_path / "tfrecord")
    one_line(error)


def test_tfds_missing_data_set_is_one_line(tfds, tmp_path, monkeypatch):
    downloads = []
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", lambda *a, **k: downloads.append(a))
    with pytest.raises(UserError, match="tfds build cifar10") as error:
        sources.TfdsSource("cifar10", "train", tmp_path / "tfds")
    message = one_line(error)
    assert "--file_format=array_record" in message and str(tmp_path / "tfds") in message
    assert not downloads and not (tmp_path / "tfds").exists()  # nothing downloaded or created
    with pytest.raises(UserError, match="downloads/manual") as error:
        sources.TfdsSource("imagenet2012", "train", tmp_path / "tfds")
    one_line(error)
    with pytest.raises(UserError, match="no_such_set") as error:
        sources.TfdsSource("no_such_set", "train", tmp_path / "tfds")
    one_line(error)


# ------------------------------------------------------------------------------------- catalog


def write_bytes_image(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_imagenet_folder(root, val_classes=(0, 999)):
    """<root>/imagenet/train/<wnid>/ for 1000 wnids (one tiny image each) and a val folder
    holding only some of them."""
    wnids = [f"n{i:08d}" for i in range(1000)]
    data = png_bytes(rgb(9, 2, 2))
    for wnid in wnids:
        write_bytes_image(root / "imagenet" / "train" / wnid / f"{wnid}_1.JPEG", data)
    for k in val_classes:
        save(root / "imagenet" / "val" / wnids[k] / f"ILSVRC2012_val_{k:08d}.JPEG", rgb(k), format="PNG")
    return wnids


def test_catalog_imagenet2012_from_folder(tmp_path):
    wnids = make_imagenet_folder(tmp_path)
    train = catalog.open_split("imagenet2012", tmp_path, "train")
    assert isinstance(train, sources.ImageFolderSource)
    assert len(train) == 1000 and train.num_classes == 1000 and train.class_names == wnids
    val = catalog.open_split("imagenet2012", tmp_path, "val")
    assert val.labels.tolist() == [0, 999]  # train's class indices, though val holds two classes
    np.testing.assert_array_equal(val[1]["image"], rgb(999))
    spec = catalog.get_streamed_spec("imagenet2012")
    assert spec.num_classes == 1000 and spec.image_size == 224 and spec.pixel_mean == (0.485, 0.456, 0.406)
    with pytest.raises(UserError, match="no 'test' split"):
        catalog.open_split("imagenet2012", tmp_path, "test")


def test_catalog_imagenet_lt_from_list(tmp_path):
    save(tmp_path / "imagenet" / "train" / "n01440764" / "n01440764_10026.JPEG", rgb(1), format="PNG")
    save(tmp_path / "imagenet" / "val" / "n01443537" / "v.JPEG", rgb(2), format="PNG")
    (tmp_path / "ImageNet_LT").mkdir()
    (tmp_path / "ImageNet_LT" / "ImageNet_LT_train.txt").write_text(
        "train/n01440764/n01440764_10026.JPEG 0\nval/n01443537/v.JPEG 1\n"
    )
    source = catalog.open_split("ImageNet_LT", tmp_path, "train")
    assert isinstance(source, sources.ListFileSource) and source.num_classes == 1000
    assert source.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(source[1]["image"], rgb(2))
    assert sources.class_counts(source).shape == (1000,)
    with pytest.raises(UserError) as error:
        catalog.open_split("ImageNet_LT", tmp_path, "test")
    message = one_line(error)
    assert str(tmp_path / "ImageNet_LT" / "ImageNet_LT_test.txt") in message and "OLTR" in message


def test_catalog_nothing_found_lists_every_place(tmp_path):
    with pytest.raises(UserError) as error:
        catalog.open_split("imagenet2012", tmp_path, "val")
    message = one_line(error)
    assert "imagenet2012 (val split) not found" in message
    assert f"TFDS imagenet2012 (validation) in {tmp_path / 'tensorflow_datasets'}" in message
    assert str(tmp_path / "imagenet" / "val") in message and "tfds build imagenet2012" in message
    (tmp_path / "cc3m").mkdir()
    with pytest.raises(UserError) as error:
        catalog.open_split("cc3m", tmp_path, "train")
    message = one_line(error)
    assert str(tmp_path / "cc3m" / "train.txt") in message and "present, no images" in message


def test_catalog_unlabeled_tfds_and_folder_names(tfds, tmp_path):
    save(tmp_path / "cc3m" / "00000" / "000000001.jpg", rgb(0), format="PNG")
    cc3m = catalog.open_split("cc3m", tmp_path, "train")
    assert isinstance(cc3m, sources.UnlabeledSource) and cc3m.num_classes is None and len(cc3m) == 1
    # a TFDS set: found when built under <data_root>/tensorflow_datasets (read through the mock)
    with pytest.raises(UserError, match="tfds build cifar10_corrupted/gaussian_noise_5"):
        catalog.open_split("tfds:cifar10_corrupted/gaussian_noise_5", tmp_path, "test")
    built = tmp_path / "tensorflow_datasets" / "cifar10_corrupted" / "gaussian_noise_5" / "1.0.0"
    built.mkdir(parents=True)
    (built / "dataset_info.json").write_text("{}")
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        source = catalog.open_split("tfds:cifar10_corrupted/gaussian_noise_5", tmp_path, "test")
        assert isinstance(source, sources.TfdsSource) and len(source) == 3
        assert source[0]["image"].shape == (32, 32, 3)
    spec = catalog.get_streamed_spec("tfds:fashion_mnist")
    assert (spec.image_size, spec.channels, spec.num_classes) == (28, 1, 10)
    assert catalog.get_streamed_spec("tfds:stl10").image_size == 96
    with pytest.raises(UserError, match="no 'val' split: it has train, test"):
        catalog.open_split("tfds:cifar10", tmp_path, "val")
    # folder:<path>, relative to data_root
    save(tmp_path / "mine" / "train" / "dog" / "1.png", rgb(1))
    save(tmp_path / "mine" / "train" / "cat" / "1.png", rgb(2))
    save(tmp_path / "mine" / "val" / "dog" / "2.png", rgb(3))
    assert catalog.get_streamed_spec("folder:mine", tmp_path).num_classes == 2
    val = catalog.open_split("folder:mine", tmp_path, "val")
    assert val.labels.tolist() == [1] and val.num_classes == 2
    absolute = catalog.open_split(f"folder:{tmp_path / 'mine'}", "/nonexistent", "train")
    assert absolute.class_names == ["cat", "dog"]


def test_catalog_names():
    assert catalog.is_streamed("ImageNet_LT") and catalog.is_streamed("tfds:cifar10")
    assert catalog.is_streamed("folder:/x") and not catalog.is_streamed("CIFAR10_x32")
    for name, hint in [("imagenet_lt", "ImageNet_LT"), ("Places-LT", "Places_LT"), ("tfds:cifar1O", "cifar10")]:
        with pytest.raises(UserError, match=f"did you mean .*{hint}") as error:
            catalog.get_streamed_spec(name)
        one_line(error)
    with pytest.raises(UserError, match="on-device"):
        catalog.get_streamed_spec("CIFAR10_x32")
    assert catalog.get_streamed_spec("iNaturalist2018").num_classes == 8142
    assert catalog.get_streamed_spec("Places_LT").num_classes == 365
