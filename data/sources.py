"""Random-access sources for the streaming input path: data sets that do not fit on a device.

    source = ImageFolderSource("/data/imagenet/train")
    len(source)                  # number of images
    source[i]                    # {"image": uint8 [H, W, C], "label": int}  (label -1: unlabeled)
    source.labels                # int32 [N], read without decoding any image
    source.num_classes, source.channels, source.description

A source is what the loader (grain) indexes: picklable, since it is sent to the loader's worker
processes, and it decodes in `__getitem__`, so decoding runs in those workers. Construction reads
only the index (a folder listing, a list file, a TFDS data set's metadata); no file handle is kept
open on the object, and a TFDS source reopens its data set after unpickling.

Images decode with Pillow into RGB (3 channels), or into "L" (1 channel, [H, W, 1]) for a source
made with `channels=1`; a grayscale file in an RGB source becomes three equal channels. Every
problem with the input is a one-line `UserError` naming the file (and the line, for list files).

Sources:
  ImageFolderSource  an ImageNet-style folder `root/<class>/**/*.{jpg,jpeg,png,bmp,webp,...}`;
                     classes are the sorted subfolder names -> 0..K-1 (as torchvision's
                     ImageFolder; hidden folders such as `.ipynb_checkpoints` are skipped).
  ListFileSource     a list file of `relative/path label` lines (ImageNet_LT_train.txt,
                     iNaturalist18_train.txt, Places_LT_train.txt) with images under `image_root`.
  UnlabeledSource    unlabeled images (CC3M-like): every image under a folder, or a list file.
  TfdsSource         a TFDS data set by name, read through `tfds.data_source` (array_record files,
                     no TensorFlow needed).
  ArraySource        in-memory uint8 arrays (the on-device sets, tests).
"""
from __future__ import annotations

import contextlib
import io
import operator
import os

import numpy as np

from utils.errors import UserError, first_line

# As torchvision's IMG_EXTENSIONS; matched case-insensitively (.JPEG, .PNG, ...).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class NoImagesError(UserError):
    """A folder that holds no image files (the catalog treats it as 'not here' and looks on)."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(path: str, channels: int = 3) -> np.ndarray:
    """The image at `path` as uint8 [H, W, channels] (channels 3: RGB, 1: luminance)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = _convert(image, channels)
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image file {path} does not exist") from None
    except Exception as error:  # noqa: BLE001 - any decoding failure is a problem with the file
        raise UserError(f"cannot read image {path}: {first_line(error)}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def _convert(image, channels: int):
    """`image` in mode RGB or L; 16-bit grayscale is scaled to 8 bits rather than clipped."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # as Pillow asks, before dropping the alpha channel
    return image.convert("L" if channels == 1 else "RGB")


def _check_channels(channels) -> int:
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _encode_paths(paths: list[str]) -> np.ndarray:
    """Relative paths as one bytes array: compact to pickle for a million files."""
    return np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)


class Source:
    """What every source has: `labels` (int32 [N], -1 where unlabeled), `num_classes` (None when
    unlabeled), `channels`, `description` (where it reads from, for logs)."""

    labels: np.ndarray
    num_classes: int | None
    channels: int
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    def _index(self, index) -> int:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for {n} examples of {self.description}")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} examples, {self.description})"


class _FileSource(Source):
    """Image files at `root`/<relative path>, with labels."""

    root: str
    paths: np.ndarray  # bytes [N], relative to root

    def path(self, index) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[self._index(index)]))

    def __getitem__(self, index) -> dict:
        i = self._index(index)
        image = decode_image(os.path.join(self.root, os.fsdecode(self.paths[i])), self.channels)
        return {"image": image, "label": int(self.labels[i])}


# ----------------------------------------------------------------------------- image folders


def list_classes(root: str) -> list[str]:
    """The class folder names under `root`, sorted (hidden folders skipped)."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _walk_images(directory: str) -> list[str]:
    """Every image file under `directory`, recursively, as sorted paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, directory)
        for name in filenames:
            if is_image_file(name):
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


class ImageFolderSource(_FileSource):
    """An ImageNet-style folder `root/<class>/*.JPEG`: classes are the sorted subfolder names.

    classes: the class names that set the label indices (a val folder uses its train folder's,
    so a class missing from val does not shift the others); every subfolder must be one of them.
    Without it, every class folder must hold at least one image (as torchvision's ImageFolder).
    """

    def __init__(self, root, channels: int = 3, classes: list[str] | None = None):
        self.root = os.fspath(root)
        self.channels = _check_channels(channels)
        if not os.path.isdir(self.root):
            raise UserError(f"image folder {self.root} does not exist")
        found = list_classes(self.root)
        if not found:
            with os.scandir(self.root) as entries:
                flat = sum(1 for e in entries if e.is_file() and is_image_file(e.name))
            if flat:
                raise UserError(
                    f"{self.root} holds {flat} images but no class folders: an image folder needs "
                    f"<root>/<class>/<image> (ImageNet's val images must first be sorted into their "
                    f"<wnid> folders, e.g. with the widely used valprep.sh)"
                )
            raise NoImagesError(f"{self.root} holds no class folders with images")
        if classes is None:
            self.class_names = found
        else:
            self.class_names = list(classes)
            unknown = sorted(set(found) - set(self.class_names))
            if unknown:
                raise UserError(
                    f"{self.root} has class folders that the label set lacks: {', '.join(unknown[:5])}"
                    f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} of {len(found)})"
                )
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            class_dir = os.path.join(self.root, name)
            files = _walk_images(class_dir) if os.path.isdir(class_dir) else []
            if not files and classes is None:
                raise UserError(
                    f"class folder {class_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            paths += [os.path.join(name, f) for f in files]
            labels += [label] * len(files)
        if not paths:
            raise NoImagesError(f"{self.root} holds no image files in its class folders")
        self.paths = _encode_paths(paths)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.num_classes = len(self.class_names)
        self.description = f"image folder {self.root} ({len(paths)} images, {self.num_classes} classes)"


# -------------------------------------------------------------------------------- list files


def _read_list_file(list_file: str, *, labeled: bool) -> tuple[list[str], list[int]]:
    """(paths, labels) from a list file; labeled: `path label` lines, else `path [label]`."""
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"list file {list_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read list file {list_file}: {first_line(error)}") from None
    paths, labels = [], []
    expected = "`relative/path label`" if labeled else "`relative/path` or `relative/path label`"
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        ok = len(fields) == 2 if labeled else len(fields) in (1, 2)
        label = -1
        if ok and labeled:
            try:
                label = int(fields[1])
            except ValueError:
                ok = False
            else:
                ok = label >= 0
        if not ok:
            raise UserError(
                f"{list_file} line {number}: expected {expected} (a path without spaces, "
                f"a label >= 0), got {line.strip()[:80]!r}"
            )
        paths.append(fields[0])
        labels.append(label)
    if not paths:
        raise UserError(f"list file {list_file} lists no images")
    return paths, labels


def _check_first_image(list_file: str, image_root: str, first: str) -> None:
    """A wrong image root is caught at once, not a million reads later."""
    path = os.path.join(image_root, first)
    if not os.path.exists(path):
        raise UserError(
            f"{list_file} lists {first}, which is not at {path}: is the image root {image_root} right?"
        )


class ListFileSource(_FileSource):
    """`relative/path label` lines (the long-tailed sets' list files), images under `image_root`.

    Blank lines are skipped; a path may hold no spaces; labels are integers >= 0.
    num_classes: the number of classes (labels must be below it); default max label + 1.
    """

    def __init__(self, list_file, image_root, num_classes: int | None = None, channels: int = 3):
        self.list_file = os.fspath(list_file)
        self.root = os.fspath(image_root)
        self.channels = _check_channels(channels)
        paths, labels = _read_list_file(self.list_file, labeled=True)
        self.labels = np.asarray(labels, dtype=np.int32)
        top = int(self.labels.max())
        if num_classes is not None and top >= num_classes:
            number = _line_number(self.list_file, int(np.argmax(self.labels)))
            raise UserError(
                f"{self.list_file} line {number}: label {top} is out of range for {num_classes} classes"
            )
        self.num_classes = int(num_classes) if num_classes is not None else top + 1
        _check_first_image(self.list_file, self.root, paths[0])
        self.paths = _encode_paths(paths)
        self.description = f"list {self.list_file} ({len(paths)} images under {self.root})"


def _line_number(list_file: str, entry: int) -> int:
    """The line number of the entry-th (0-based) non-blank line."""
    with open(list_file, encoding="utf-8") as f:
        seen = -1
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == entry:
                    return number
    return -1


class UnlabeledSource(_FileSource):
    """Unlabeled images (CC3M-like), label -1: every image file under the folder `path`
    (recursively, sorted), or the images a list file names (`relative/path` per line, an optional
    trailing label ignored) under `image_root` (default: the list file's folder)."""

    def __init__(self, path, image_root=None, channels: int = 3):
        path = os.fspath(path)
        self.channels = _check_channels(channels)
        self.num_classes = None
        if os.path.isdir(path):
            self.root = path
            paths = _walk_images(path)
            if not paths:
                raise NoImagesError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            self.description = f"folder {path} ({len(paths)} unlabeled images)"
        elif os.path.isfile(path):
            self.root = os.fspath(image_root) if image_root is not None else os.path.dirname(path)
            paths, _ = _read_list_file(path, labeled=False)
            _check_first_image(path, self.root, paths[0])
            self.description = f"list {path} ({len(paths)} unlabeled images under {self.root})"
        else:
            raise UserError(f"{path} is neither a folder of images nor a list file")
        self.paths = _encode_paths(paths)
        self.labels = np.full(len(paths), -1, dtype=np.int32)


# ------------------------------------------------------------------------------------- TFDS


def _import_tfds():
    import tensorflow_datasets as tfds

    return tfds


def tfds_build_command(name: str, data_dir: str) -> str:
    return f"tfds build {name} --data_dir {data_dir} --file_format=array_record"


class TfdsSource(Source):
    """A TFDS data set by name (with its config: `cifar10_corrupted/gaussian_noise_5`), read from
    array_record files in `data_dir` through `tfds.data_source`, without TensorFlow.

    The feature `image` (else the first Image feature) is the image and `label` the label; a set
    without a `label` feature is unlabeled (-1). channels: None keeps the set's own.
    Pickling keeps name, split and data_dir; the copy reopens the data set on first use.
    """

    def __init__(self, name: str, split: str, data_dir, channels: int | None = None):
        self.name = str(name)
        self.split = str(split)
        self.data_dir = os.fspath(data_dir)
        self._data_source = None
        self._labels = None
        source = self._source()
        tfds = _import_tfds()
        features = source.dataset_info.features
        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        if "image" in features:
            self.image_key = "image"
        elif images:
            self.image_key = images[0]
        else:
            raise UserError(f"TFDS {self.name} has no image feature (its features: {', '.join(features)})")
        self.label_key = "label" if "label" in features else None
        label_feature = features[self.label_key] if self.label_key else None
        self.num_classes = (
            int(label_feature.num_classes) if isinstance(label_feature, tfds.features.ClassLabel) else None
        )
        shape = tuple(getattr(features[self.image_key], "shape", ()) or ())
        native = shape[-1] if len(shape) == 3 and shape[-1] in (1, 3) else 3
        self.native_channels = int(native)
        self.channels = self.native_channels if channels is None else _check_channels(channels)
        self._length = len(source)
        self.description = f"TFDS {self.name} split {self.split} in {self.data_dir} ({self._length} examples)"

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data_source"] = None  # holds open readers; reopened in the worker
        return state

    def _source(self):
        if self._data_source is None:
            self._data_source = self._open()
        return self._data_source

    def _open(self, **kwargs):
        tfds = _import_tfds()
        try:
            return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False, **kwargs)
        except tfds.core.DatasetNotFoundError as error:
            raise UserError(f"TFDS knows no data set {self.name!r}: {first_line(error)}") from None
        except Exception as error:  # noqa: BLE001 - explained below from the builder's state
            raise self._explain(tfds, error) from None

    def _explain(self, tfds, error: Exception) -> UserError:
        """One line for a data set that would not open: not built here, wrong format, no split."""
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except Exception:  # noqa: BLE001
            return UserError(f"cannot open TFDS {self.name} in {self.data_dir}: {first_line(error)}")
        if not builder.is_prepared():
            manual = ""
            if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
                manual = (
                    f" ({self.name} is a manual-download set: put its files, e.g. the ILSVRC2012 tar "
                    f"files from image-net.org, in {os.path.join(self.data_dir, 'downloads', 'manual')} first)"
                )
            return UserError(
                f"TFDS data set {self.name} not found: looked in {builder.data_dir}; get it with "
                f"`{tfds_build_command(self.name, self.data_dir)}`{manual}"
            )
        file_format = str(getattr(builder.info, "file_format", "")).lower()
        if "array_record" not in file_format and "parquet" not in file_format:
            return UserError(
                f"TFDS {self.name} in {builder.data_dir} is stored as {file_format or 'an unknown format'}, "
                f"which has no random access: rebuild it with `{tfds_build_command(self.name, self.data_dir)}` "
                f"into an empty data_dir, or convert it with `tfds convert_format`"
            )
        splits = list(builder.info.splits)
        if splits and self.split.split("[")[0] not in splits:
            return UserError(f"TFDS {self.name} has no split {self.split!r}; its splits: {', '.join(splits)}")
        return UserError(f"cannot open TFDS {self.name} split {self.split} in {self.data_dir}: {first_line(error)}")

    def __getitem__(self, index) -> dict:
        i = self._index(index)
        source = self._source()
        try:
            example = source[i]
        except Exception as error:  # noqa: BLE001 - a record that will not decode
            raise UserError(
                f"cannot read example {i} of TFDS {self.name} split {self.split} in {self.data_dir}: "
                f"{first_line(error)}"
            ) from None
        image = np.asarray(example[self.image_key], dtype=np.uint8)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[-1] != self.channels:
            image = _to_channels(image, self.channels)
        label = int(example[self.label_key]) if self.label_key else -1
        return {"image": image, "label": label}

    @property
    def labels(self) -> np.ndarray:
        """Every example's label, read once (images skipped where TFDS allows) and cached."""
        if self._labels is None:
            n = self._length
            if self.label_key is None:
                self._labels = np.full(n, -1, dtype=np.int32)
            else:
                self._labels = self._read_labels(n)
        return self._labels

    def _read_labels(self, n: int) -> np.ndarray:
        tfds = _import_tfds()
        source = self._source()
        try:  # skip the image decoding; not every TFDS path supports it (its mock_data does not)
            fast = self._open(decoders={self.image_key: tfds.decode.SkipDecoding()})
            with contextlib.redirect_stdout(io.StringIO()):  # a failed probe prints a banner
                if n:
                    _ = fast[0]
            source = fast
        except Exception:  # noqa: BLE001 - fall back to full decoding
            pass
        key = self.label_key
        return np.fromiter((int(source[i][key]) for i in range(n)), dtype=np.int32, count=n)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3 and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and image.shape[-1] == 3:
        from PIL import Image

        return np.asarray(Image.fromarray(image, "RGB").convert("L"), dtype=np.uint8)[:, :, None]
    raise UserError(f"cannot convert a {image.shape[-1]}-channel image to {channels} channels")


# ---------------------------------------------------------------------------------- in memory


class ArraySource(Source):
    """In-memory uint8 images [N, H, W, C] and int labels [N] (None: unlabeled, -1)."""

    def __init__(self, images, labels=None, num_classes: int | None = None, description: str = "in-memory arrays"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype}{list(images.shape)}")
        if labels is None:
            labels = np.full(len(images), -1, dtype=np.int32)
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers [{len(images)}], got {labels.dtype}{list(labels.shape)}")
        self.images = images
        self.labels = labels.astype(np.int32)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.channels = int(images.shape[-1])
        self.description = f"{description} ({len(images)} images)"

    def __getitem__(self, index) -> dict:
        i = self._index(index)
        return {"image": np.array(self.images[i]), "label": int(self.labels[i])}


def class_counts(source, num_classes: int | None = None) -> np.ndarray:
    """Examples per class (int64 [K]) from `source.labels`, no image decoded; unlabeled (-1)
    examples are not counted. K: num_classes, else the source's, else max label + 1."""
    labels = np.asarray(source.labels)
    labeled = labels[labels >= 0]
    k = num_classes if num_classes is not None else getattr(source, "num_classes", None)
    if k is None:
        k = int(labeled.max()) + 1 if labeled.size else 0
    if labeled.size and int(labeled.max()) >= k:
        raise UserError(f"{source.description}: label {int(labeled.max())} is out of range for {k} classes")
    return np.bincount(labeled, minlength=k).astype(np.int64)
