"""The pretrained Fashion-MNIST teachers, KD backbone and GenDD's cross-entropy teacher committed
under checkpoints_teacher/:
what their sidecars and configs say, their size, and their accuracy on a fixed test slice.

The expected accuracies were measured once with the committed checkpoints (README, *Pretrained
teachers*); a checkpoint replaced, corrupted or loaded differently moves them by more than the
tolerance (a few images of the slice)."""
import glob
import os

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHERS = os.path.join(ROOT, "checkpoints_teacher", "fmnist")
KD = os.path.join(ROOT, "checkpoints_teacher", "kd", "fmnist")
TEACHER_CONFIG = os.path.join(ROOT, "config", "teacher", "fmnist_frnrelu_sgd_swag.yaml")
KD_CONFIG = os.path.join(ROOT, "config", "distillation", "kd_fmnist_frnrelu.yaml")
CE_TEACHER = os.path.join(ROOT, "checkpoints_teacher", "fmnist_ce", "res8x2")
CE_CONFIG = os.path.join(ROOT, "config", "teacher", "fmnist_bnrelu_ce.yaml")

SLICE = slice(0, 2000)  # the first 2000 images of the official test split
# Measured on SLICE with the committed checkpoints (float32, CPU).
EXPECTED_TEACHER_ACC = 0.9325  # 4 runs x 3 SWAG samples drawn with PRNGKey(0)
EXPECTED_KD_ACC = 0.9035
EXPECTED_CE_TEACHER_ACC = 0.9330  # checkpoints_teacher/fmnist_ce/res8x2
TOLERANCE = 3 / 2000  # three images: float reductions may differ across machines


def _runs():
    return sorted(glob.glob(os.path.join(TEACHERS, "*", "model")))


def _yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _resolved_config(run_dir, committed_path, free=("data_root",)):
    """The run's resolved config.yaml, checked to hold every committed key except `free`."""
    resolved = _yaml(os.path.join(run_dir, "config.yaml"))
    for key, value in _yaml(committed_path).items():
        if key not in free:
            assert resolved[key] == value, key
    return resolved


def test_teacher_runs_were_trained_by_the_committed_config():
    from utils.checkpoints import read_sidecar

    runs = _runs()
    assert len(runs) >= 4
    seeds = set()
    for export in runs:
        sidecar = read_sidecar(export)
        assert sidecar["kind"] == "swag_teacher" and sidecar["trained_by"] == "sgd_swag.py"
        assert sidecar["data_name"] == "FashionMNIST_x28" and sidecar["num_classes"] == 10
        assert sidecar["num_snapshots"] > 0  # SWAG moments were collected
        assert sidecar["model"] == read_sidecar(runs[0])["model"]
        seeds.add(sidecar["seed"])
        resolved = _resolved_config(os.path.dirname(export), TEACHER_CONFIG,
                                    free=("seed", "data_root"))
        assert resolved["num_train_examples"] is None  # the whole training split
        assert resolved["num_swag_samples"] >= 3
    assert len(seeds) == len(runs)


def test_kd_backbone_was_distilled_from_the_shipped_teachers():
    from utils.checkpoints import read_sidecar

    sidecar = read_sidecar(os.path.join(KD, "model"))
    assert sidecar["kind"] == "resnet" and sidecar["data_name"] == "FashionMNIST_x28"
    resolved = _resolved_config(KD, KD_CONFIG)
    assert resolved["teacher_dir"] == "checkpoints_teacher/fmnist"
    assert resolved["baseline_method"] == "KD" and resolved["num_train_examples"] is None


def test_gendd_teacher_was_trained_by_the_committed_config():
    from utils.checkpoints import read_sidecar

    sidecar = read_sidecar(os.path.join(CE_TEACHER, "model"))
    assert sidecar["kind"] == "resnet" and sidecar["data_name"] == "FashionMNIST_x28"
    assert (sidecar["model"]["norm"], sidecar["model"]["activation"]) == ("bn", "relu")
    resolved = _resolved_config(CE_TEACHER, CE_CONFIG)
    assert resolved["num_train_examples"] is None and resolved["swag"] is False


def test_shipped_checkpoints_are_small_and_hold_no_training_state():
    tops = (TEACHERS, KD, CE_TEACHER)
    files = [os.path.join(d, f) for top in tops for d, _, fs in os.walk(top) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 60 * 2**20
    run_dirs = [os.path.dirname(export) for export in _runs()] + [KD, CE_TEACHER]
    for run_dir in run_dirs:  # resumable optimizer state (checkpoints/, best/) is not shipped
        assert sorted(os.listdir(run_dir)) == ["config.yaml", "metrics.jsonl", "model"], run_dir


def test_shipped_exports_carry_the_hashes_of_their_arrays():
    """Every shipped export is checked on load like a fresh one (a damaged file is an error)."""
    from utils.checkpoints import array_hashes, load_export

    exports = list(_runs()) + [os.path.join(KD, "model"), os.path.join(CE_TEACHER, "model")]
    for export in exports:
        arrays, sidecar = load_export(export)
        assert sidecar["array_sha256"] == array_hashes(arrays), export


@pytest.fixture(scope="module")
def test_slice():
    from data.datasets import load_dataset

    test = load_dataset("FashionMNIST_x28", os.path.join(ROOT, "data")).test
    return test.images[SLICE], test.labels[SLICE]


@pytest.mark.slow
def test_known_accuracy_on_a_fixed_test_slice(test_slice):
    from utils import metrics
    from utils.predict import load_predictor, predict
    from utils.teachers import teacher_predictor

    images, labels = test_slice
    teacher_logits = predict(teacher_predictor(TEACHERS, samples_per_run=3, seed=0), images)
    assert teacher_logits.shape == (len(labels), 3 * len(_runs()), 10)
    member_probs = [metrics.softmax(teacher_logits[:, m]) for m in range(teacher_logits.shape[1])]
    member_acc = np.array([metrics.accuracy(p, labels) for p in member_probs])
    member_nll = np.array([metrics.nll(p, labels) for p in member_probs])
    mean_probs = metrics.ensemble_probs(teacher_logits)
    ensemble_acc = metrics.accuracy(mean_probs, labels)
    ensemble_nll = metrics.nll(mean_probs, labels)
    kd_logits = predict(load_predictor(KD), images)
    kd_acc = float((kd_logits[:, 0].argmax(-1) == labels).mean())
    print(f"teacher members {np.round(member_acc, 4).tolist()} ensemble {ensemble_acc:.4f} "
          f"NLL members {np.round(member_nll, 4).tolist()} ensemble {ensemble_nll:.4f} "
          f"KD {kd_acc:.4f}")
    assert abs(ensemble_acc - EXPECTED_TEACHER_ACC) <= TOLERANCE
    assert abs(kd_acc - EXPECTED_KD_ACC) <= TOLERANCE
    assert ensemble_acc >= member_acc.mean()  # the ensemble is at least its average member
    assert ensemble_nll < member_nll.min()  # and better calibrated than its best member


@pytest.mark.slow
def test_gendd_teacher_known_accuracy_on_a_fixed_test_slice(test_slice):
    from utils.predict import load_predictor, predict

    images, labels = test_slice
    logits = predict(load_predictor(CE_TEACHER), images)
    acc = float((logits[:, 0].argmax(-1) == labels).mean())
    print(f"GenDD teacher {acc:.4f}")
    assert abs(acc - EXPECTED_CE_TEACHER_ACC) <= TOLERANCE
