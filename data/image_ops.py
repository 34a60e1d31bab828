"""ImageNet-style augmentation on the host, in NumPy and Pillow, for the streaming input path.

The streaming loader's workers (grain) call `TrainTransform` or `EvalTransform` on each decoded
example, then `mix_batch` on each assembled batch, before the uint8 batch goes to the devices.

Why NumPy / Pillow here and JAX in `data/augment.py`: small sets sit on the devices as uint8 and
are augmented inside the jitted step, per image, with static shapes (`data/augment.py`). Large sets
(ImageNet and friends) arrive as JPEGs of every size; decoding, cropping and resizing images of
varying shape is host work that overlaps the device step when done in loader processes. No JAX is
imported here, so worker processes stay light and never touch an accelerator.

Randomness: every function takes an explicit `numpy.random.Generator`; the output is a pure
function of the input and the generator's state. The pipeline seeds one generator per example
from (seed, epoch, position), so a resumed run sees the same augmented examples.

Images are uint8 NumPy arrays [H, W, C] with C = 1 (Pillow mode "L") or 3 ("RGB"). Each transform
converts to a PIL image once, applies all its steps in PIL, and converts back once.

Definitions follow the published behaviour of torchvision (RandomResizedCrop, ColorJitter,
Resize + CenterCrop) and timm (RandAugment `rand-m{m}-n{n}-mstd{s}`, Mixup/CutMix in batch mode),
written from their documentation; departures are stated where they are made.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["EvalTransform", "RAND_AUGMENT_OPS", "TrainTransform", "mix_batch"]

_BILINEAR = Image.Resampling.BILINEAR
_FILL_GRAY = 128  # fill for pixels that geometric RandAugment ops bring in from outside the image
_MAX_LEVEL = 10.0  # RandAugment magnitudes live in [0, 10]

# timm's default RandAugment op set (its `_RAND_TRANSFORMS`; Cutout is not part of it).
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# Ops whose argument gets a random sign (timm's `_randomly_negate`).
_SIGNED_OPS = frozenset({
    "Rotate", "Color", "Contrast", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
})
_RA_PROB = 0.5  # each chosen op is applied with this probability (timm's RandAugment default)


# --------------------------------------------------------------------------- array <-> PIL


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected one image [H, W, C] with C = 1 or 3, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    return image


def _to_pil(image: np.ndarray) -> Image.Image:
    # A 2-D uint8 array becomes mode "L", [H, W, 3] becomes "RGB".
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(pil: Image.Image) -> np.ndarray:
    # np.array, not np.asarray: the latter is a read-only view of Pillow's bytes.
    array = np.array(pil, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _fill(pil: Image.Image):
    return _FILL_GRAY if pil.mode == "L" else (_FILL_GRAY,) * 3


# --------------------------------------------------------------------------- crops


def _rrc_box(height: int, width: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), as torchvision's `get_params`.

    Up to 10 attempts: area fraction uniform in `scale`, aspect w/h log-uniform in `ratio`,
    w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the first box that fits is
    placed uniformly. Otherwise a centre crop of the whole image with its aspect clamped to `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(pil: Image.Image, width: int, height: int) -> Image.Image:
    # Pillow's bilinear resize widens its filter when shrinking (antialiased), as torchvision's
    # PIL backend does.
    return pil if pil.size == (width, height) else pil.resize((width, height), _BILINEAR)


# --------------------------------------------------------------------------- RandAugment


def _ra_op_arg(name: str, magnitude: float, negate: bool):
    """The argument of op `name` at `magnitude` in [0, 10]; every op is the identity at 0.

    Rotate 30 m/10 degrees; ShearX/Y 0.3 m/10; TranslateX/YRel 0.45 m/10 of the side (all signed);
    Color / Contrast / Brightness / Sharpness factor 1 +- 0.9 m/10 (timm's "Increasing" enhance
    mapping and torchvision's; timm's plain mapping 0.1 + 1.8 m/10 is not used because it is not
    monotone in strength); Posterize keeps 8 - int(4 m/10) bits (8..4); Solarize threshold
    256 - int(256 m/10) (256..0, pixels >= threshold are inverted); SolarizeAdd adds
    int(110 m/10) (0..110) to pixels below 128.
    """
    level = magnitude / _MAX_LEVEL
    sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return sign * 30.0 * level
    if name in ("ShearX", "ShearY"):
        return sign * 0.3 * level
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * 0.45 * level
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return 1.0 + sign * 0.9 * level
    if name == "Posterize":
        return 8 - int(4 * level)
    if name == "Solarize":
        return 256 - int(256 * level)
    if name == "SolarizeAdd":
        return int(110 * level)
    return None  # AutoContrast, Equalize, Invert take no argument


def _solarize_add(pil: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return pil.point(lut * len(pil.getbands()))


def _apply_op(pil: Image.Image, name: str, magnitude: float, negate: bool = False) -> Image.Image:
    """Apply RandAugment op `name` at `magnitude` (sign flipped if `negate`, for signed ops)."""
    arg = _ra_op_arg(name, magnitude, negate)
    if name == "AutoContrast":
        return ImageOps.autocontrast(pil)
    if name == "Equalize":
        return ImageOps.equalize(pil)
    if name == "Invert":
        return ImageOps.invert(pil)
    if name == "Posterize":
        return ImageOps.posterize(pil, arg)
    if name == "Solarize":
        return ImageOps.solarize(pil, arg)
    if name == "SolarizeAdd":
        return _solarize_add(pil, arg)
    if name == "Color":
        return ImageEnhance.Color(pil).enhance(arg)
    if name == "Contrast":
        return ImageEnhance.Contrast(pil).enhance(arg)
    if name == "Brightness":
        return ImageEnhance.Brightness(pil).enhance(arg)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(pil).enhance(arg)
    # Geometric ops: bilinear sampling (timm picks bilinear or bicubic at random; one fixed choice
    # here), gray fill. Rotation about the centre; shear about the top-left corner, as timm.
    fill = _fill(pil)
    if name == "Rotate":
        return pil.rotate(arg, resample=_BILINEAR, fillcolor=fill)
    # Affine data (a, b, c, d, e, f) maps an output pixel (x, y) to input (a x + b y + c, d x + e y + f).
    if name == "ShearX":
        data = (1, arg, 0, 0, 1, 0)
    elif name == "ShearY":
        data = (1, 0, 0, arg, 1, 0)
    elif name == "TranslateXRel":
        data = (1, 0, arg * pil.size[0], 0, 1, 0)
    elif name == "TranslateYRel":
        data = (1, 0, 0, 0, 1, arg * pil.size[1])
    else:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RAND_AUGMENT_OPS)}")
    return pil.transform(pil.size, Image.Transform.AFFINE, data, resample=_BILINEAR, fillcolor=fill)


def _rand_augment(pil: Image.Image, num_layers: int, magnitude: float, mstd: float,
                  rng: np.random.Generator) -> Image.Image:
    """timm's RandAugment: `num_layers` ops drawn uniformly with replacement, each applied with
    probability 0.5 at magnitude normal(m, mstd) clipped to [0, 10], with a random sign."""
    for index in rng.integers(0, len(RAND_AUGMENT_OPS), size=num_layers):
        name = RAND_AUGMENT_OPS[index]
        if rng.random() >= _RA_PROB:
            continue
        m = rng.normal(magnitude, mstd) if mstd > 0 else magnitude
        m = min(max(float(m), 0.0), _MAX_LEVEL)
        negate = bool(rng.random() < 0.5) if name in _SIGNED_OPS else False
        pil = _apply_op(pil, name, m, negate)
    return pil


# --------------------------------------------------------------------------- ColorJitter


def _color_jitter(pil: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter(b=c=s=strength, hue=0): an order (permutation) first, then the
    factors, each uniform in [max(0, 1 - strength), 1 + strength]. Saturation leaves "L" unchanged."""
    order = rng.permutation(3)
    factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for index in order:
        if index == 2 and pil.mode == "L":
            continue
        pil = enhancers[index](pil).enhance(float(factors[index]))
    return pil


# --------------------------------------------------------------------------- transforms


_CROPS = ("random_resized", "pad", "none")


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Training augmentation of one image, in order: RandomResizedCrop (or a zero-pad random crop
    for small images), horizontal flip, ColorJitter, RandAugment (the order of GenDD's BEiT
    recipe). Output uint8 [size, size, C].

    Random draws happen in that order from the one generator, each step drawing only when on.
    """

    size: int  # output side
    # "random_resized" | "pad" (CIFAR-style: zero-pad `pad` px, then a random size x size window;
    # the input must be size x size) | "none" (resize to size x size)
    crop: str = "random_resized"
    scale: tuple = (0.08, 1.0)  # RandomResizedCrop area fraction range
    ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect (w / h) range, log-uniform
    pad: int = 4
    flip: bool = True  # horizontal, p = 0.5
    randaugment: tuple | None = None  # (num_layers n, magnitude m), e.g. (2, 7); None: off
    randaugment_mstd: float = 0.5  # magnitude noise std as timm's "mstd0.5"; 0: fixed m
    color_jitter: float = 0.0  # brightness = contrast = saturation = this factor (hue 0); 0: off

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.crop not in _CROPS:
            raise ValueError(f"crop must be one of {_CROPS}, got {self.crop!r}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        if self.randaugment is not None:
            if len(self.randaugment) != 2 or self.randaugment[0] < 0 or self.randaugment[1] < 0:
                raise ValueError(f"randaugment must be (num_layers >= 0, magnitude >= 0), got {self.randaugment}")
        if self.randaugment_mstd < 0 or self.color_jitter < 0:
            raise ValueError("randaugment_mstd and color_jitter must be >= 0")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check_image(image)
        height, width = image.shape[:2]
        if self.crop == "pad":
            if (height, width) != (self.size, self.size):
                raise ValueError(f'crop="pad" needs a {self.size}x{self.size} image, got {height}x{width}')
            p = self.pad
            padded = np.pad(image, ((p, p), (p, p), (0, 0)))
            top, left = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
            pil = _to_pil(padded[top:top + self.size, left:left + self.size])
        elif self.crop == "random_resized":
            top, left, h, w = _rrc_box(height, width, self.scale, self.ratio, rng)
            # Slice before converting: only the crop is copied into Pillow.
            pil = _resize(_to_pil(image[top:top + h, left:left + w]), self.size, self.size)
        else:
            pil = _resize(_to_pil(image), self.size, self.size)
        if self.flip and rng.random() < 0.5:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # ColorJitter before RandAugment: GenDD's BEiT recipe (main_supervised_gendd.py) order.
        if self.color_jitter > 0:
            pil = _color_jitter(pil, self.color_jitter, rng)
        if self.randaugment is not None:
            num_layers, magnitude = self.randaugment
            pil = _rand_augment(pil, int(num_layers), float(magnitude), self.randaugment_mstd, rng)
        return _from_pil(pil)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Evaluation: resize the shorter side to round(size / crop_fraction) with bilinear
    interpolation (torchvision's default, used for its ResNets), the longer side in proportion
    (truncated, as torchvision's Resize), then a centre crop size x size (offsets rounded, as
    torchvision's CenterCrop). crop_fraction 1 with an image already size x size returns it unchanged."""

    size: int
    crop_fraction: float = 0.875

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        height, width = image.shape[:2]
        short = int(round(self.size / self.crop_fraction))
        if height <= width:
            new_h, new_w = short, int(short * width / height)
        else:
            new_h, new_w = int(short * height / width), short
        if (new_h, new_w) != (height, width):
            image = _from_pil(_resize(_to_pil(image), new_w, new_h))
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return image[top:top + self.size, left:left + self.size]


# --------------------------------------------------------------------------- batch mixing


def _smoothed_one_hot(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    targets = np.full((labels.shape[0], num_classes), off, dtype=np.float64)
    targets[np.arange(labels.shape[0]), labels] = on
    return targets


def mix_batch(rng, images, labels, num_classes, *, mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5,
              label_smoothing=0.0, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Batch mixup / cutmix with soft labels, as timm's Mixup in "batch" mode.

    One lambda per batch, drawn from Beta(alpha, alpha); when both alphas are > 0, cutmix is chosen
    with probability `switch_prob`. Each image's partner is the batch reversed (timm's flip; in an
    odd batch the middle row is its own partner). Cutmix: a box of side sqrt(1 - lambda) times the
    image's, centred uniformly, clipped to the image, and lambda corrected to 1 - (box area / image
    area). Labels: smoothing first (off = s / C, on = 1 - s + off), then
    soft = lambda * y + (1 - lambda) * y_partner.

    Mixup images are rounded back to uint8 so the host -> device transfer stays uint8 (4x smaller
    than float32); the rounding error is at most half a grey level. `mask` (bool [B], False for the
    padding rows of a last short batch): if any row is padding, mixing is skipped (padding must not
    leak into real rows) and nothing is drawn, but smoothing still applies.

    Returns (uint8 images [B, H, W, C], float32 soft labels [B, num_classes] summing to 1). With
    both alphas 0 and no smoothing: the images unchanged (the same array) and one-hot labels.
    Input images are never modified in place.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [B, H, W, C], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected integer labels [{images.shape[0]}], got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    targets = _smoothed_one_hot(labels, num_classes, label_smoothing)

    mixing = mixup_alpha > 0 or cutmix_alpha > 0
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape:
            raise ValueError(f"expected a bool mask [{labels.shape[0]}], got shape {mask.shape}")
        mixing = mixing and bool(mask.all())
    if not mixing:
        return images, targets.astype(np.float32)

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < switch_prob)
    else:
        use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))

    if lam < 1.0:
        partner = images[::-1]
        if use_cutmix:
            height, width = images.shape[1:3]
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(height * cut), int(width * cut)
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
            lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)
            mixed = images.copy()
            mixed[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        else:
            # float32 (half the memory of float64; error ~1e-5 of a grey level before rounding),
            # in place. A convex combination of values in [0, 255] needs no clipping.
            blend = images.astype(np.float32)
            blend *= np.float32(lam)
            other = partner.astype(np.float32)
            other *= np.float32(1.0 - lam)
            blend += other
            del other
            mixed = np.rint(blend, out=blend).astype(np.uint8)
        images = mixed
        targets = lam * targets + (1.0 - lam) * targets[::-1]
    return images, targets.astype(np.float32)
