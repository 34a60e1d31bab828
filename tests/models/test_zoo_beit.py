"""The zoo's BEiT-v2 teachers (GenDD's beitv2_{base,large}_patch16_224) against the PyTorch
definition written from GenDD's models/beit.py (tests/models/beit_torch.py): a small network of
the same design (2 blocks, dim 64, 4 heads, 224x224 inputs, so the 14x14 grid and its relative
position index are the real ones) with random weights, layer scales, bias tables and LayerNorms,
saved as a bare state dict (as GenDD loads its teachers), converted through the real
`python -m utils.convert torch`, logits and pooled features compared in eval mode; the full
ViT-B/16 and ViT-L/16 are counted without memory (torch's meta device) or compute (eval_shape)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.resnet import ResNetOutput, resnet_from_spec, resnet_spec
from models.zoo import build_model, canonical_arch, model_names, variable_shapes
from models.zoo.beit import BEiT, relative_position_index
from models.zoo.resnet_imagenet import IMAGENET_DATA_NAME, IMAGENET_MEAN, IMAGENET_STD
from utils.errors import UserError
from tests.models.torch_compare import relative_error, standardized_nchw

# Trainable parameters with 1000 classes (timm lists 86.53M and 304.43M): per block 12·D² + 14·D
# (qkv without bias, q_bias, v_bias, proj, fc1, fc2, two LayerNorms, two layer scales) + 732·heads
# (the relative position bias table), plus the patch embedding, cls token, fc_norm and head.
PARAM_COUNTS = {"beitv2_base_patch16_224": 86_530_984, "beitv2_large_patch16_224": 304_430_568}
SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 4}  # the compared network
SMALL_ARCH = "beitv2_small_test"  # registered for one test only (monkeypatch)
IMAGE_SHAPE = (224, 224, 3)
# float32 against float32: 3.5e-7 (logits) here. Measured mistakes: the tanh GELU 1.3e-4, the bias
# index transposed 8e-3, LayerNorm ε 1e-5 6e-2, q_bias and v_bias swapped 0.18; so 1e-5, not the
# ImageNet CNNs' 1e-4, which the tanh GELU would pass.
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def small(torch):
    """The small PyTorch BEiT with random weights, and one 224x224 image in [0, 1] (NHWC)."""
    from tests.models.beit_torch import build, randomize

    torch.manual_seed(0)
    model = randomize(build(SMALL_ARCH, 1000, **SMALL), seed=0)
    images = np.random.default_rng(0).uniform(size=(1, *IMAGE_SHAPE)).astype(np.float32)
    return model, images


def small_zoo_model(**fields):
    return BEiT(num_classes=1000, arch=SMALL_ARCH, **SMALL, **fields)


def torch_outputs(torch, model, images):
    """(pooled, logits) of the PyTorch network on images normalised as GenDD's loaders do."""
    with torch.no_grad():
        pooled, logits = model(standardized_nchw(torch, images, IMAGENET_MEAN, IMAGENET_STD))
    return pooled.numpy(), logits.numpy()


def test_parameter_counts(torch):
    """The full networks, counted in PyTorch on the meta device (no memory) and in Flax by
    eval_shape (no compute); registered after the other ImageNet members, GenDD's names resolve."""
    from tests.models.beit_torch import build

    assert model_names()[-2:] == list(PARAM_COUNTS)
    for arch, count in PARAM_COUNTS.items():
        with torch.device("meta"):
            torch_model = build(arch, 1000)
        assert sum(p.numel() for p in torch_model.parameters()) == count, arch
        shapes = variable_shapes(build_model(arch, 1000), IMAGE_SHAPE)
        assert list(shapes) == ["params"]  # no BatchNorm statistics
        assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == count, arch
        assert canonical_arch(f"{arch}_1k") == arch
    large = shapes["params"]
    assert large["blocks_23"]["attn"]["relative_position_bias_table"].shape == (27 * 27 + 3, 16)
    assert "bias" not in large["blocks_23"]["attn"]["qkv"]


def test_relative_position_index(torch):
    """The vectorised index equals the PyTorch definition's pair-by-pair one (and GenDD's layout:
    the cls rows last)."""
    from tests.models.beit_torch import relative_position_index as pairwise

    index = relative_position_index(14)
    np.testing.assert_array_equal(index, np.asarray(pairwise(14)))
    assert index[0, 0] == 731 and index[0, 5] == 729 and index[5, 0] == 730 and index[1, 1] == 13 * 27 + 13


def test_converted_state_dict_matches_pytorch(torch, small, tmp_path, monkeypatch):
    """A bare state dict (GenDD's teacher files; relative_position_index buffers included)
    converted by the CLI with its defaults (imagenet2012, 1000 classes from `head`, ImageNet's
    normalisation) loads through load_resnet's shape check and predicts what PyTorch predicts."""
    from models.zoo import base
    from utils.checkpoints import load_resnet
    from utils.convert.__main__ import main

    monkeypatch.setitem(base._BUILDERS, SMALL_ARCH, functools.partial(BEiT, **SMALL))
    torch_model, images = small
    state = torch_model.state_dict()
    assert "blocks.1.attn.relative_position_index" in state and "blocks.0.attn.k_bias" not in state
    torch.save(state, tmp_path / "beit.pth")
    main(["torch", str(tmp_path / "beit.pth"), str(tmp_path / "export"), "--arch", SMALL_ARCH])
    model, variables, sidecar = load_resnet(str(tmp_path / "export"))
    assert sidecar["model"]["arch"] == SMALL_ARCH and sidecar["num_classes"] == 1000
    assert sidecar["data_name"] == IMAGENET_DATA_NAME and tuple(model.pixel_mean) == IMAGENET_MEAN
    assert list(variables) == ["params"] or not jax.tree.leaves(variables.get("batch_stats", {}))
    np.testing.assert_array_equal(variables["params"]["blocks_1"]["attn"]["relative_position_bias_table"],
                                  state["blocks.1.attn.relative_position_bias_table"].numpy())

    forward = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    out = forward.lower(variables, images).compile()(variables, images)
    torch_pooled, torch_logits = torch_outputs(torch, torch_model, images)
    assert isinstance(out, ResNetOutput) and out.logits.dtype == jnp.float32
    assert out.pooled.shape == (1, 64) and out.feature_map.shape == (1, 14, 14, 64)
    assert relative_error(out.logits, torch_logits) < RELATIVE_TOLERANCE
    assert relative_error(out.pooled, torch_pooled) < RELATIVE_TOLERANCE


def test_wrappers_and_bad_state_dicts_are_refused_in_one_line(torch, small):
    """unilm's {'model': ...} / {'module': ...} files and DataParallel's prefix are unwrapped; a
    missing, extra or misshapen tensor stops the conversion naming it (PyTorch's key included)."""
    from utils.convert.from_torch import find_state_dict, state_dict_to_variables

    torch_model, _ = small
    state = torch_model.state_dict()
    like = variable_shapes(small_zoo_model(), IMAGE_SHAPE)
    for wrapped in ({"model": state, "epoch": 3}, {"module": state},
                    {"module": {f"module.{key}": value for key, value in state.items()}}):
        variables = state_dict_to_variables(find_state_dict(wrapped), like, SMALL_ARCH)
        np.testing.assert_array_equal(variables["params"]["cls_token"], state["cls_token"].numpy())
        np.testing.assert_array_equal(variables["params"]["blocks_0"]["attn"]["qkv"]["kernel"],
                                      state["blocks.0.attn.qkv.weight"].numpy().T)
    plain = find_state_dict(state)

    def refusal(edited):
        with pytest.raises(UserError) as error:
            state_dict_to_variables(edited, like, SMALL_ARCH)
        assert "\n" not in str(error.value)
        return str(error.value)

    missing = {key: value for key, value in plain.items() if key != "blocks.1.attn.v_bias"}
    assert "nothing in the file for blocks_1/attn/v_bias (PyTorch's blocks.1.attn.v_bias)" in refusal(missing)
    missing = {key: value for key, value in plain.items() if key != "fc_norm.weight"}
    assert "nothing in the file for fc_norm/scale (PyTorch's fc_norm.weight)" in refusal(missing)
    missing = {key: value for key, value in plain.items() if key != "cls_token"}
    assert "(PyTorch's cls_token)" in refusal(missing)
    extra = {**plain, "blocks.0.attn.k_bias": plain["blocks.0.attn.q_bias"]}
    assert "tensor blocks.0.attn.k_bias has no place in it" in refusal(extra)
    extra = {**plain, "pos_embed": np.zeros((1, 197, 64), np.float32)}  # BEiT-v2 has no absolute one
    assert "tensor pos_embed has no place in it" in refusal(extra)
    wrong = {**plain, "blocks.0.gamma_1": np.zeros(65, np.float32)}
    assert ("blocks.0.gamma_1 has shape (65,), but beitv2_small_test's blocks_0/gamma_1 needs (64,)"
            in refusal(wrong))


def test_spec_dtype_and_input_size():
    """The spec survives the sidecar's JSON; outputs keep their dtypes in bfloat16; 224x224 only."""
    model = build_model("beitv2_large_patch16_224", 1000)
    spec = json.loads(json.dumps(resnet_spec(model)))
    assert spec == {"num_classes": 1000, "arch": "beitv2_large_patch16_224", "embed_dim": 1024, "depth": 24,
                    "num_heads": 16, "mlp_ratio": 4.0, "pixel_mean": list(IMAGENET_MEAN),
                    "pixel_std": list(IMAGENET_STD)}
    rebuilt = resnet_from_spec(spec, dtype=jnp.bfloat16)
    assert resnet_spec(rebuilt) == spec and rebuilt.input_size == 224
    assert rebuilt.default_data_name == IMAGENET_DATA_NAME
    small = small_zoo_model(dtype=jnp.bfloat16)
    out = jax.eval_shape(lambda x: small.init_with_output(jax.random.PRNGKey(0), x, return_features=True)[0],
                         jax.ShapeDtypeStruct((2, *IMAGE_SHAPE), jnp.float32))
    assert out.logits.dtype == jnp.float32 and out.pooled.dtype == jnp.float32 and out.pooled.shape == (2, 64)
    assert out.feature_map.shape == (2, 14, 14, 64) and out.feature_map.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="takes 224x224 images"):
        variable_shapes(small_zoo_model(), (64, 64, 3))
