"""`python -m utils.convert torch`: a RepDistiller/CRD checkpoint becomes a "resnet" export that
predicts through the KD student's path and loads as GenDD's teacher and EDFM's backbone; the
checkpoint layouts in use convert alike; bad input is one line, exit 2, nothing written.
(Every zoo member's numerical equality with PyTorch is in tests/models/test_zoo.py.)"""
import argparse
import fractions
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from models.zoo import CIFAR100_MEAN, CIFAR100_STD, build_model, variable_shapes
from utils.checkpoints import load_export, load_resnet
from utils.convert.__main__ import main
from utils.convert.from_torch import find_state_dict, state_dict_to_variables
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




@pytest.fixture(scope="module")
def resnet8(torch, tmp_path_factory):
    """RepDistiller's resnet8 with random weights and BatchNorm statistics, saved as CRD saves
    (with the accuracy as a tensor and the training options as an argparse Namespace)."""
    from tests.models.repdistiller_torch import build, randomize_normalization

    torch.manual_seed(0)
    calibration = torch.randn(8, 3, 32, 32)
    model = randomize_normalization(build("resnet8", 100), calibration)
    path = tmp_path_factory.mktemp("pth") / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(71.5),
                "opt": argparse.Namespace(model="resnet8", learning_rate=0.05)}, path)
    return {"model": model, "path": str(path), "state": model.state_dict()}


def convert_fails(capsys, *argv) -> str:
    """Run the CLI expecting bad input: exit 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(["torch", *map(str, argv)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_converted_export_predicts_as_kd_student_and_loads_as_teacher(resnet8, torch, tmp_path):
    import gendd
    from edfm import feature_dim, load_backbone
    from models.resnet import network_name
    from utils.predict import load_predictor, predict

    export = tmp_path / "teacher"
    main(["torch", resnet8["path"], str(export), "--arch", "resnet8"])
    model, variables, sidecar = load_resnet(str(export))
    assert sidecar["kind"] == "resnet" and sidecar["model"]["arch"] == "resnet8"
    assert sidecar["num_classes"] == 100 and sidecar["data_name"] == "CIFAR100_x32"
    source = sidecar["source"]
    assert source["file"] == resnet8["path"] and source["epoch"] == 240 and source["accuracy"] == 71.5
    assert len(source["sha256"]) == 64

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    member_logits = predict(load_predictor(str(export)), images, batch_size=4)
    scaled = images.astype(np.float32) / 255.0
    standardized = (scaled - np.asarray(CIFAR100_MEAN, np.float32)) / np.asarray(CIFAR100_STD, np.float32)
    with torch.no_grad():
        _, expected = resnet8["model"](torch.from_numpy(standardized.transpose(0, 3, 1, 2).copy()))
    assert member_logits.shape == (4, 1, 100)
    np.testing.assert_allclose(member_logits[:, 0], expected.numpy(), rtol=1e-4, atol=1e-4)

    teacher, teacher_variables, _ = gendd.load_teacher(str(export), "CIFAR100_x32", 100)
    assert teacher == model and "classifier" in teacher_variables["params"]
    backbone, backbone_variables, _, _ = load_backbone(str(export), "CIFAR100_x32", 100)
    # EDFM conditions its head on the backbone's pooled feature (resnet8: 64 channels)
    assert feature_dim(backbone, backbone_variables, (32, 32, 3)) == 64
    assert network_name(backbone) == "resnet8"
    assert backbone == model


def test_checkpoint_layouts_convert_alike(resnet8, torch, tmp_path):
    """A bare state dict with DataParallel's `module.` prefix and the classifier named as the other
    families name it gives the same arrays as CRD's {'model': ...} file."""
    main(["torch", resnet8["path"], str(tmp_path / "crd"), "--arch", "resnet8"])
    bare = {f"module.{key.replace('fc.', 'linear.')}": value for key, value in resnet8["state"].items()}
    torch.save(bare, tmp_path / "bare.pth")
    main(["torch", str(tmp_path / "bare.pth"), str(tmp_path / "bare"), "--arch", "resnet8",
          "--num_classes", "100"])
    crd_arrays, bare_arrays = load_export(str(tmp_path / "crd"))[0], load_export(str(tmp_path / "bare"))[0]
    assert jax.tree.structure(crd_arrays) == jax.tree.structure(bare_arrays)
    jax.tree.map(np.testing.assert_array_equal, crd_arrays, bare_arrays)

    # MobileNetV2's `classifier.0` and GenDD's renaming of every classifier to `fc` (in memory).
    from tests.models.repdistiller_torch import build

    state = build("mobile_half", 100).state_dict()
    like = variable_shapes(build_model("mobile_half", 100), (32, 32, 3))
    ours = state_dict_to_variables(find_state_dict(state), like, "mobile_half")
    renamed = {key.replace("classifier.0.", "fc."): value for key, value in state.items()}
    gendd_style = state_dict_to_variables(find_state_dict({"model": renamed}), like, "mobile_half")
    np.testing.assert_array_equal(ours["params"]["classifier"]["kernel"], state["classifier.0.weight"].numpy().T)
    np.testing.assert_array_equal(gendd_style["params"]["classifier"]["kernel"],
                                  ours["params"]["classifier"]["kernel"])
    depthwise = ours["params"]["blocks_1_0_conv_3"]["kernel"]
    assert depthwise.shape == (3, 3, 1, 48)  # a depthwise conv: one input channel per group

    doubled = {**resnet8["state"], "linear.weight": resnet8["state"]["fc.weight"]}
    with pytest.raises(UserError, match="fc.weight and linear.weight both fill classifier/kernel"):
        state_dict_to_variables(find_state_dict(doubled), variable_shapes(build_model("resnet8", 100), (32, 32, 3)),
                                "resnet8")


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet14"], "nothing in the file for layer1_1_bn1/bias (PyTorch's layer1.1.bn1.bias)"),
    (["--arch", "resnet8x4"], "tensor conv1.weight has shape (16, 3, 3, 3)"),
    (["--arch", "vgg8"], "does not fit --arch vgg8_bn"),
    (["--arch", "resnet8", "--data_name", "CIFAR10_x32"], "a 100-class network, but CIFAR10_x32 has 10"),
    (["--arch", "resnet8", "--data_name", "CIFAR1000"], "unknown data_name 'CIFAR1000'"),
    (["--arch", "resnet33"], "did you mean resnet34, resnet32"),
])
def test_bad_input_is_one_line_and_writes_nothing(resnet8, tmp_path, capsys, argv, message):
    err = convert_fails(capsys, resnet8["path"], tmp_path / "export", *argv)
    assert message in err
    assert not os.path.exists(tmp_path / "export")
    assert os.listdir(tmp_path) == []  # no partial export left beside it either


def test_unreadable_or_unsafe_files(torch, tmp_path, capsys):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert "not a readable PyTorch checkpoint" in convert_fails(capsys, tmp_path / "garbage.pth",
                                                                tmp_path / "a", "--arch", "resnet8")
    assert "no such file" in convert_fails(capsys, tmp_path / "missing.pth", tmp_path / "a", "--arch", "resnet8")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pth")
    assert "holds no state dict" in convert_fails(capsys, tmp_path / "no_weights.pth", tmp_path / "a",
                                                  "--arch", "resnet8")
    # An object that is not a tensor or a container is unpickled only when the user trusts the file.
    torch.save({"model": {"fc.bias": torch.zeros(3)}, "note": fractions.Fraction(1, 3)}, tmp_path / "odd.pth")
    assert "--trust_pickle" in convert_fails(capsys, tmp_path / "odd.pth", tmp_path / "a", "--arch", "resnet8")
    assert "does not fit --arch resnet8" in convert_fails(capsys, tmp_path / "odd.pth", tmp_path / "a",
                                                      "--arch", "resnet8", "--num_classes", "100",
                                                      "--trust_pickle")
    assert not os.path.exists(tmp_path / "a")


def test_existing_destination_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine too")
    for dst in (tmp_path / "dst", tmp_path / "file"):
        assert "already exists" in convert_fails(capsys, tmp_path / "any.pth", dst, "--arch", "resnet8")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine too"


def test_cli_without_torch_says_how_to_get_it(tmp_path):
    """The real entry point, in a process where `import torch` fails: one line, exit 2, no DST;
    the zoo and the converter import without torch."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    (tmp_path / "ckpt.pth").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "no_torch"), ROOT]),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "utils.convert", "torch", str(tmp_path / "ckpt.pth"),
                             str(tmp_path / "dst"), "--arch", "resnet32x4"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: reading a PyTorch checkpoint needs torch: pip install torch\n"
    assert not os.path.exists(tmp_path / "dst")


def test_help_names_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m utils.convert" in out and "torch" in out
    with pytest.raises(SystemExit):
        main(["torch", "--help"])
    assert "--arch" in capsys.readouterr().out
