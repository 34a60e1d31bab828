"""The zoo's ImageNet members (torchvision's v1 ResNets/ResNeXts, GenDD's MobileNetV1) against
PyTorch definitions written from the published architectures (tests/models/torchvision_torch.py):
bare state dicts with random weights and non-trivial BatchNorm statistics, converted through the
real `python -m utils.convert torch` (the deep ones placed in memory by the converter's own
function, to keep the suite quick), logits and pooled features compared in eval mode; parameter
counts pinned to torchvision's published ones."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.resnet import resnet_from_spec, resnet_spec
from models.zoo import build_model, canonical_arch, model_names, variable_shapes
from models.zoo.resnet_imagenet import IMAGENET_DATA_NAME, IMAGENET_MEAN, IMAGENET_STD
from tests.models.test_zoo import PARAM_COUNTS as CIFAR_PARAM_COUNTS
from tests.models.torch_compare import assert_matches_pytorch, standardized_nchw

# Trainable parameters with 1000 classes: torchvision's published counts (resnet18 ... resnext101_32x8d),
# the standard MobileNetV1's 4.2M, and GenDD's ImageNet-LT teacher resnext101_32x4d; the PyTorch
# definitions reproduce each exactly.
PARAM_COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336, "resnext101_32x4d": 44_177_704,
    "mobilenetv1": 4_231_976,
}
# Converted through the command line and compared at this input size (the ResNets pool globally;
# MobileNetV1's AvgPool 7 needs 224).
CLI_MEMBERS = {"resnet18": 64, "resnet34": 32, "resnet50": 64, "resnext50_32x4d": 64, "mobilenetv1": 224}
# Deep or wide: converted in memory (a CLI round trip of their 180-360 MB costs seconds) and compared.
IN_MEMORY_MEMBERS = {"resnet101": 32, "resnext101_32x8d": 32}
IMAGE_SHAPE = (224, 224, 3)  # what the converter traces for imagenet2012 (shapes do not depend on it)
# float32 against float32: ~1e-6 of the logits' size here (1e-5 at most); a padding, ε or layout
# mistake shows as 1e-3 to 1e-1.
NORMALIZATION = (IMAGENET_MEAN, IMAGENET_STD)  # what the PyTorch loaders standardize with
RELATIVE_TOLERANCE = 1e-4


def random_torch_model(torch, arch: str, size: int):
    """The PyTorch network with random weights, BatchNorm statistics calibrated on random images
    then perturbed (some tiny variances), residual branches damped; and two test images (one at 224)."""
    from tests.models.repdistiller_torch import randomize_normalization
    from tests.models.torchvision_torch import build, damp_residual_branches

    seed = list(PARAM_COUNTS).index(arch)
    rng = np.random.default_rng(seed)
    calibration = rng.uniform(size=(2 if size >= 224 else 4, size, size, 3)).astype(np.float32)
    images = rng.uniform(size=(1 if size >= 224 else 2, size, size, 3)).astype(np.float32)
    torch.manual_seed(seed)
    model = randomize_normalization(build(arch, 1000), standardized_nchw(torch, calibration, *NORMALIZATION),
                                    seed=seed)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[arch]
    return damp_residual_branches(model), images


def test_parameter_counts_pinned():
    """The members register after the CIFAR zoo, with the pinned counts (no torch needed)."""
    expected = [*CIFAR_PARAM_COUNTS, *PARAM_COUNTS]  # (the ViTs of models/zoo/beit.py follow)
    assert model_names()[:len(expected)] == expected
    for arch in PARAM_COUNTS:
        shapes = variable_shapes(build_model(arch, 1000), IMAGE_SHAPE)
        assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == PARAM_COUNTS[arch], arch


@pytest.mark.parametrize("arch", list(CLI_MEMBERS))
def test_converted_state_dict_matches_pytorch(arch, torch, tmp_path):
    """A bare state dict (as torchvision and GenDD save them) converted by the CLI with its
    defaults (imagenet2012, 1000 classes, ImageNet's normalisation) loads through load_resnet's
    shape check and predicts what PyTorch predicts."""
    from utils.checkpoints import load_resnet
    from utils.convert.__main__ import main

    torch_model, images = random_torch_model(torch, arch, CLI_MEMBERS[arch])
    checkpoint = tmp_path / f"{arch}.pth"
    torch.save(torch_model.state_dict(), checkpoint)  # num_batches_tracked included, as torchvision's
    # GenDD's name for its MobileNetV1 is accepted as an alias.
    main(["torch", str(checkpoint), str(tmp_path / "export"), "--arch",
          "MobileNetV1" if arch == "mobilenetv1" else arch])
    model, variables, sidecar = load_resnet(str(tmp_path / "export"))
    assert sidecar["model"]["arch"] == arch and sidecar["num_classes"] == 1000
    assert sidecar["data_name"] == IMAGENET_DATA_NAME and tuple(model.pixel_mean) == IMAGENET_MEAN
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == PARAM_COUNTS[arch]
    assert_matches_pytorch(torch, model, variables, torch_model, images, NORMALIZATION, RELATIVE_TOLERANCE)


@pytest.mark.parametrize("arch", list(IN_MEMORY_MEMBERS))
def test_deep_members_match_pytorch(arch, torch):
    """ResNet-101 and ResNeXt-101 32x8d: placed by the converter's function, one small forward."""
    from utils.convert.from_torch import find_state_dict, state_dict_to_variables

    torch_model, images = random_torch_model(torch, arch, IN_MEMORY_MEMBERS[arch])
    model = build_model(arch, 1000)
    variables = state_dict_to_variables(find_state_dict(torch_model.state_dict()),
                                        variable_shapes(model, IMAGE_SHAPE), arch)
    assert_matches_pytorch(torch, model, variables, torch_model, images, NORMALIZATION, RELATIVE_TOLERANCE)


def test_resnext101_32x4d_state_dict_fills_the_network(torch):
    """GenDD's ImageNet-LT teacher: the PyTorch definition's count, every tensor placed (no forward:
    its blocks are resnext101_32x8d's at half the width, compared above)."""
    from tests.models.torchvision_torch import build
    from utils.convert.from_torch import find_state_dict, state_dict_to_variables

    torch_model = build("resnext101_32x4d", 1000)
    assert sum(p.numel() for p in torch_model.parameters()) == PARAM_COUNTS["resnext101_32x4d"]
    variables = state_dict_to_variables(find_state_dict(torch_model.state_dict()),
                                        variable_shapes(build_model("resnext101_32x4d", 1000), IMAGE_SHAPE),
                                        "resnext101_32x4d")
    conv2 = variables["params"]["layer3_22_conv2"]["kernel"]
    assert conv2.shape == (3, 3, 16, 512)  # a grouped conv: 32 groups of 16 channels
    np.testing.assert_array_equal(conv2, torch_model.layer3[22].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))


@pytest.fixture(scope="module")
def resnet18_file(torch, tmp_path_factory):
    from tests.models.torchvision_torch import build

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pth") / "resnet18-f37072fd.pth"
    torch.save(build("resnet18", 1000).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet34"], "nothing in the file for layer1_2_bn1/bias (PyTorch's layer1.2.bn1.bias)"),
    (["--arch", "resnet50"], "tensor layer1.0.conv1.weight has shape (64, 64, 3, 3), but resnet50's"),
    (["--arch", "resnet18", "--data_name", "CIFAR100_x32"], "a 1000-class network, but CIFAR100_x32 has 100"),
    (["--arch", "mobilenetv1", "--data_name", "CIFAR100_x32"], "mobilenetv1 takes 224x224 images only"),
    (["--arch", "resnet18", "--data_name", "imagenet"], "or, for a converted network, imagenet2012"),
])
def test_bad_input_is_one_line_and_writes_nothing(resnet18_file, tmp_path, capsys, argv, message):
    from utils.convert.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["torch", resnet18_file, str(tmp_path / "export"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []


def test_spec_round_trip_and_input_size():
    """The specs survive the sidecar's JSON; MobileNetV1 takes 224x224 only (its AvgPool 7), which
    the checkpoint loader's shape check reads from `input_size`; names and aliases resolve."""
    for arch in ("resnext50_32x4d", "mobilenetv1"):
        model = build_model(arch, 10)
        spec = json.loads(json.dumps(resnet_spec(model)))
        rebuilt = resnet_from_spec(spec, dtype=jnp.bfloat16)
        assert spec["arch"] == arch and resnet_spec(rebuilt) == spec and rebuilt.dtype == jnp.bfloat16
    assert spec == {"num_classes": 10, "arch": "mobilenetv1", "pixel_mean": list(IMAGENET_MEAN),
                    "pixel_std": list(IMAGENET_STD)}
    resnext = resnet_from_spec(json.loads(json.dumps(resnet_spec(build_model("resnext101_32x8d", 10)))))
    assert (resnext.layers, resnext.groups, resnext.width_per_group) == ((3, 4, 23, 3), 32, 8)
    assert canonical_arch("MobileNetV1") == "mobilenetv1" and not hasattr(build_model("resnet18", 10), "input_size")
    assert build_model("mobilenetv1", 10).input_size == 224
    with pytest.raises(ValueError, match="takes 224x224 images"):
        variable_shapes(build_model("mobilenetv1", 10), (32, 32, 3))
    out = jax.eval_shape(lambda x: build_model("resnet50", 10, dtype=jnp.bfloat16).init_with_output(
        jax.random.PRNGKey(0), x, return_features=True)[0], jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.logits.dtype == jnp.float32 and out.pooled.shape == (2, 2048)
    assert out.feature_map.shape == (2, 7, 7, 2048) and out.feature_map.dtype == jnp.bfloat16
