"""The CIFAR-style ResNet zoo (spec §2): FRN or BatchNorm, Swish or ReLU, any depth 6n+2, any width.

One module covers every variant used here:
- the teachers and KD/ProxyEnDD students ("FRN-Swish", the reference's "frnrelu" configs);
- the FED generator (`noise_std > 0`: input noise concatenated to the image, scaled Gaussian
  noise before each stage and after pooling, spec §2 "FED noise-injected ResNet");
- GenDD's BatchNorm/ReLU teacher and student pairs (`norm="bn"`, `activation="relu"`).

Images come in as float in [0, 1]; the network standardizes them itself with the data set's
pixel statistics, so a checkpoint carries everything it needs to predict.
"""
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class FilterResponseNorm(nn.Module):
    """FRN with its thresholded linear unit: max(γ·x/√(mean_hw x² + ε) + β, τ)."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        threshold = self.param("threshold", nn.initializers.zeros, (channels,))
        # The mean square is taken in float32 even under bf16 compute: it is a reduction.
        mean_square = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=(1, 2), keepdims=True)
        y = x * jax.lax.rsqrt(mean_square + self.epsilon).astype(x.dtype)
        y = scale.astype(x.dtype) * y + bias.astype(x.dtype)
        return jnp.maximum(y, threshold.astype(x.dtype))


def parse_style(model_style: str) -> tuple[str, str]:
    """'FRN-Swish' -> ('frn', 'swish'); 'BN-ReLU' -> ('bn', 'relu')."""
    norm, activation = model_style.lower().split("-")
    if norm not in ("frn", "bn") or activation not in ("swish", "relu"):
        raise ValueError(f"model_style must be FRN|BN - Swish|ReLU, got {model_style!r}")
    return norm, activation


class ResNetOutput(NamedTuple):
    logits: jax.Array
    pooled: jax.Array  # [B, C_last], the input of the classifier
    feature_map: jax.Array  # [B, H/4, W/4, C_last], before pooling


class ResNet(nn.Module):
    num_classes: int
    depth: int = 32
    width: int = 2
    planes: int = 16  # stage s has planes * 2**s * width channels
    stem_planes: Optional[int] = None  # defaults to `planes` (not widened, as the reference)
    norm: str = "frn"
    activation: str = "swish"
    conv_bias: bool = True
    pixel_mean: Sequence[float] = (0.49, 0.48, 0.44)
    pixel_std: Sequence[float] = (0.2, 0.2, 0.2)
    noise_std: float = 0.0  # > 0 makes this the FED noise-injected generator
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32
    # The classifier's kernel initialiser: he_normal as the EDFM reference's fc, or lecun_normal
    # (Flax's default, which every model trained here before 2026-12-02 used). Only initialisation
    # reads it, so it is not part of the architecture's spec.
    classifier_init: str = "he_normal"

    def _norm(self, train: bool, name: str):
        if self.norm == "frn":
            return FilterResponseNorm(name=name)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            dtype=self.dtype, name=name)

    def _act(self, x):
        return nn.swish(x) if self.activation == "swish" else nn.relu(x)

    def _conv(self, features, kernel, stride, name):
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                       use_bias=self.conv_bias, kernel_init=he_normal, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"model_depth must be 6n+2, got {self.depth}")
        blocks_per_stage = (self.depth - 2) // 6
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        x = (images.astype(jnp.float32) - mean) / std

        noisy = self.noise_std > 0
        if noisy:
            # Four learned noise scales, initialised to 1 (a bias-free Dense applied to 1).
            scales = nn.Dense(4, use_bias=False, kernel_init=nn.initializers.ones,
                              name="noise_scales")(jnp.ones((1,)))
            noise_key = self.make_rng("noise")
            input_key, *stage_keys = jax.random.split(noise_key, 5)
            input_noise = self.noise_std * jax.random.normal(input_key, x.shape)
            x = jnp.concatenate([x, input_noise], axis=-1)

            def inject(h, index):
                noise = jax.random.normal(stage_keys[index], h.shape, jnp.float32)
                return h + (scales[index] * self.noise_std * noise).astype(h.dtype)

        x = x.astype(self.dtype)
        x = self._conv(self.stem_planes or self.planes, 3, 1, "stem_conv")(x)
        x = self._act(self._norm(train, "stem_norm")(x))
        for stage in range(3):
            if noisy:
                x = inject(x, stage)
            features = self.planes * 2**stage * self.width
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                name = f"stage{stage}_block{block}"
                residual = x
                y = self._conv(features, 3, stride, f"{name}_conv1")(x)
                y = self._act(self._norm(train, f"{name}_norm1")(y))
                y = self._conv(features, 3, 1, f"{name}_conv2")(y)
                y = self._norm(train, f"{name}_norm2")(y)
                if residual.shape != y.shape:
                    residual = self._conv(features, 1, stride, f"{name}_proj_conv")(residual)
                    residual = self._norm(train, f"{name}_proj_norm")(residual)
                x = self._act(y + residual)
        feature_map = x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if noisy:
            pooled = inject(pooled, 3)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier",
                          kernel_init=CLASSIFIER_INITS[self.classifier_init])(pooled)
        logits = logits.astype(jnp.float32)
        if return_features:
            return ResNetOutput(logits, pooled, feature_map)
        return logits


CLASSIFIER_INITS = {"he_normal": he_normal, "lecun_normal": nn.initializers.lecun_normal()}


def resnet_from_config(config, num_classes: int, pixel_mean, pixel_std, *, noise_std: float = 0.0,
                       dtype=jnp.float32):
    """The network the config names: the zoo's `model_arch` (models.zoo, e.g. resnet8x4), else
    this module's ResNet from the model_* keys (reference key names)."""
    if getattr(config, "model_arch", None):
        from models.zoo import build_model

        if noise_std:
            raise ValueError("a zoo network (model_arch) cannot be FED's noise-injected generator")
        return build_model(config.model_arch, num_classes, pixel_mean=tuple(pixel_mean),
                           pixel_std=tuple(pixel_std), dtype=dtype)
    norm, activation = parse_style(config.model_style)
    return ResNet(num_classes=num_classes, depth=config.model_depth, width=config.model_width,
                  planes=config.model_planes, stem_planes=config.model_stem_planes, norm=norm,
                  activation=activation, conv_bias=not config.model_nobias, pixel_mean=tuple(pixel_mean),
                  pixel_std=tuple(pixel_std), noise_std=noise_std, dtype=dtype,
                  classifier_init=getattr(config, "model_classifier_init", "he_normal"))


SPEC_FIELDS = ("num_classes", "depth", "width", "planes", "stem_planes", "norm", "activation",
               "conv_bias", "pixel_mean", "pixel_std", "noise_std")


def network_name(model) -> str:
    """How logs name a network: ResNet-8x2 for this module's, the registry name for the zoo's."""
    return f"ResNet-{model.depth}x{model.width}" if isinstance(model, ResNet) else model.arch


def resnet_spec(model) -> dict:
    """The architecture as a JSON-able dict, for checkpoint sidecars. A zoo network (models.zoo)
    writes its registry name as "arch" plus its constructor fields."""
    if not isinstance(model, ResNet):
        from models.zoo import zoo_spec

        return zoo_spec(model)
    spec = {name: getattr(model, name) for name in SPEC_FIELDS}
    spec["pixel_mean"], spec["pixel_std"] = list(model.pixel_mean), list(model.pixel_std)
    return spec


def resnet_from_spec(spec: dict, dtype=jnp.float32):
    """The network a sidecar's spec describes: a zoo network (models.zoo) when the spec names an
    "arch", else this module's ResNet (whose specs have no "arch")."""
    if "arch" in spec:
        from models.zoo import zoo_from_spec

        return zoo_from_spec(spec, dtype=dtype)
    spec = dict(spec)
    spec["pixel_mean"], spec["pixel_std"] = tuple(spec["pixel_mean"]), tuple(spec["pixel_std"])
    return ResNet(**spec, dtype=dtype)
