import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.resnet import FilterResponseNorm, ResNet, parse_style, resnet_from_spec, resnet_spec


def param_count(model, channels=3, size=32):
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    shapes = jax.eval_shape(lambda: model.init(rngs, jnp.zeros((1, size, size, channels))))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("width, classes, noise, expected", [
    (2, 10, 0.0, 1_860_986), (4, 100, 0.0, 7_433_044),  # spec §2
    (2, 10, 0.1, 1_861_422), (4, 100, 0.1, 7_433_480),  # FED: +436
])
def test_parameter_counts_pinned(width, classes, noise, expected):
    assert param_count(ResNet(classes, depth=32, width=width, noise_std=noise)) == expected


def test_filter_response_norm_matches_definition():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
    frn = FilterResponseNorm()
    params = {"params": {"scale": np.array([1.0, 2.0, 0.5], np.float32),
                         "bias": np.array([0.0, 0.1, -0.2], np.float32),
                         "threshold": np.array([-0.5, 0.0, 0.3], np.float32)}}
    out = frn.apply(params, x)
    nu2 = np.mean(x ** 2, axis=(1, 2), keepdims=True)
    p = params["params"]
    expected = np.maximum(p["scale"] * x / np.sqrt(nu2 + 1e-6) + p["bias"], p["threshold"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_features_and_standardization():
    model = ResNet(10, depth=8, width=1, pixel_mean=(0.5,), pixel_std=(0.25,))
    images = jax.random.uniform(jax.random.PRNGKey(0), (3, 28, 28, 1))
    variables = model.init(jax.random.PRNGKey(1), images)
    out = model.apply(variables, images, return_features=True)
    assert out.logits.shape == (3, 10) and out.pooled.shape == (3, 64)
    assert out.feature_map.shape == (3, 7, 7, 64)
    np.testing.assert_allclose(out.pooled, out.feature_map.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    # The network standardizes internally: shifting the statistics with the input is a no-op.
    shifted = ResNet(10, depth=8, width=1, pixel_mean=(0.5 + 0.1,), pixel_std=(0.25,))
    np.testing.assert_allclose(shifted.apply(variables, images + 0.1), out.logits, rtol=1e-4, atol=1e-5)


def test_batchnorm_relu_variant_updates_statistics():
    model = ResNet(10, depth=8, width=1, norm="bn", activation="relu", conv_bias=False)
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    assert "batch_stats" in variables
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])[0]
    after = jax.tree.leaves(updates["batch_stats"])[0]
    assert not np.allclose(before, after)


def test_noise_injection_is_random_and_keyed():
    model = ResNet(10, depth=8, width=1, noise_std=0.1)
    images = jnp.ones((2, 32, 32, 3)) * 0.5
    variables = model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}, images)
    a = model.apply(variables, images, rngs={"noise": jax.random.PRNGKey(2)})
    b = model.apply(variables, images, rngs={"noise": jax.random.PRNGKey(2)})
    c = model.apply(variables, images, rngs={"noise": jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_spec_round_trip_and_style():
    model = ResNet(7, depth=14, width=3, stem_planes=32, norm="bn", activation="relu")
    assert resnet_from_spec(resnet_spec(model)) == model
    assert parse_style("FRN-Swish") == ("frn", "swish") and parse_style("BN-ReLU") == ("bn", "relu")
    with pytest.raises(ValueError):
        parse_style("LN-GELU")


def test_classifier_init_is_the_reference_he_normal_or_flax_lecun_normal():
    """The EDFM reference's fc is He-normal (truncated normal, variance 2 / fan_in); Flax's
    default, LeCun-normal, has half that variance. The config key picks either."""
    from utils.config import CommonConfig
    from models.resnet import resnet_from_config

    stds = {}
    for name in ("he_normal", "lecun_normal"):
        config = CommonConfig(model_depth=8, model_width=16, model_classifier_init=name)
        model = resnet_from_config(config, 100, (0.5,), (0.25,))
        kernel = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]["classifier"]["kernel"]
        fan_in = kernel.shape[0]  # 16 x 4 x 16 = 1024 channels pooled, 102,400 weights
        stds[name] = float(np.std(kernel)) * np.sqrt(fan_in)
    assert stds["he_normal"] == pytest.approx(np.sqrt(2.0), rel=0.02)
    assert stds["lecun_normal"] == pytest.approx(1.0, rel=0.02)
