"""data/image_ops.py: host-side (NumPy + Pillow) augmentation for the streaming input path."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from data import image_ops
from data.image_ops import EvalTransform, TrainTransform, mix_batch


def random_image(height, width, channels, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def pil_of(image):
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def array_of(pil):
    array = np.asarray(pil)
    return array[..., None] if array.ndim == 2 else array


# ------------------------------------------------------------------------------- TrainTransform


@pytest.mark.parametrize("channels", [1, 3])
def test_train_transform_is_a_function_of_the_seed(channels):
    image = random_image(64, 48, channels)
    transform = TrainTransform(size=32, randaugment=(2, 9), color_jitter=0.4)
    first = transform(image, np.random.default_rng(7))
    again = transform(image.copy(), np.random.default_rng(7))
    assert first.dtype == np.uint8 and first.shape == (32, 32, channels)
    np.testing.assert_array_equal(first, again)
    outputs = {transform(image, np.random.default_rng(seed)).tobytes() for seed in range(6)}
    assert len(outputs) == 6


def _fallback_box(height, width, ratio):
    """The centre crop torchvision falls back to, computed independently of the module."""
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width, scale, ratio", [
    (300, 200, (0.08, 1.0), (3 / 4, 4 / 3)),
    (240, 320, (0.3, 0.5), (1.0, 2.0)),  # asymmetric aspect range: catches w and h swapped
])
def test_random_resized_crop_box_within_scale_ratio_and_image(height, width, scale, ratio):
    rng = np.random.default_rng(0)
    area = height * width
    fractions, aspects, fallbacks = [], [], 0
    for _ in range(2000):
        top, left, h, w = image_ops._rrc_box(height, width, scale, ratio, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        if (top, left, h, w) == _fallback_box(height, width, ratio):
            fallbacks += 1
            continue
        # w and h are rounded from sqrt(A r) and sqrt(A / r): bound A and r by +-0.5 pixel.
        assert (w + 0.5) * (h + 0.5) >= scale[0] * area and (w - 0.5) * (h - 0.5) <= scale[1] * area
        assert (w + 0.5) / (h - 0.5) >= ratio[0] and (w - 0.5) / (h + 0.5) <= ratio[1]
        fractions.append(h * w / area)
        aspects.append(w / h)
    assert fallbacks < 100
    span = scale[1] - scale[0]
    assert min(fractions) < scale[0] + 0.1 * span and max(fractions) > scale[1] - 0.2 * span
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    log_aspects = np.log(aspects)
    assert log_aspects.min() < log_lo + 0.1 * (log_hi - log_lo)
    assert log_aspects.max() > log_hi - 0.1 * (log_hi - log_lo)
    # Offsets are spread over the free room, not pinned to a corner or the centre.
    tops = [image_ops._rrc_box(height, width, scale, ratio, rng)[0] for _ in range(200)]
    assert len(set(tops)) > 20


@pytest.mark.parametrize("height, width, expected", [
    (100, 400, (0, 133, 100, 133)),  # too wide: full height, aspect 4/3
    (400, 100, (133, 0, 133, 100)),  # too tall: full width, aspect 3/4
    (120, 130, (0, 0, 120, 130)),  # aspect within range: the whole image
])
def test_random_resized_crop_falls_back_to_a_centre_crop(height, width, expected):
    # An area fraction of 2..3 never fits, so all 10 attempts fail.
    box = image_ops._rrc_box(height, width, (2.0, 3.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert box == expected


@pytest.mark.parametrize("channels", [1, 3])
def test_random_resized_crop_output_is_the_box_resized_bilinear(channels):
    image = random_image(90, 70, channels)
    transform = TrainTransform(size=24, flip=False)
    for seed in range(5):
        top, left, h, w = image_ops._rrc_box(90, 70, transform.scale, transform.ratio,
                                             np.random.default_rng(seed))
        crop = pil_of(image).crop((left, top, left + w, top + h))
        expected = array_of(crop.resize((24, 24), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(transform(image, np.random.default_rng(seed)), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_pad_crop_is_a_window_of_the_zero_padded_image(channels):
    image = random_image(16, 16, channels) | 1  # no zero pixels: padding is recognisable
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    transform = TrainTransform(size=16, crop="pad", pad=4, flip=False)
    offsets = set()
    for seed in range(200):
        out = transform(image, np.random.default_rng(seed))
        matches = [(i, j) for i in range(9) for j in range(9)
                   if np.array_equal(out, padded[i:i + 16, j:j + 16])]
        assert len(matches) == 1
        offsets.add(matches[0])
    # Offsets uniform in 0..2 * pad on each axis: both ends are reached.
    assert {i for i, _ in offsets} == set(range(9)) == {j for _, j in offsets}
    with pytest.raises(ValueError, match="pad"):
        transform(random_image(20, 16, channels), np.random.default_rng(0))


def test_flip_gives_the_image_or_its_mirror_and_both_occur():
    image = random_image(12, 12, 3)
    transform = TrainTransform(size=12, crop="none", flip=True)
    seen = set()
    for seed in range(30):
        out = transform(image, np.random.default_rng(seed))
        if np.array_equal(out, image):
            seen.add("same")
        elif np.array_equal(out, image[:, ::-1]):
            seen.add("mirror")
        else:
            raise AssertionError("flip produced something other than the image or its mirror")
    assert seen == {"same", "mirror"}


# ------------------------------------------------------------------------------- EvalTransform


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height, width", [(300, 200), (200, 300)])
def test_eval_transform_resizes_shorter_side_then_centre_crops(height, width, channels):
    image = random_image(height, width, channels)
    out = EvalTransform(size=224)(image)
    assert out.shape == (224, 224, channels) and out.dtype == np.uint8
    # 224 / 0.875 = 256 on the shorter side; 256 * 300 / 200 = 384 on the longer one.
    new_w, new_h = (256, 384) if height > width else (384, 256)
    resized = array_of(pil_of(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    np.testing.assert_array_equal(out, resized[top:top + 224, left:left + 224])


def test_eval_transform_is_the_identity_at_full_crop_and_size():
    image = random_image(32, 32, 3)
    np.testing.assert_array_equal(EvalTransform(size=32, crop_fraction=1.0)(image), image)


# ------------------------------------------------------------------------------- RandAugment


def apply_op(image, name, magnitude, negate=False):
    return array_of(image_ops._apply_op(pil_of(image), name, magnitude, negate))


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_ops_match_their_formulas(channels):
    x = random_image(10, 20, channels)
    np.testing.assert_array_equal(apply_op(x, "Invert", 5.0), 255 - x)
    np.testing.assert_array_equal(apply_op(x, "Posterize", 10.0), x & 0xF0)  # 4 bits kept
    np.testing.assert_array_equal(apply_op(x, "Posterize", 5.0), x & 0xFC)  # 8 - int(2) = 6 bits
    np.testing.assert_array_equal(apply_op(x, "Solarize", 5.0), np.where(x >= 128, 255 - x, x))
    np.testing.assert_array_equal(apply_op(x, "Solarize", 10.0), 255 - x)  # threshold 0
    np.testing.assert_array_equal(apply_op(x, "SolarizeAdd", 10.0),
                                  np.where(x < 128, np.minimum(x.astype(int) + 110, 255), x))
    constant = np.full((8, 8, channels), 100, np.uint8)
    for negate, factor in [(False, 1.45), (True, 0.55)]:  # 1 +- 0.9 * 5 / 10
        out = apply_op(constant, "Brightness", 5.0, negate)
        assert np.all(np.abs(out.astype(float) - 100 * factor) < 1.0)
    # TranslateXRel at m = 10 moves by 0.45 * 20 = 9 pixels (exact), gray fill behind.
    out = apply_op(x, "TranslateXRel", 10.0)
    np.testing.assert_array_equal(out[:, :11], x[:, 9:])
    assert np.all(out[:, 11:] == 128)
    out = apply_op(x, "TranslateXRel", 10.0, negate=True)
    np.testing.assert_array_equal(out[:, 9:], x[:, :11])
    assert np.all(out[:, :9] == 128)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", image_ops.RAND_AUGMENT_OPS)
def test_rand_augment_op_is_identity_at_zero_and_acts_at_ten(name, channels):
    x = random_image(32, 32, channels, seed=3) % 160 + 40  # not full range: AutoContrast acts
    at_ten = apply_op(x, name, 10.0)
    assert at_ten.dtype == np.uint8 and at_ten.shape == x.shape
    if name == "Color" and channels == 1:  # saturation of a gray image is the image
        np.testing.assert_array_equal(at_ten, x)
    else:
        assert not np.array_equal(at_ten, x)
    if name not in ("AutoContrast", "Equalize", "Invert"):  # these take no magnitude
        np.testing.assert_array_equal(apply_op(x, name, 0.0), x)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mstd", [0.0, 0.5])
def test_rand_augment_transform_changes_images(channels, mstd):
    image = random_image(24, 24, channels)
    transform = TrainTransform(size=24, crop="none", flip=False, randaugment=(2, 9), randaugment_mstd=mstd)
    changed = 0
    for seed in range(12):
        out = transform(image, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == image.shape
        changed += not np.array_equal(out, image)
    # P(no op applied) = 1/4 per image: expect ~9 of 12 changed.
    assert changed >= 6


# ------------------------------------------------------------------------------- ColorJitter


def test_color_jitter_of_a_constant_gray_image_is_brightness_within_the_factor_range():
    # On a constant gray image contrast and saturation are no-ops, so only brightness acts.
    image = np.full((8, 8, 3), 100, np.uint8)
    transform = TrainTransform(size=8, crop="none", flip=False, color_jitter=0.4)
    values = []
    for seed in range(200):
        out = transform(image, np.random.default_rng(seed))
        assert np.all(out == out[0, 0, 0])
        values.append(int(out[0, 0, 0]))
    assert 59 <= min(values) and max(values) <= 140  # 100 * [0.6, 1.4], Pillow truncates
    assert min(values) < 66 and max(values) > 134  # the whole range is used
    assert np.mean(values) == pytest.approx(100, abs=6)


def test_color_jitter_changes_a_colour_image_and_keeps_gray_channels():
    image = random_image(16, 16, 3)
    transform = TrainTransform(size=16, crop="none", flip=False, color_jitter=0.4)
    assert not np.array_equal(transform(image, np.random.default_rng(0)), image)
    gray = random_image(16, 16, 1)
    out = TrainTransform(size=16, crop="none", flip=False, color_jitter=0.4)(gray, np.random.default_rng(0))
    assert out.shape == (16, 16, 1) and not np.array_equal(out, gray)


# ------------------------------------------------------------------------------- mix_batch


def distinct_labels(batch, num_classes=10):
    """Labels with label[i] != label[B-1-i], so each row's and its partner's classes differ."""
    return np.arange(batch) % num_classes


def test_mix_batch_off_returns_images_and_one_hot():
    images = random_image(6, 8, 3)[None].repeat(4, 0)
    labels = np.array([3, 1, 4, 1])
    out, soft = mix_batch(np.random.default_rng(0), images, labels, 5)
    assert out is images
    np.testing.assert_array_equal(soft, np.eye(5, dtype=np.float32)[labels])
    assert soft.dtype == np.float32


def test_mix_batch_label_smoothing_alone():
    images = np.zeros((3, 4, 4, 1), np.uint8)
    labels = np.array([0, 2, 4])
    out, soft = mix_batch(np.random.default_rng(0), images, labels, 5, label_smoothing=0.1)
    assert out is images
    expected = np.full((3, 5), 0.1 / 5)
    expected[np.arange(3), labels] = 1 - 0.1 + 0.1 / 5
    np.testing.assert_allclose(soft, expected, rtol=1e-6)


def test_mix_batch_soft_labels_sum_to_one():
    images = np.stack([random_image(8, 8, 3, seed) for seed in range(6)])
    for seed in range(10):
        _, soft = mix_batch(np.random.default_rng(seed), images, distinct_labels(6), 10,
                            mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
        np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
        assert soft.min() >= 0


def test_mixup_image_is_the_rounded_blend_with_the_reversed_batch():
    batch = 6
    images = np.stack([random_image(8, 8, 3, seed) for seed in range(batch)])
    labels = distinct_labels(batch)
    original = images.copy()
    for seed in range(5):
        out, soft = mix_batch(np.random.default_rng(seed), images, labels, 10, mixup_alpha=0.8)
        np.testing.assert_array_equal(images, original)  # input untouched
        lam = float(soft[0, labels[0]])
        assert 0 < lam < 1
        np.testing.assert_allclose(soft[np.arange(batch), labels], lam, atol=1e-6)
        np.testing.assert_allclose(soft[np.arange(batch), labels[::-1]], 1 - lam, atol=1e-6)
        blend = lam * images.astype(np.float64) + (1 - lam) * images[::-1].astype(np.float64)
        assert out.dtype == np.uint8
        # Round to nearest; the 1e-4 only absorbs float32 error at exact ties.
        assert np.abs(out - blend).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("kwargs", [dict(cutmix_alpha=1.0), dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0)])
def test_cutmix_partner_pixels_match_one_minus_lambda(kwargs):
    batch, height, width = 4, 20, 24
    images = (np.arange(batch, dtype=np.uint8) * 50 + 10)[:, None, None, None] * np.ones(
        (1, height, width, 3), np.uint8)
    labels = distinct_labels(batch)
    boxes_seen = 0
    for seed in range(12):
        out, soft = mix_batch(np.random.default_rng(seed), images, labels, 10, **kwargs)
        lam = float(soft[0, labels[0]])
        from_partner = out[..., 0] == images[::-1, ..., 0]
        from_self = out[..., 0] == images[..., 0]
        assert np.all(from_partner | from_self)  # pasted, never blended
        counts = from_partner.sum(axis=(1, 2))
        assert np.all(counts == round((1 - lam) * height * width))  # to the pixel
        assert np.all(from_partner == from_partner[0])  # one box for the whole batch
        if counts[0]:
            rows, cols = np.nonzero(from_partner[0])
            assert counts[0] == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a rectangle
            boxes_seen += 1
        np.testing.assert_allclose(soft[np.arange(batch), labels[::-1]], 1 - lam, atol=1e-6)
    assert boxes_seen >= 6


def test_switch_prob_zero_with_both_alphas_is_mixup():
    batch = 4
    images = (np.arange(batch, dtype=np.uint8) * 50 + 10)[:, None, None, None] * np.ones((1, 8, 8, 1), np.uint8)
    out, soft = mix_batch(np.random.default_rng(1), images, distinct_labels(batch), 10,
                          mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0)
    lam = float(soft[0, 0])
    expected = np.rint(lam * images[0, 0, 0, 0] + (1 - lam) * images[-1, 0, 0, 0])
    assert np.all(np.abs(out[0].astype(float) - expected) <= 1)
    assert np.all(out[0] != images[0]) and np.all(out[0] != images[-1])


def test_padding_mask_disables_mixing_but_not_smoothing():
    images = np.stack([random_image(8, 8, 3, seed) for seed in range(4)])
    labels = distinct_labels(4)
    mask = np.array([True, True, True, False])
    out, soft = mix_batch(np.random.default_rng(0), images, labels, 10, mixup_alpha=1.0,
                          cutmix_alpha=1.0, label_smoothing=0.2, mask=mask)
    np.testing.assert_array_equal(out, images)
    expected = np.full((4, 10), 0.02)
    expected[np.arange(4), labels] = 0.82
    np.testing.assert_allclose(soft, expected, rtol=1e-6)
    # The same call with every row real does mix.
    out, _ = mix_batch(np.random.default_rng(0), images, labels, 10, mixup_alpha=1.0,
                       cutmix_alpha=1.0, mask=np.ones(4, bool))
    assert not np.array_equal(out, images)


def test_mix_batch_is_a_function_of_the_seed():
    images = np.stack([random_image(8, 8, 3, seed) for seed in range(4)])
    labels = distinct_labels(4)
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    a = mix_batch(np.random.default_rng(5), images, labels, 10, **kwargs)
    b = mix_batch(np.random.default_rng(5), images, labels, 10, **kwargs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
