"""Training-time augmentation for KD, EnDD, FED and EDFM (spec section 1).

Pipeline per training step: RandAugment (uint8) -> zero-pad random crop ->
horizontal flip -> /255 -> mixup. Everything here is jittable with static
shapes. The per-image operations take a single image ``[H, W, C]`` and a PRNG
key; batches are handled with ``jax.vmap`` over per-image keys.

Unlike the reference code (quirk Q1 in the spec), RandAugment runs *per image*:
each image gets its own key, so its own ops, levels, signs and apply coins, and
AutoContrast / Equalize / Contrast take their statistics from that image only.

RandAugment follows the TF-Models design (N layers, 16 ops plus identity, level
= clip(M + N(0, 1), 0, 10), a keep coin with ``prob_to_apply``) with the
PIL-style definitions of the ops. Deliberate differences from TF-Models:

* float -> uint8 conversions round to nearest (TF truncates with ``tf.cast``);
* Contrast: the TF-Models code computes its "mean" gray as ``sum(histogram) /
  256``, i.e. the pixel count / 256 (clipped to 255), which is not the mean gray
  level; on the reference's batches it is the batch's pixel count. That level is
  the default (``contrast="tf_models"``); ``contrast="mean"`` blends towards the
  image's true mean gray (PIL);
* Cutout fills with gray 128 and draws its own centre per image.

Geometric ops (rotate, shear, translate) use nearest-neighbour sampling with
reflection fill (``d c b a | a b c d | d c b a``), via ``dm_pix``.

Op functions are public so that tests can call them directly: each takes an
image (uint8 ``[H, W, C]``) and its argument (not the level) and returns uint8.
"""

from __future__ import annotations

import math
import dm_pix
import jax
import jax.numpy as jnp

__all__ = [
    "RAND_AUGMENT_OPS",
    "RA_MAGNITUDE",
    "RA_NUM_LAYERS",
    "RA_PROB_TO_APPLY",
    "apply_op",
    "augment_batch",
    "autocontrast",
    "blend",
    "brightness",
    "color",
    "contrast",
    "cutout",
    "enhance_level_to_arg",
    "equalize",
    "eval_images",
    "identity",
    "invert",
    "mixup",
    "posterize",
    "posterize_level_to_arg",
    "rand_augment",
    "random_crop",
    "random_flip",
    "rotate",
    "rotate_level_to_arg",
    "sharpness",
    "shear_level_to_arg",
    "shear_x",
    "shear_y",
    "solarize",
    "solarize_add",
    "solarize_add_level_to_arg",
    "solarize_level_to_arg",
    "translate_level_to_arg",
    "translate_x",
    "translate_y",
    "cutout_level_to_arg",
]

MAX_LEVEL = 10.0
TRANSLATE_CONST = 8.0  # px at level 10
CUTOUT_CONST = 16.0  # half-size in px at level 10
CUTOUT_FILL = 128
# RandAugment settings of the spec (N layers, magnitude M, keep probability).
RA_NUM_LAYERS = 2
RA_MAGNITUDE = 9.0
RA_PROB_TO_APPLY = 0.5

# Branch order of the RandAugment switch (16 ops + identity).
RAND_AUGMENT_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
    "Identity",
)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _to_float(image: jax.Array) -> jax.Array:
    return jnp.asarray(image).astype(jnp.float32)


def _to_uint8(image: jax.Array) -> jax.Array:
    """Round to nearest and clip to [0, 255], then cast to uint8."""
    return jnp.clip(jnp.round(image), 0.0, 255.0).astype(jnp.uint8)


def _check_image(image: jax.Array) -> None:
    if image.ndim != 3:
        raise ValueError(f"expected one image [H, W, C], got shape {image.shape}")


def blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance`` blend: ``degenerate + factor * (image - degenerate)``.

    Both inputs are uint8 (or float on the 0..255 scale); the result is clipped
    to [0, 255], rounded and returned as uint8. factor 0 gives ``degenerate``,
    factor 1 gives ``image``; factors > 1 extrapolate.
    """
    d = _to_float(degenerate)
    x = _to_float(image)
    factor = jnp.asarray(factor, jnp.float32)
    return _to_uint8(d + factor * (x - d))


def _grayscale(image_f: jax.Array) -> jax.Array:
    """Luma (rec601) of a float image on the 0..255 scale, shape [H, W, 1]."""
    if image_f.shape[-1] == 1:
        return image_f
    if image_f.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {image_f.shape[-1]}")
    return dm_pix.rgb_to_grayscale(image_f, keep_dims=False)


def _affine_nearest_reflect(
    image: jax.Array, matrix: jax.Array, offset: jax.Array
) -> jax.Array:
    """Pull-resampling ``out[o] = in[matrix @ o + offset]`` over (row, col, chan).

    Nearest-neighbour sampling, reflection fill outside the image.
    """
    out = dm_pix.affine_transform(
        _to_float(image), matrix, offset=offset, order=0, mode="reflect"
    )
    return _to_uint8(out)


# ---------------------------------------------------------------------------
# RandAugment ops: (image uint8 [H, W, C], argument) -> uint8 [H, W, C]
# ---------------------------------------------------------------------------
def identity(image: jax.Array) -> jax.Array:
    return jnp.asarray(image)


def autocontrast(image: jax.Array) -> jax.Array:
    """Per channel: linearly map [min, max] to [0, 255]; constant channels kept."""
    x = _to_float(image)
    lo = jnp.min(x, axis=(0, 1), keepdims=True)
    hi = jnp.max(x, axis=(0, 1), keepdims=True)
    span = hi - lo
    scaled = (x - lo) * (255.0 / jnp.where(span > 0, span, 1.0))
    return _to_uint8(jnp.where(span > 0, scaled, x))


def _equalize_channel(channel: jax.Array) -> jax.Array:
    """Histogram equalization of one uint8 channel [H, W] (PIL / TF-Models)."""
    idx = channel.astype(jnp.int32)
    hist = jnp.bincount(idx.ravel(), length=256)
    # Count of the highest occupied bin (the last nonzero histogram entry).
    last = hist[jnp.max(idx)]
    step = (jnp.sum(hist) - last) // 255
    safe_step = jnp.maximum(step, 1)
    lut = (jnp.cumsum(hist) + safe_step // 2) // safe_step
    lut = jnp.concatenate([jnp.zeros((1,), lut.dtype), lut[:-1]])
    lut = jnp.clip(lut, 0, 255)
    return jnp.where(step == 0, idx, lut[idx]).astype(jnp.uint8)


def equalize(image: jax.Array) -> jax.Array:
    """Per-channel histogram equalization (PIL ``ImageOps.equalize``)."""
    image = jnp.asarray(image)
    _check_image(image)
    out = jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)
    return out.astype(jnp.uint8)


def invert(image: jax.Array) -> jax.Array:
    return (255 - jnp.asarray(image).astype(jnp.int32)).astype(jnp.uint8)


def _rotate_params(image_shape, degrees):
    """Pull matrix/offset of a rotation about the image centre (dm_pix convention)."""
    radians = jnp.asarray(degrees, jnp.float32) * (math.pi / 180.0)
    c, s = jnp.cos(radians), jnp.sin(radians)
    zero, one = jnp.float32(0.0), jnp.float32(1.0)
    matrix = jnp.stack(
        [jnp.stack([c, s, zero]), jnp.stack([-s, c, zero]), jnp.stack([zero, zero, one])]
    )
    center = (jnp.asarray(image_shape, jnp.float32) - 1.0) / 2.0
    return matrix, center - matrix @ center


def _shear_x_params(image_shape, shear):
    matrix = jnp.eye(3, dtype=jnp.float32).at[1, 0].set(jnp.asarray(shear, jnp.float32))
    return matrix, jnp.zeros((3,), jnp.float32)


def _shear_y_params(image_shape, shear):
    matrix = jnp.eye(3, dtype=jnp.float32).at[0, 1].set(jnp.asarray(shear, jnp.float32))
    return matrix, jnp.zeros((3,), jnp.float32)


def _translate_x_params(image_shape, pixels):
    offset = jnp.zeros((3,), jnp.float32).at[1].set(-jnp.asarray(pixels, jnp.float32))
    return jnp.eye(3, dtype=jnp.float32), offset


def _translate_y_params(image_shape, pixels):
    offset = jnp.zeros((3,), jnp.float32).at[0].set(-jnp.asarray(pixels, jnp.float32))
    return jnp.eye(3, dtype=jnp.float32), offset


def _identity_params(image_shape, unused_arg=None):
    return jnp.eye(3, dtype=jnp.float32), jnp.zeros((3,), jnp.float32)


def rotate(image: jax.Array, degrees) -> jax.Array:
    """Rotate about the image centre by ``degrees`` (counter-clockwise when
    positive, i.e. 90 degrees matches ``np.rot90`` on a square image).
    Nearest-neighbour sampling, reflection fill."""
    image = jnp.asarray(image)
    _check_image(image)
    return _affine_nearest_reflect(image, *_rotate_params(image.shape, degrees))


def posterize(image: jax.Array, bits) -> jax.Array:
    """Keep the ``bits`` most significant bits of each value (0 bits -> 0)."""
    x = jnp.asarray(image).astype(jnp.int32)
    shift = 8 - jnp.clip(jnp.asarray(bits, jnp.int32), 0, 8)
    mask = jnp.left_shift(jnp.int32(0xFF), shift) & 0xFF
    return (x & mask).astype(jnp.uint8)


def solarize(image: jax.Array, threshold) -> jax.Array:
    """Invert every value ``>= threshold``."""
    x = jnp.asarray(image).astype(jnp.int32)
    t = jnp.asarray(threshold, jnp.int32)
    return jnp.where(x < t, x, 255 - x).astype(jnp.uint8)


def solarize_add(image: jax.Array, addition, threshold=128) -> jax.Array:
    """Add ``addition`` (clipped to [0, 255]) to every value ``< threshold``."""
    x = jnp.asarray(image).astype(jnp.int32)
    added = jnp.clip(x + jnp.asarray(addition, jnp.int32), 0, 255)
    return jnp.where(x < jnp.asarray(threshold, jnp.int32), added, x).astype(jnp.uint8)


def color(image: jax.Array, factor) -> jax.Array:
    """Saturation enhance: blend from the (rounded) grayscale image.
    The identity on 1-channel images."""
    image = jnp.asarray(image)
    _check_image(image)
    if image.shape[-1] == 1:
        return image
    gray = jnp.round(_grayscale(_to_float(image)))
    degenerate = jnp.broadcast_to(gray, image.shape)
    return blend(degenerate, image, factor)


def contrast(image: jax.Array, factor, gray=None) -> jax.Array:
    """Contrast enhance: blend from a flat image at the (rounded) mean gray (PIL), or at the
    given `gray` level (the TF-Models op's, `tf_models_contrast_gray`)."""
    image = jnp.asarray(image)
    _check_image(image)
    if gray is None:
        gray = jnp.round(jnp.mean(_grayscale(_to_float(image))))
    degenerate = jnp.full(image.shape, gray, jnp.float32)
    return blend(degenerate, image, factor)


def tf_models_contrast_gray(num_pixels: int) -> int:
    """The gray level TF-Models' Contrast blends towards: it means to take the mean gray but
    sums the 256-bin histogram (the pixel count) and divides by 256, then clips to [0, 255] and
    truncates. The reference applies it to a whole batch, so `num_pixels` = B x H x W."""
    return int(min(255, num_pixels // 256))


def brightness(image: jax.Array, factor) -> jax.Array:
    """Brightness enhance: blend from black (``factor * image``)."""
    image = jnp.asarray(image)
    return blend(jnp.zeros(image.shape, jnp.float32), image, factor)


def sharpness(image: jax.Array, factor) -> jax.Array:
    """Sharpness enhance: blend from the image smoothed with the 3x3 kernel
    [[1,1,1],[1,5,1],[1,1,1]]/13 on the interior; the 1-px border is kept."""
    image = jnp.asarray(image)
    _check_image(image)
    h, w, _ = image.shape
    x = _to_float(image)
    weights = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
    smooth = jnp.zeros((h - 2, w - 2, x.shape[-1]), jnp.float32)
    for dy in range(3):
        for dx in range(3):
            smooth = smooth + weights[dy][dx] * x[dy : dy + h - 2, dx : dx + w - 2]
    smooth = jnp.round(jnp.clip(smooth / 13.0, 0.0, 255.0))
    degenerate = x.at[1:-1, 1:-1].set(smooth)
    return blend(degenerate, image, factor)


def shear_x(image: jax.Array, shear) -> jax.Array:
    """``out[r, c] = in[r, c + shear * r]`` (TF-Models convention)."""
    image = jnp.asarray(image)
    return _affine_nearest_reflect(image, *_shear_x_params(image.shape, shear))


def shear_y(image: jax.Array, shear) -> jax.Array:
    """``out[r, c] = in[r + shear * c, c]`` (TF-Models convention)."""
    image = jnp.asarray(image)
    return _affine_nearest_reflect(image, *_shear_y_params(image.shape, shear))


def translate_x(image: jax.Array, pixels) -> jax.Array:
    """Move the content ``pixels`` to the right (negative: left):
    ``out[r, c] = in[r, c - pixels]``, nearest sampling, reflection fill."""
    image = jnp.asarray(image)
    return _affine_nearest_reflect(image, *_translate_x_params(image.shape, pixels))


def translate_y(image: jax.Array, pixels) -> jax.Array:
    """Move the content ``pixels`` down (negative: up):
    ``out[r, c] = in[r - pixels, c]``, nearest sampling, reflection fill."""
    image = jnp.asarray(image)
    return _affine_nearest_reflect(image, *_translate_y_params(image.shape, pixels))


def cutout(image: jax.Array, pad_size, center_y, center_x, replace=CUTOUT_FILL) -> jax.Array:
    """Set rows ``[cy - pad, cy + pad)`` x cols ``[cx - pad, cx + pad)``
    (clipped to the image) to ``replace`` in every channel."""
    image = jnp.asarray(image)
    _check_image(image)
    h, w, _ = image.shape
    pad = jnp.asarray(pad_size, jnp.int32)
    cy = jnp.asarray(center_y, jnp.int32)
    cx = jnp.asarray(center_x, jnp.int32)
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    inside = (rows >= cy - pad) & (rows < cy + pad) & (cols >= cx - pad) & (cols < cx + pad)
    return jnp.where(inside, jnp.asarray(replace, image.dtype), image)


# ---------------------------------------------------------------------------
# Level -> argument (level in [0, 10])
# ---------------------------------------------------------------------------
def _frac(level) -> jax.Array:
    return jnp.asarray(level, jnp.float32) / MAX_LEVEL


def rotate_level_to_arg(level) -> jax.Array:
    """Unsigned rotation in degrees: 3 * L."""
    return _frac(level) * 30.0


def posterize_level_to_arg(level) -> jax.Array:
    """Bits kept: int(0.4 * L)."""
    return jnp.floor(_frac(level) * 4.0).astype(jnp.int32)


def solarize_level_to_arg(level) -> jax.Array:
    """Threshold: int(25.6 * L)."""
    return jnp.floor(_frac(level) * 256.0).astype(jnp.int32)


def solarize_add_level_to_arg(level) -> jax.Array:
    """Addition: int(11 * L)."""
    return jnp.floor(_frac(level) * 110.0).astype(jnp.int32)


def enhance_level_to_arg(level) -> jax.Array:
    """Enhance factor: 0.18 * L + 0.1."""
    return _frac(level) * 1.8 + 0.1


def shear_level_to_arg(level) -> jax.Array:
    """Unsigned shear: 0.03 * L."""
    return _frac(level) * 0.3


def translate_level_to_arg(level) -> jax.Array:
    """Unsigned translation in px: 0.8 * L (translate_const 8)."""
    return _frac(level) * TRANSLATE_CONST


def cutout_level_to_arg(level) -> jax.Array:
    """Cutout half-size in px: int(1.6 * L) (cutout_const 16)."""
    return jnp.floor(_frac(level) * CUTOUT_CONST).astype(jnp.int32)


def _uniform_int(u: jax.Array, n: int) -> jax.Array:
    """Map u ~ U[0, 1) to an integer uniform in {0, ..., n - 1}."""
    return jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, n - 1)


# ---------------------------------------------------------------------------
# Branches of the RandAugment switch
# ---------------------------------------------------------------------------
# Randomness inside a branch comes from ``rnd``, a float32[3] of U[0, 1)
# draws: rnd[0] gives the sign of signed ops (negative if < 0.5), rnd[1:3]
# the Cutout centre (row, col). Drawing all of a layer's randomness in one
# PRNG call keeps the compiled graph small (each PRNG call site is costly to
# compile on CPU).
#
# The five geometric ops share one resampling: their branches only produce the
# pull matrix/offset and a single warp runs after the switch. Under vmap a
# switch evaluates every branch, so this saves four gathers per image.
def _cutout_branch(image, level, rnd):
    h, w, _ = image.shape
    cy = _uniform_int(rnd[1], h)
    cx = _uniform_int(rnd[2], w)
    return cutout(image, cutout_level_to_arg(level), cy, cx)


def _signed(level_to_arg):
    def arg(level, rnd):
        value = level_to_arg(level)
        return jnp.where(rnd[0] < 0.5, -value, value)

    return arg


# name -> (params fn, signed argument from (level, rnd))
_GEOMETRIC = {
    "Rotate": (_rotate_params, _signed(rotate_level_to_arg)),
    "ShearX": (_shear_x_params, _signed(shear_level_to_arg)),
    "ShearY": (_shear_y_params, _signed(shear_level_to_arg)),
    "TranslateX": (_translate_x_params, _signed(translate_level_to_arg)),
    "TranslateY": (_translate_y_params, _signed(translate_level_to_arg)),
}

_PIXEL = {
    "AutoContrast": lambda img, lvl, rnd: autocontrast(img),
    "Equalize": lambda img, lvl, rnd: equalize(img),
    "Invert": lambda img, lvl, rnd: invert(img),
    "Posterize": lambda img, lvl, rnd: posterize(img, posterize_level_to_arg(lvl)),
    "Solarize": lambda img, lvl, rnd: solarize(img, solarize_level_to_arg(lvl)),
    "Color": lambda img, lvl, rnd: color(img, enhance_level_to_arg(lvl)),
    "Contrast": lambda img, lvl, rnd, gray=None: contrast(img, enhance_level_to_arg(lvl), gray),
    "Brightness": lambda img, lvl, rnd: brightness(img, enhance_level_to_arg(lvl)),
    "Sharpness": lambda img, lvl, rnd: sharpness(img, enhance_level_to_arg(lvl)),
    "Cutout": _cutout_branch,
    "SolarizeAdd": lambda img, lvl, rnd: solarize_add(img, solarize_add_level_to_arg(lvl)),
    "Identity": lambda img, lvl, rnd: jnp.asarray(img),
}
assert set(_GEOMETRIC) | set(_PIXEL) == set(RAND_AUGMENT_OPS)
assert not set(_GEOMETRIC) & set(_PIXEL)

_GEOMETRIC_MASK = tuple(name in _GEOMETRIC for name in RAND_AUGMENT_OPS)


def _pixel_branch(name, contrast_gray=None):
    fn = _PIXEL.get(name, _PIXEL["Identity"])
    if name == "Contrast":
        return lambda img, lvl, rnd: fn(img, lvl, rnd, contrast_gray).astype(jnp.uint8)
    return lambda img, lvl, rnd: fn(img, lvl, rnd).astype(jnp.uint8)


def _params_branch(name, image_shape):
    if name not in _GEOMETRIC:
        return lambda lvl, rnd: _identity_params(image_shape)
    params_fn, arg_fn = _GEOMETRIC[name]
    return lambda lvl, rnd: params_fn(image_shape, arg_fn(lvl, rnd))


def _apply_op(index, image, level, rnd, contrast_gray=None):
    index = jnp.asarray(index, jnp.int32)
    level = jnp.asarray(level, jnp.float32)
    pixel_out = jax.lax.switch(
        index, [_pixel_branch(n, contrast_gray) for n in RAND_AUGMENT_OPS], image, level, rnd
    )
    matrix, offset = jax.lax.switch(
        index, [_params_branch(n, image.shape) for n in RAND_AUGMENT_OPS], level, rnd
    )
    warped = _affine_nearest_reflect(image, matrix, offset)
    is_geometric = jnp.asarray(_GEOMETRIC_MASK)[index]
    return jnp.where(is_geometric, warped, pixel_out)


def apply_op(index, image: jax.Array, level, key: jax.Array) -> jax.Array:
    """Apply RandAugment branch ``index`` (see ``RAND_AUGMENT_OPS``) at ``level``.

    ``key`` draws the random sign of signed ops (rotate, shear, translate;
    probability 0.5 each) and the Cutout centre (uniform over the pixels).
    """
    image = jnp.asarray(image)
    _check_image(image)
    if image.dtype != jnp.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    rnd = jax.random.uniform(key, (3,), jnp.float32)
    return _apply_op(index, image, level, rnd)


def rand_augment(
    key: jax.Array,
    image: jax.Array,
    num_layers: int = RA_NUM_LAYERS,
    magnitude: float = RA_MAGNITUDE,
    prob_to_apply: float = RA_PROB_TO_APPLY,
) -> jax.Array:
    """RandAugment on one uint8 image ``[H, W, C]`` (C = 1 or 3) -> uint8.

    Each of ``num_layers`` layers draws level = clip(magnitude + N(0, 1), 0, 10),
    picks one of the 17 branches of ``RAND_AUGMENT_OPS`` uniformly, and keeps
    the result with probability ``prob_to_apply`` (otherwise the layer input).
    ``magnitude`` and ``prob_to_apply`` may be traced; ``num_layers`` is static.
    """
    image = jnp.asarray(image)
    _check_image(image)
    if image.dtype != jnp.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    num_layers = int(num_layers)
    if num_layers <= 0:
        return image
    draws = jax.random.uniform(key, (num_layers, 6), jnp.float32)
    return _rand_augment_from_draws(draws, image, magnitude, prob_to_apply)


def _rand_augment_from_draws(draws, image, magnitude, prob_to_apply, contrast_gray=None):
    """RandAugment driven by ``draws``: float32 [num_layers, 6] of U[0, 1); ``contrast_gray``:
    Contrast's fixed gray level (None: the image's mean gray)."""
    magnitude = jnp.asarray(magnitude, jnp.float32)
    prob_to_apply = jnp.asarray(prob_to_apply, jnp.float32)
    n_ops = len(RAND_AUGMENT_OPS)

    def layer(img, u):
        # u: U[0, 1) draws for (op, level noise, apply coin, sign, cutout row, col).
        op_index = _uniform_int(u[0], n_ops)
        # Inverse-CDF normal; u[1] == 0 gives -inf, which the clip maps to 0.
        noise = jax.scipy.special.ndtri(u[1])
        level = jnp.clip(magnitude + noise, 0.0, MAX_LEVEL)
        augmented = _apply_op(op_index, img, level, u[3:6], contrast_gray)
        keep = u[2] < prob_to_apply
        return jnp.where(keep, augmented, img), None

    # A scan traces the 17 branches only once, whatever the number of layers.
    image, _ = jax.lax.scan(layer, image, draws)
    return image


# ---------------------------------------------------------------------------
# Crop, flip, batch pipeline
# ---------------------------------------------------------------------------
def _crop_at(image: jax.Array, padding: int, oy, ox) -> jax.Array:
    """H x W window at offset (oy, ox) of the image zero-padded by ``padding``."""
    if padding == 0:
        return image
    h, w, c = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return jax.lax.dynamic_slice(
        padded, (jnp.asarray(oy, jnp.int32), jnp.asarray(ox, jnp.int32), jnp.int32(0)), (h, w, c)
    )


def _check_padding(padding) -> int:
    padding = int(padding)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return padding


def random_crop(key: jax.Array, image: jax.Array, padding: int) -> jax.Array:
    """Zero-pad ``padding`` px on each side of H and W, then take a random
    H x W crop; the offsets are uniform in {0, ..., 2 * padding}."""
    image = jnp.asarray(image)
    _check_image(image)
    padding = _check_padding(padding)
    if padding == 0:
        return image
    oy, ox = jax.random.randint(key, (2,), 0, 2 * padding + 1)
    return _crop_at(image, padding, oy, ox)


def _flip_if(image: jax.Array, do_flip) -> jax.Array:
    return jnp.where(do_flip, dm_pix.flip_left_right(image), image)


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    """Horizontal (left-right) flip with probability 0.5."""
    image = jnp.asarray(image)
    _check_image(image)
    return _flip_if(image, jax.random.bernoulli(key, 0.5))


def augment_batch(
    key: jax.Array,
    images_u8: jax.Array,
    *,
    randaugment: bool,
    crop_padding: int,
    flip: bool,
    contrast: str = "tf_models",
) -> jax.Array:
    """Augment a uint8 batch ``[B, H, W, C]`` per image; returns float32 in [0, 1].

    Order per image (own key each): RandAugment (N=2, M=9, p=0.5) on uint8 if
    ``randaugment``, zero-pad random crop (offsets uniform in
    {0..2*crop_padding}; crop_padding=0 disables it), random horizontal flip
    (p=0.5) if ``flip``, then /255. ``contrast``: RandAugment's Contrast blends towards
    the reference's gray level (``tf_models``: tf_models_contrast_gray of the batch's pixel
    count) or the image's mean gray (``mean``, as PIL).
    """
    images_u8 = jnp.asarray(images_u8)
    if images_u8.ndim != 4:
        raise ValueError(f"expected [B, H, W, C], got shape {images_u8.shape}")
    if images_u8.dtype != jnp.uint8:
        raise TypeError(f"expected uint8 images, got {images_u8.dtype}")

    crop_padding = _check_padding(crop_padding)
    n_crop = 2 * crop_padding + 1
    n_ra = RA_NUM_LAYERS * 6
    if contrast not in ("tf_models", "mean"):
        raise ValueError(f"contrast must be tf_models or mean, got {contrast!r}")
    gray = tf_models_contrast_gray(math.prod(images_u8.shape[:3])) if contrast == "tf_models" else None

    def one(k, img):
        # One PRNG call per image (the same per-image ops as rand_augment,
        # random_crop and random_flip, but with fewer PRNG call sites to compile):
        # RandAugment draws, crop offsets (row, col), flip coin.
        u = jax.random.uniform(k, (n_ra + 3,), jnp.float32)
        if randaugment:
            draws = u[:n_ra].reshape(RA_NUM_LAYERS, 6)
            img = _rand_augment_from_draws(draws, img, RA_MAGNITUDE, RA_PROB_TO_APPLY, gray)
        oy = _uniform_int(u[n_ra], n_crop)
        ox = _uniform_int(u[n_ra + 1], n_crop)
        img = _crop_at(img, crop_padding, oy, ox)
        if flip:
            img = _flip_if(img, u[n_ra + 2] < 0.5)
        return img

    keys = jax.random.split(key, images_u8.shape[0])
    out = jax.vmap(one)(keys, images_u8)
    return out.astype(jnp.float32) / 255.0


def eval_images(images_u8: jax.Array) -> jax.Array:
    """Validation / test preprocessing: float32 in [0, 1], no augmentation."""
    return jnp.asarray(images_u8).astype(jnp.float32) / 255.0


def training_images(batch: dict, augment) -> jax.Array:
    """A training batch's float images in [0, 1]. The streaming path's arrive augmented by its
    workers (`augmented_images`, data/stream.py); the on-device path's are augmented here,
    `augment(uint8 images) -> float images`."""
    if "augmented_images" in batch:
        return eval_images(batch["augmented_images"])
    return augment(batch["images"])


# ---------------------------------------------------------------------------
# Mixup
# ---------------------------------------------------------------------------
def mixup(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    alpha: float,
) -> tuple[jax.Array, jax.Array]:
    """Batch mixup with one lambda ~ Beta(alpha, alpha) and one permutation.

    ``x~ = (1 - lam) * x + lam * x[perm]``; the hard label is ``y`` if
    ``lam < 0.5`` else ``y[perm]``. Returns ``(images, labels)`` unchanged if
    ``alpha <= 0`` (Python check) or if ``mask`` (bool [B], False = padding)
    has any False entry (traced check).
    """
    if alpha <= 0:
        return images, labels
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    perm = jax.random.permutation(k_perm, images.shape[0])
    mixed = (1.0 - lam) * images + lam * images[perm]
    mixed_labels = jnp.where(lam < 0.5, labels, labels[perm])
    apply = jnp.all(jnp.asarray(mask, bool))
    out_images = jnp.where(apply, mixed.astype(images.dtype), images)
    out_labels = jnp.where(apply, mixed_labels, labels)
    return out_images, out_labels


def configured_pipeline(key, batch, config):
    """`student_pipeline` with a method config's mixup_alpha, randaugment, crop_padding, flip
    and randaugment_contrast."""
    return student_pipeline(key, batch, mixup_alpha=config.mixup_alpha,
                            randaugment=config.randaugment, crop_padding=config.crop_padding,
                            flip=config.flip, contrast=config.randaugment_contrast)


def student_pipeline(key, batch, *, mixup_alpha: float, randaugment: bool = True,
                     crop_padding: int = 4, flip: bool = True, contrast: str = "tf_models"):
    """The distillation students' input pipeline (spec §1), per image with its own key:
    RandAugment(2, 9) → zero-pad crop → horizontal flip → /255 → mixup over the batch.

    `batch` is the trainer's {"images": uint8, "labels", "mask"}; returns (images, labels), the
    labels being mixup's dominant ones. Teachers and students all see the same mixed images. A
    streamed batch arrives augmented by its workers; only mixup (over the global batch) is left.
    """
    augment_key, mixup_key = jax.random.split(key)
    images = training_images(batch, lambda images_u8: augment_batch(
        augment_key, images_u8, randaugment=randaugment, crop_padding=crop_padding, flip=flip,
        contrast=contrast))
    return mixup(mixup_key, images, batch["labels"], batch["mask"], mixup_alpha)
