"""What every zoo network shares: the registry by name, the spec for sidecars, and the layers
with PyTorch's eval-mode semantics (symmetric padding, BatchNorm ε = 1e-5 on running statistics).

Parameter names follow the PyTorch definitions' state-dict keys with '.' replaced by '_'
(`layer1.0.conv1` is `layer1_0_conv1`), except that the classifier is always `classifier`
(what GenDD's teacher loader and the KD/EDFM scripts look for): a converted checkpoint can be
checked by eye against the PyTorch definition, and the converter needs no table per network.
"""
import dataclasses
import difflib
import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.resnet import ResNetOutput

# RepDistiller/CRD's CIFAR-100 normalisation (its teachers were trained with it).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

# PyTorch's BatchNorm2d defaults: momentum 0.1 (flax counts the other way: 0.9) and ε 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# RepDistiller initialises convolutions with N(0, 2 / (k·k·out_channels)), i.e. He-normal on fan-out.
fan_out_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ZooNet(nn.Module):
    """Base of the zoo's networks: the call signature of models.resnet.ResNet.

    `__call__(images, train=False, return_features=False)` takes float images in [0, 1] (NHWC),
    standardizes them with `pixel_mean`/`pixel_std` and returns float32 logits, or a ResNetOutput
    (logits, the pooled feature that feeds the classifier, the last feature map).
    """

    num_classes: int
    arch: str = ""  # the registry name, written into the spec so an export rebuilds itself
    pixel_mean: Sequence[float] = CIFAR100_MEAN
    pixel_std: Sequence[float] = CIFAR100_STD
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    # Zoo networks are never FED's noise-injected generator; scripts that load a "resnet" export
    # check this attribute of models.resnet.ResNet.
    noise_std: ClassVar[float] = 0.0

    def standardize(self, images):
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        return ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)

    def conv(self, features: int, kernel: int, name: str, stride: int = 1, padding: int | None = None,
             groups: int = 1, bias: bool = False):
        """nn.Conv with PyTorch's explicit symmetric padding (default kernel // 2), never 'SAME'
        (which pads stride-2 convolutions (0, 1))."""
        pad = kernel // 2 if padding is None else padding
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                       feature_group_count=groups, use_bias=bias, kernel_init=fan_out_normal,
                       dtype=self.dtype, name=name)

    def batch_norm(self, train: bool, name: str):
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                            dtype=self.dtype, name=name)

    def classify(self, feature_map, return_features: bool):
        """Global average pooling (in float32), the classifier, and the output in the form asked."""
        pooled = jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(pooled)
        logits = logits.astype(jnp.float32)
        if return_features:
            return ResNetOutput(logits, pooled, feature_map)
        return logits


def channel_shuffle(x, groups: int):
    """ShuffleNet's channel shuffle in NHWC: channel g·(C/G) + j moves to j·G + g, as PyTorch's
    view(N, G, C/G, H, W).permute(0, 2, 1, 3, 4) does in NCHW."""
    *rest, channels = x.shape
    x = x.reshape(*rest, groups, channels // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*rest, channels)


@functools.lru_cache(maxsize=64)
def variable_shapes(model: ZooNet, image_shape: tuple) -> dict:
    """The shapes (jax.ShapeDtypeStruct) of `model`'s variables for images of `image_shape`
    (H, W, C). Traced once per network and shape, as tracing a deep network costs about a second
    and the converter and the parameter-count checks ask for the same ones; do not modify."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32))


# ------------------------------------------------------------------------------- the registry
_BUILDERS: dict[str, Callable[..., ZooNet]] = {}
_ALIASES: dict[str, str] = {}  # other names in use (RepDistiller's model_dict keys) -> registry name


def register_model(name: str, aliases: Sequence[str] = ()):
    """Register `builder(num_classes=..., arch=name, **fields) -> ZooNet` under `name` (and
    `aliases`); use as a decorator or call with a builder (e.g. functools.partial(Class, ...))."""
    def decorate(builder):
        for key in (name, *aliases):
            if key in _BUILDERS or key in _ALIASES:
                raise ValueError(f"zoo model {key!r} is registered twice")
        _BUILDERS[name] = builder
        _ALIASES.update({alias: name for alias in aliases})
        return builder

    return decorate


def model_names() -> list[str]:
    """The registry names, in the order the families registered them."""
    return list(_BUILDERS)


def canonical_arch(arch: str) -> str:
    """The registry name of `arch` (itself or an alias); ValueError naming the nearest names."""
    if arch in _BUILDERS:
        return arch
    if arch in _ALIASES:
        return _ALIASES[arch]
    known = sorted([*_BUILDERS, *_ALIASES])
    near = difflib.get_close_matches(arch, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise ValueError(f"unknown zoo architecture {arch!r}; {hint}known: {', '.join(model_names())}")


def build_model(arch: str, num_classes: int, **fields) -> ZooNet:
    """The zoo network `arch` (a registry name or alias) for `num_classes` classes; `fields`
    override its constructor fields (pixel_mean, pixel_std, dtype, or the architecture's own)."""
    name = canonical_arch(arch)
    return _BUILDERS[name](num_classes=num_classes, arch=name, **fields)


# ------------------------------------------------------------------------- specs for sidecars
_NOT_SPEC = ("parent", "name", "dtype")


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def zoo_spec(model: ZooNet) -> dict:
    """The architecture as a JSON-able dict: "arch" and every constructor field but dtype."""
    return {field.name: _to_json(getattr(model, field.name)) for field in dataclasses.fields(model)
            if field.name not in _NOT_SPEC}


def zoo_from_spec(spec: dict, dtype=jnp.float32) -> ZooNet:
    fields = {key: _from_json(value) for key, value in spec.items()}
    return build_model(fields.pop("arch"), fields.pop("num_classes"), dtype=dtype, **fields)
