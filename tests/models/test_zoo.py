"""The CIFAR zoo (models/zoo) against RepDistiller's PyTorch definitions
(tests/models/repdistiller_torch.py): every member converted from a PyTorch checkpoint with random
weights and non-trivial BatchNorm statistics through the real `python -m utils.convert torch`,
then logits and pooled features compared in eval mode; parameter counts pinned."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.resnet import ResNet, resnet_from_spec, resnet_spec
from models.zoo import (CIFAR100_MEAN, CIFAR100_STD, build_model, canonical_arch, model_names,
                        variable_shapes, zoo_spec)
from tests.models.torch_compare import assert_matches_pytorch, relative_error, standardized_nchw

# Trainable parameters with 100 classes, counted from the PyTorch definitions (torch's
# sum(p.numel() for p in model.parameters())); they agree with RepDistiller's published sizes
# (resnet110 1.7M, resnet32x4 7.4M, wrn_40_2 2.3M, vgg13 9.5M, ShuffleV1 0.95M, ShuffleV2 1.4M).
PARAM_COUNTS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860, "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156, "vgg8_bn": 3_965_028, "vgg11_bn": 9_277_284, "vgg13_bn": 9_462_180,
    "vgg16_bn": 14_774_436, "vgg19_bn": 20_086_692, "mobile_half": 812_836, "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}
# A float32 forward differs from PyTorch's by ~1e-6 of the logits' size (measured up to 1e-5 on
# MobileNetV2); a padding, ε or layout mistake shows as 1e-2 to 1e-1.
NORMALIZATION = (CIFAR100_MEAN, CIFAR100_STD)  # what the PyTorch loaders standardize with
RELATIVE_TOLERANCE = 5e-5


def test_parameter_counts_pinned():
    """The zoo's parameter counts (no torch needed), so an architecture cannot drift silently."""
    assert model_names()[:len(PARAM_COUNTS)] == list(PARAM_COUNTS)  # the ImageNet members follow
    for arch in PARAM_COUNTS:
        shapes = variable_shapes(build_model(arch, 100), (32, 32, 3))
        assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == PARAM_COUNTS[arch], arch


@pytest.mark.parametrize("arch", list(PARAM_COUNTS))
def test_converted_checkpoint_matches_pytorch(arch, torch, tmp_path):
    """RepDistiller's network with random weights and BatchNorm statistics, saved as CRD does,
    converted by the CLI and loaded as an export, predicts what PyTorch predicts in eval mode; both
    have the pinned parameter count."""
    from tests.models.repdistiller_torch import build, randomize_normalization
    from utils.checkpoints import load_export
    from utils.convert.__main__ import main

    rng = np.random.default_rng(list(PARAM_COUNTS).index(arch))
    calibration = rng.uniform(size=(8, 32, 32, 3)).astype(np.float32)
    images = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    torch.manual_seed(0)
    torch_model = randomize_normalization(build(arch, 100),
                                          standardized_nchw(torch, calibration, *NORMALIZATION))
    assert sum(p.numel() for p in torch_model.parameters()) == PARAM_COUNTS[arch]
    checkpoint = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": torch_model.state_dict(), "accuracy": 71.5}, checkpoint)

    main(["torch", str(checkpoint), str(tmp_path / "export"), "--arch", arch])
    # The export as load_resnet reads it (which also re-traces the network to check the shapes the
    # converter has checked; tests/utils/test_convert.py loads through it and load_predictor).
    arrays, sidecar = load_export(str(tmp_path / "export"), kind="resnet")
    model = resnet_from_spec(sidecar["model"])
    variables = {"params": arrays["params"], **arrays["model_state"]}
    assert sidecar["model"]["arch"] == arch and sidecar["num_classes"] == 100
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == PARAM_COUNTS[arch]

    assert_matches_pytorch(torch, model, variables, torch_model, images, NORMALIZATION, RELATIVE_TOLERANCE)


def test_spec_round_trip_through_json():
    """A zoo spec names its "arch" and fields and survives the sidecar's JSON; resnet_spec and
    resnet_from_spec dispatch on it, and the FRN ResNet's specs (no "arch") load as before."""
    for arch in ("resnet8x4", "vgg13_bn", "ShuffleV1"):
        model = build_model(arch, 10, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25))
        spec = json.loads(json.dumps(resnet_spec(model)))
        assert spec == zoo_spec(model) and spec["arch"] == arch and spec["num_classes"] == 10
        rebuilt = resnet_from_spec(spec, dtype=jnp.bfloat16)
        assert type(rebuilt) is type(model) and resnet_spec(rebuilt) == spec
        assert rebuilt.dtype == jnp.bfloat16 and rebuilt.pixel_std == (0.25, 0.25, 0.25)
    frn = ResNet(10, depth=8, width=1)
    assert "arch" not in resnet_spec(frn) and resnet_from_spec(resnet_spec(frn)) == frn


def test_aliases_and_unknown_names():
    assert canonical_arch("vgg13") == "vgg13_bn" and canonical_arch("MobileNetV2") == "mobile_half"
    assert build_model("vgg8", 100).arch == "vgg8_bn"
    with pytest.raises(ValueError, match="did you mean resnet34, resnet32"):  # resnet34: ImageNet's
        build_model("resnet33", 100)


def test_bfloat16_compute_keeps_float32_outputs_and_parameters():
    model = build_model("ShuffleV2", 10, dtype=jnp.bfloat16)
    variables = variable_shapes(model, (32, 32, 3))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    out = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), variables,
                         jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert out.logits.dtype == jnp.float32 and out.pooled.dtype == jnp.float32
    assert out.feature_map.dtype == jnp.bfloat16 and out.feature_map.shape == (2, 4, 4, 1024)


def test_train_mode_matches_pytorch(torch):
    """Training a zoo network here behaves as in PyTorch: train-mode outputs use the batch
    statistics, and the running means move by PyTorch's momentum 0.1 (the running variance differs
    by n/(n-1): PyTorch keeps the unbiased batch variance, flax the biased one)."""
    from tests.models.repdistiller_torch import build, randomize_normalization
    from utils.convert.from_torch import find_state_dict, state_dict_to_variables

    rng = np.random.default_rng(1)
    images = rng.uniform(size=(4, 32, 32, 3)).astype(np.float32)
    torch.manual_seed(1)
    torch_model = randomize_normalization(build("resnet8", 10),
                                          standardized_nchw(torch, images, *NORMALIZATION))
    model = build_model("resnet8", 10)
    variables = state_dict_to_variables(find_state_dict({"model": torch_model.state_dict()}),
                                        variable_shapes(model, (32, 32, 3)), "resnet8")
    train_step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updates = train_step.lower(variables, images).compile()(variables, images)
    torch_model.train()
    with torch.no_grad():
        _, torch_logits = torch_model(standardized_nchw(torch, images, *NORMALIZATION))
    assert relative_error(logits, torch_logits.numpy()) < RELATIVE_TOLERANCE
    np.testing.assert_allclose(updates["batch_stats"]["layer2_0_bn1"]["mean"],
                               torch_model.layer2[0].bn1.running_mean.numpy(), rtol=1e-4, atol=1e-5)
