"""Tests for data/augment.py (per-image RandAugment, crop, flip, mixup)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import augment as A


def _rand_image(seed, shape=(32, 32, 3), low=0, high=256):
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, shape, dtype=np.uint8)


def _np(x):
    return np.asarray(x)


def _reflect(i, n):
    """Half-sample symmetric reflection (d c b a | a b c d | d c b a)."""
    i = np.asarray(i)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i < n, i, period - 1 - i)


# ---------------------------------------------------------------------------
# Flip and crop
# ---------------------------------------------------------------------------
def test_flip_twice_is_identity_and_flips_width():
    img = _rand_image(0)
    saw_flip = saw_keep = False
    for i in range(12):
        key = jax.random.key(i)
        once = _np(A.random_flip(key, img))
        twice = _np(A.random_flip(key, once))
        np.testing.assert_array_equal(twice, img)
        if np.array_equal(once, img[:, ::-1]):
            saw_flip = True
        elif np.array_equal(once, img):
            saw_keep = True
        else:
            raise AssertionError("flip produced neither the image nor its mirror")
    assert saw_flip and saw_keep


def test_crop_zero_padding_is_identity():
    img = _rand_image(1, (28, 28, 1))
    out = A.random_crop(jax.random.key(3), img, 0)
    np.testing.assert_array_equal(_np(out), img)


def test_crop_is_shifted_window_with_zero_padding():
    h, w, p = 6, 7, 2
    img = (np.arange(h * w * 2).reshape(h, w, 2) % 250 + 1).astype(np.uint8)  # no zeros
    padded = np.pad(img, ((p, p), (p, p), (0, 0)))
    keys = jax.random.split(jax.random.key(0), 300)
    crops = _np(jax.jit(jax.vmap(lambda k: A.random_crop(k, img, p)))(keys))
    assert crops.shape == (300, h, w, 2) and crops.dtype == np.uint8
    offsets = set()
    for crop in crops:
        matches = [
            (oy, ox)
            for oy in range(2 * p + 1)
            for ox in range(2 * p + 1)
            if np.array_equal(crop, padded[oy : oy + h, ox : ox + w])
        ]
        assert len(matches) == 1, "crop is not a window of the zero-padded image"
        offsets.add(matches[0])
    # Offsets are uniform over {0..2p}^2: with 300 draws all 25 should appear.
    assert offsets == {(a, b) for a in range(2 * p + 1) for b in range(2 * p + 1)}
    # Explicit check of one extreme window: zeros exactly where padded.
    crop = padded[0:h, 0:w]
    assert (crop[:p] == 0).all() and (crop[:, :p] == 0).all() and (crop[p:, p:] > 0).all()


# ---------------------------------------------------------------------------
# Individual RandAugment ops
# ---------------------------------------------------------------------------
def test_invert():
    img = _rand_image(2)
    out = _np(A.invert(img))
    np.testing.assert_array_equal(out, 255 - img)
    assert out.dtype == np.uint8


def test_solarize_threshold():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    out = _np(A.solarize(img, 128)).astype(int)
    x = img.astype(int)
    np.testing.assert_array_equal(out[x < 128], x[x < 128])
    np.testing.assert_array_equal(out[x >= 128], 255 - x[x >= 128])
    np.testing.assert_array_equal(_np(A.solarize(img, 0)), 255 - img)
    np.testing.assert_array_equal(_np(A.solarize(img, 256)), img)


def test_solarize_add():
    img = np.array([0, 100, 120, 127, 128, 200, 255], np.uint8).reshape(1, 7, 1)
    out = _np(A.solarize_add(img, 100)).ravel().tolist()
    assert out == [100, 200, 220, 227, 128, 200, 255]
    out = _np(A.solarize_add(img, 200)).ravel().tolist()
    assert out == [200, 255, 255, 255, 128, 200, 255]


def test_posterize_bit_mask():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    for bits in range(0, 9):
        mask = (0xFF << (8 - bits)) & 0xFF
        np.testing.assert_array_equal(_np(A.posterize(img, bits)), img & mask)


def test_translate_moves_pixels():
    img = _rand_image(3, (10, 12, 3))
    out = _np(A.translate_x(img, 3.0))
    np.testing.assert_array_equal(out[:, 3:], img[:, :-3])
    np.testing.assert_array_equal(out[:, :3], img[:, 2::-1])  # reflection fill
    out = _np(A.translate_y(img, -2.0))
    np.testing.assert_array_equal(out[:-2], img[2:])
    np.testing.assert_array_equal(out[-2:], img[:-3:-1])
    # Nearest sampling: a fractional shift rounds (7.2 px == 7 px).
    np.testing.assert_array_equal(_np(A.translate_x(img, 7.2)), _np(A.translate_x(img, 7.0)))
    # A single bright pixel moves by exactly the shift.
    dot = np.zeros((9, 9, 1), np.uint8)
    dot[4, 4] = 255
    assert np.argwhere(_np(A.translate_x(dot, 2.0))[..., 0] == 255).tolist() == [[4, 6]]
    assert np.argwhere(_np(A.translate_y(dot, -3.0))[..., 0] == 255).tolist() == [[1, 4]]


def test_rotate():
    img = _rand_image(4, (16, 16, 3))
    np.testing.assert_array_equal(_np(A.rotate(img, 0.0)), img)
    np.testing.assert_array_equal(_np(A.rotate(img, 90.0)), np.rot90(img, 1))
    np.testing.assert_array_equal(_np(A.rotate(img, -90.0)), np.rot90(img, -1))
    np.testing.assert_array_equal(_np(A.rotate(img, 180.0)), np.rot90(img, 2))
    # A small rotation changes the image but keeps the centre pixel region.
    out = _np(A.rotate(img, 27.0))
    assert not np.array_equal(out, img)


def test_shear_matches_definition():
    img = _rand_image(5, (12, 12, 3))
    s = 0.27
    rows, cols = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    # shear_x: out[r, c] = in[r, c + s r] (nearest, reflect)
    src_c = _reflect(np.round(cols + s * rows).astype(int), 12)
    np.testing.assert_array_equal(_np(A.shear_x(img, s)), img[rows, src_c])
    src_r = _reflect(np.round(rows - s * cols).astype(int), 12)
    np.testing.assert_array_equal(_np(A.shear_y(img, -s)), img[src_r, cols])
    np.testing.assert_array_equal(_np(A.shear_x(img, 0.0)), img)


def test_cutout_sets_box_to_gray():
    img = _rand_image(6, (16, 16, 3), 0, 100)  # never 128
    out = _np(A.cutout(img, 3, 5, 9))
    box = np.zeros((16, 16), bool)
    box[2:8, 6:12] = True
    assert (out[box] == 128).all()
    np.testing.assert_array_equal(out[~box], img[~box])
    # Clipped at the corner.
    out = _np(A.cutout(img, 4, 1, 0))
    box = np.zeros((16, 16), bool)
    box[0:5, 0:4] = True
    assert (out[box] == 128).all()
    np.testing.assert_array_equal(out[~box], img[~box])
    np.testing.assert_array_equal(_np(A.cutout(img, 0, 8, 8)), img)


def test_autocontrast_per_channel():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = np.linspace(50, 100, 64).reshape(8, 8).round()
    img[..., 1] = np.linspace(10, 200, 64).reshape(8, 8).round()
    img[..., 2] = 77  # constant channel stays unchanged
    out = _np(A.autocontrast(img))
    for c in range(2):
        x = img[..., c].astype(float)
        assert out[..., c].min() == 0 and out[..., c].max() == 255
        expected = np.round((x - x.min()) * 255.0 / (x.max() - x.min()))
        np.testing.assert_allclose(out[..., c], expected, atol=1)
        assert (out[..., c][img[..., c] == x.min()] == 0).all()
        assert (out[..., c][img[..., c] == x.max()] == 255).all()
    np.testing.assert_array_equal(out[..., 2], img[..., 2])


def test_equalize_flattens_histogram():
    rng = np.random.default_rng(7)
    img = np.clip(rng.normal(120, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    out = _np(A.equalize(img))
    assert out.dtype == np.uint8 and out.shape == img.shape
    for c in range(3):
        assert out[..., c].max() - out[..., c].min() > 200
        assert img[..., c].max() - img[..., c].min() < 120
        # Monotone map: pixel order preserved.
        order = np.argsort(img[..., c].ravel(), kind="stable")
        assert (np.diff(out[..., c].ravel()[order].astype(int)) >= 0).all()
    # Flatter: the cumulative histogram is much closer to the uniform one.
    def cdf_gap(x):
        cdf = np.cumsum(np.bincount(x.ravel(), minlength=256)) / x.size
        return np.abs(cdf - np.arange(1, 257) / 256).max()

    assert cdf_gap(out[..., 0]) < 0.5 * cdf_gap(img[..., 0])
    # A constant channel is left unchanged.
    flat = np.full((8, 8, 1), 42, np.uint8)
    np.testing.assert_array_equal(_np(A.equalize(flat)), flat)


def test_equalize_matches_pil():
    image_mod = pytest.importorskip("PIL.Image")
    ops = pytest.importorskip("PIL.ImageOps")
    rng = np.random.default_rng(8)
    img = np.clip(rng.normal(90, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    ref = np.asarray(ops.equalize(image_mod.fromarray(img)))
    np.testing.assert_array_equal(_np(A.equalize(img)), ref)
    gray = img[..., :1]
    ref = np.asarray(ops.equalize(image_mod.fromarray(gray[..., 0])))
    np.testing.assert_array_equal(_np(A.equalize(gray))[..., 0], ref)


def test_brightness():
    img = _rand_image(9)
    np.testing.assert_array_equal(_np(A.brightness(img, 0.0)), np.zeros_like(img))
    np.testing.assert_array_equal(_np(A.brightness(img, 1.0)), img)
    np.testing.assert_array_equal(_np(A.brightness(img, 0.5)), np.round(img * 0.5).astype(np.uint8))
    out = _np(A.brightness(img, 1.9)).astype(int)
    np.testing.assert_array_equal(out, np.clip(np.round(img * 1.9), 0, 255))


def test_contrast():
    img = _rand_image(10)
    np.testing.assert_array_equal(_np(A.contrast(img, 1.0)), img)
    gray = img.astype(float) @ np.array([0.2989, 0.5870, 0.1140])
    mean = np.round(gray.mean())
    out0 = _np(A.contrast(img, 0.0))
    assert (out0 == mean).all()
    out = _np(A.contrast(img, 0.4)).astype(float)
    np.testing.assert_allclose(out, np.clip(mean + 0.4 * (img - mean), 0, 255), atol=0.5 + 1e-3)
    one = img[..., :1]
    assert (_np(A.contrast(one, 0.0)) == np.round(one.mean())).all()


def test_color():
    img = _rand_image(11)
    np.testing.assert_array_equal(_np(A.color(img, 1.0)), img)
    out0 = _np(A.color(img, 0.0))
    gray = np.round(img.astype(float) @ np.array([0.2989, 0.5870, 0.1140]))
    for c in range(3):
        np.testing.assert_array_equal(out0[..., c], gray)
    one = img[..., :1]
    np.testing.assert_array_equal(_np(A.color(one, 0.0)), one)


def test_sharpness():
    img = np.full((7, 7, 1), 100, np.uint8)
    img[3, 3] = 230
    np.testing.assert_array_equal(_np(A.sharpness(img, 1.0)), img)
    out0 = _np(A.sharpness(img, 0.0)).astype(int)[..., 0]
    # Smoothed with [[1,1,1],[1,5,1],[1,1,1]]/13 in the interior, border kept.
    assert out0[3, 3] == round((8 * 100 + 5 * 230) / 13)
    assert out0[2, 2] == round((12 * 100 + 230) / 13)
    assert out0[1, 1] == 100 and (out0[0] == 100).all() and (out0[:, -1] == 100).all()
    # factor 2 extrapolates away from the blur: the spike gets brighter.
    assert _np(A.sharpness(img, 2.0))[3, 3, 0] == 255


def test_level_to_arg():
    assert float(A.rotate_level_to_arg(10.0)) == pytest.approx(30.0)
    assert float(A.rotate_level_to_arg(5.0)) == pytest.approx(15.0)
    assert [int(A.posterize_level_to_arg(l)) for l in (0.0, 2.4, 5.0, 9.9, 10.0)] == [0, 0, 2, 3, 4]
    assert int(A.solarize_level_to_arg(9.0)) == 230
    assert int(A.solarize_level_to_arg(10.0)) == 256
    assert int(A.solarize_add_level_to_arg(9.0)) == 99
    assert float(A.enhance_level_to_arg(0.0)) == pytest.approx(0.1)
    assert float(A.enhance_level_to_arg(10.0)) == pytest.approx(1.9)
    assert float(A.shear_level_to_arg(10.0)) == pytest.approx(0.3)
    assert float(A.translate_level_to_arg(9.0)) == pytest.approx(7.2)
    assert int(A.cutout_level_to_arg(9.0)) == 14
    assert int(A.cutout_level_to_arg(10.0)) == 16


def test_apply_op_dispatch_matches_ops():
    assert len(A.RAND_AUGMENT_OPS) == 17
    img = _rand_image(12, (16, 16, 3))
    level = 5.0
    apply = jax.jit(A.apply_op)
    key = jax.random.key(0)
    expect = {
        "AutoContrast": A.autocontrast(img),
        "Equalize": A.equalize(img),
        "Invert": A.invert(img),
        "Posterize": A.posterize(img, 2),
        "Solarize": A.solarize(img, 128),
        "Color": A.color(img, 1.0),
        "Contrast": A.contrast(img, 1.0),
        "Brightness": A.brightness(img, 1.0),
        "Sharpness": A.sharpness(img, 1.0),
        "SolarizeAdd": A.solarize_add(img, 55),
        "Identity": img,
    }
    signed = {
        "Rotate": lambda s: A.rotate(img, 15.0 * s),
        "ShearX": lambda s: A.shear_x(img, 0.15 * s),
        "ShearY": lambda s: A.shear_y(img, 0.15 * s),
        "TranslateX": lambda s: A.translate_x(img, 4.0 * s),
        "TranslateY": lambda s: A.translate_y(img, 4.0 * s),
    }
    for i, name in enumerate(A.RAND_AUGMENT_OPS):
        out = _np(apply(i, img, level, key))
        assert out.dtype == np.uint8 and out.shape == img.shape
        if name in expect:
            np.testing.assert_array_equal(out, _np(expect[name]), err_msg=name)
        elif name in signed:
            assert any(np.array_equal(out, _np(signed[name](s))) for s in (1.0, -1.0)), name
        else:
            assert name == "Cutout"
            changed = np.any(out != img, axis=-1)
            assert (out[changed] == 128).all()
            ys, xs = np.nonzero(changed)
            assert ys.max() - ys.min() < 16 and xs.max() - xs.min() < 16


# ---------------------------------------------------------------------------
# RandAugment and the batch pipeline
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _batched_rand_augment():
    # num_layers static; magnitude and prob_to_apply traced (one compile).
    return jax.jit(jax.vmap(A.rand_augment, in_axes=(0, 0, None, None, None)), static_argnums=2)


def test_rand_augment_per_image_diversity_and_range():
    img = _rand_image(13, (32, 32, 3))
    batch = np.broadcast_to(img, (64, 32, 32, 3))
    keys = jax.random.split(jax.random.key(42), 64)
    fn = _batched_rand_augment()
    out = _np(fn(keys, batch, 2, 9.0, 1.0))
    assert out.shape == batch.shape and out.dtype == np.uint8
    distinct = {o.tobytes() for o in out}
    # Per-image keys: identical inputs get different ops (Q1 fixed).
    assert len(distinct) >= 30
    # Same keys: deterministic.
    np.testing.assert_array_equal(_np(fn(keys, batch, 2, 9.0, 1.0)), out)
    # prob_to_apply = 0 keeps every image unchanged.
    np.testing.assert_array_equal(_np(fn(keys, batch, 2, 9.0, 0.0)), batch)
    # prob_to_apply = 0.5: a mix of untouched and changed images.
    half = _np(fn(keys, batch, 2, 9.0, 0.5))
    untouched = sum(np.array_equal(o, img) for o in half)
    assert 3 <= untouched <= 40  # P(untouched) = 0.25 + 0.75 * (1/17) ~ 0.3 per layer pair
    # num_layers = 0 is the identity; float input is rejected.
    np.testing.assert_array_equal(_np(A.rand_augment(jax.random.key(0), img, num_layers=0)), img)
    with pytest.raises(TypeError):
        A.rand_augment(jax.random.key(0), img.astype(np.float32))


def _windows(img, p):
    """All H x W windows of the zero-padded image and their mirrors, in [0, 1]."""
    h, w, _ = img.shape
    padded = np.pad(img, ((p, p), (p, p), (0, 0))).astype(np.float32) / 255.0
    wins = [padded[a : a + h, b : b + w] for a in range(2 * p + 1) for b in range(2 * p + 1)]
    return wins + [win[:, ::-1] for win in wins]


@pytest.mark.parametrize("shape", [(8, 28, 28, 1), (8, 32, 32, 3)])
def test_augment_batch_jit_shapes_range_determinism(shape):
    img = _rand_image(15, shape[1:])
    images = np.broadcast_to(img, shape)  # identical images: diversity is per image
    fn = jax.jit(
        functools.partial(A.augment_batch, randaugment=True, crop_padding=4, flip=True)
    )
    key = jax.random.key(0)
    out = _np(fn(key, images))
    assert out.shape == shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Values are k/255.
    np.testing.assert_allclose(out * 255.0, np.round(out * 255.0), atol=1e-3)
    np.testing.assert_array_equal(_np(fn(key, images)), out)
    assert not np.array_equal(_np(fn(jax.random.key(1), images)), out)
    assert len({o.tobytes() for o in out}) >= 6
    # RandAugment acted: some outputs are not a plain crop/flip of the input.
    wins = _windows(img, 4)
    not_window = sum(not any(np.array_equal(o, w) for w in wins) for o in out)
    assert not_window >= 2
    # Legacy raw uint32 keys work too.
    assert fn(jax.random.PRNGKey(0), images).shape == shape


def test_augment_batch_without_augmentation_equals_eval():
    images = _rand_image(16, (4, 28, 28, 1))
    out = A.augment_batch(
        jax.random.key(0), images, randaugment=False, crop_padding=0, flip=False
    )
    np.testing.assert_array_equal(_np(out), _np(A.eval_images(images)))
    np.testing.assert_allclose(_np(A.eval_images(images)), images / 255.0, rtol=1e-6)


def test_augment_batch_crop_flip_only_is_per_image():
    # Crop + flip only: every output is a (possibly mirrored) window of the
    # zero-padded input, and identical images get different windows.
    img = (np.arange(1, 8 * 8 + 1).reshape(8, 8, 1) % 250 + 1).astype(np.uint8)
    images = np.broadcast_to(img, (32, 8, 8, 1))
    out = _np(A.augment_batch(jax.random.key(5), images, randaugment=False, crop_padding=2, flip=True))
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0))) / 255.0
    windows = [padded[a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
    flipped = 0
    for o in out:
        plain = any(np.allclose(o, w) for w in windows)
        mirror = any(np.allclose(o[:, ::-1], w) for w in windows)
        assert plain or mirror
        flipped += mirror and not plain
    assert 0 < flipped < 32
    assert len({o.tobytes() for o in out}) > 10


# ---------------------------------------------------------------------------
# Mixup
# ---------------------------------------------------------------------------
_mixup = jax.jit(A.mixup, static_argnames="alpha")  # shared compile across tests


def test_mixup_formula_and_labels():
    rng = np.random.default_rng(17)
    images = rng.random((16, 4, 4, 3)).astype(np.float32)
    labels = np.arange(16, dtype=np.int32)
    mask = np.ones(16, bool)
    fn = functools.partial(_mixup, alpha=0.4)

    @jax.jit
    def draws(key):
        k_lam, k_perm = jax.random.split(key)
        return jax.random.beta(k_lam, 0.4, 0.4), jax.random.permutation(k_perm, 16)

    n_big = 0
    for seed in range(8):
        key = jax.random.key(seed)
        out_x, out_y = (_np(v) for v in fn(key, images, labels, mask))
        lam, perm = draws(key)
        lam, perm = float(lam), _np(perm)
        np.testing.assert_allclose(out_x, (1 - lam) * images + lam * images[perm], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out_y, labels if lam < 0.5 else labels[perm])
        assert sorted(perm.tolist()) == list(range(16))
        n_big += lam >= 0.5
        # When lam >= 0.5 the returned labels name each image's partner: the
        # output must be the blend with that partner (labels and images agree).
        partner = out_y if lam >= 0.5 else perm
        np.testing.assert_allclose(out_x, (1 - lam) * images + lam * images[partner], atol=1e-5)
    assert 0 < n_big < 8  # both label branches exercised


def test_mixup_skips_with_padding_and_nonpositive_alpha():
    rng = np.random.default_rng(18)
    images = jnp.asarray(rng.random((16, 4, 4, 3)).astype(np.float32))
    labels = jnp.arange(16, dtype=jnp.int32)
    mask = np.ones(16, bool)
    mask[-2:] = False
    fn = functools.partial(_mixup, alpha=0.4)
    key = jax.random.key(1)
    out_x, out_y = fn(key, images, labels, mask)
    np.testing.assert_array_equal(_np(out_x), _np(images))
    np.testing.assert_array_equal(_np(out_y), _np(labels))
    # Same key, full mask: mixing does happen.
    mixed_x, _ = fn(key, images, labels, np.ones(16, bool))
    assert not np.allclose(_np(mixed_x), _np(images))
    for alpha in (0.0, -1.0):
        x, y = A.mixup(key, images, labels, np.ones(16, bool), alpha)
        assert x is images and y is labels


def test_contrast_blends_towards_the_tf_models_level_or_the_mean_gray():
    from data.augment import augment_batch, contrast, tf_models_contrast_gray

    # TF-Models' "mean": pixel count / 256, clipped to 255, truncated
    assert tf_models_contrast_gray(28 * 28) == 3 and tf_models_contrast_gray(256 * 28 * 28) == 255
    assert tf_models_contrast_gray(4 * 32 * 32) == 16
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    expected = np.clip(np.round(16 + 0.5 * (image.astype(np.float32) - 16)), 0, 255)
    np.testing.assert_array_equal(np.asarray(contrast(image, 0.5, gray=16)), expected)
    mean = np.round(image.mean())
    np.testing.assert_array_equal(np.asarray(contrast(image, 0.5)),
                                  np.clip(np.round(mean + 0.5 * (image - mean)), 0, 255))
    # In the batch pipeline the option changes the images RandAugment's Contrast touched only.
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 256, (64, 16, 16, 1), dtype=np.uint8))
    key = jax.random.PRNGKey(3)
    reference, pil = (np.asarray(augment_batch(key, batch, randaugment=True, crop_padding=0, flip=False,
                                               contrast=c)) for c in ("tf_models", "mean"))
    differs = np.any(reference != pil, axis=(1, 2, 3))
    assert 0 < differs.sum() < 64
