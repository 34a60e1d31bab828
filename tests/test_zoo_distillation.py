"""A teacher brought from PyTorch, distilled end to end: a RepDistiller resnet8 state dict (random
weights, as a CRD checkpoint is laid out) converted by `python -m utils.convert torch`, then used
as the teacher of KD and of GenDD (stage 2) on generated CIFAR-10 data, each training a zoo
student named by `model_arch` for one epoch and exporting it."""
import json
import os

import numpy as np
import pytest

from utils.convert.__main__ import main as convert


@pytest.fixture(scope="module")
def cifar_and_teacher(tmp_path_factory):
    import dataclasses

    import torch  # a test dependency (pip install -e '.[dev]')

    from conftest import write_cifar10_tarball
    from data import datasets
    from tests.models import repdistiller_torch

    root = tmp_path_factory.mktemp("zoo_distillation")
    write_cifar10_tarball(root / "cifar-10-python.tar.gz", per_batch=8, n_test=8)
    teacher = repdistiller_torch.build("resnet8", 10)
    repdistiller_torch.randomize_normalization(teacher, torch.rand(8, 3, 32, 32))
    torch.save({"epoch": 240, "model": teacher.state_dict(), "accuracy": 0.0}, root / "ckpt_epoch_240.pth")
    convert(["torch", str(root / "ckpt_epoch_240.pth"), str(root / "teacher"), "--arch", "resnet8",
             "--data_name", "CIFAR10_x32"])
    with pytest.MonkeyPatch.context() as patch:  # 24 / 16 / 8 images
        patch.setitem(datasets.DATASETS, "CIFAR10_x32",
                      dataclasses.replace(datasets.DATASETS["CIFAR10_x32"], num_train=24, num_val=16, num_test=8))
        yield root


def _run_args(root, run_dir):
    return ["--data_name", "CIFAR10_x32", "--data_root", str(root), "--teacher_dir", str(root / "teacher"),
            "--model_arch", "resnet8", "--optim_bs", "8", "--optim_ne", "1", "--log_every", "1",
            "--save", str(run_dir)]


def _sidecar(run_dir):
    with open(os.path.join(run_dir, "model", "sidecar.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_converted_teacher_distils_into_a_zoo_student(cifar_and_teacher, tmp_path):
    import gendd
    import kd_and_endd
    from utils.predict import load_predictor, predict

    root = cifar_and_teacher
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

    kd_and_endd.main([*_run_args(root, tmp_path / "kd"), "--num_teachers", "1", "--randaugment", "false"])
    sidecar = _sidecar(tmp_path / "kd")
    assert sidecar["kind"] == "resnet" and sidecar["model"]["arch"] == "resnet8"
    logits = predict(load_predictor(str(tmp_path / "kd")), images, batch_size=4)
    assert logits.shape == (4, 1, 10) and np.all(np.isfinite(logits))

    gendd.main([*_run_args(root, tmp_path / "gendd"), "--gendd_stage", "2", "--token_dim", "16", "--head_width", "32", "--head_depth", "1", "--diffusion_batch_mul", "2",
                "--num_sampling_steps", "2", "--num_sampling", "1", "--warmup_epochs", "0"])
    sidecar = _sidecar(tmp_path / "gendd")
    assert sidecar["kind"] == "gendd" and sidecar["student"]["arch"] == "resnet8"
    logits = predict(load_predictor(str(tmp_path / "gendd")), images, batch_size=4)
    assert logits.shape[0] == 4 and logits.shape[-1] == 10 and np.all(np.isfinite(logits))
