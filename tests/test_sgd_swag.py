"""sgd_swag.py as a researcher runs it: the smoke command on the real Fashion-MNIST, resume,
refusal to overwrite, and a misspelt key."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config", "config/teacher/fmnist_frnrelu_sgd_swag.yaml", "--model_depth", "8",
         "--model_width", "1", "--optim_ne", "2", "--start_decay_epoch", "1",
         "--start_swa_epoch", "1", "--num_train_examples", "1024", "--seed", "1"]


def run(args):
    env = {**os.environ, "XLA_FLAGS": ""}  # the script's own default: the real device count
    return subprocess.run([sys.executable, "sgd_swag.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("teacher") / "run")
    result = run(SMOKE + ["--save", run_dir])
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_smoke_run_leaves_a_loadable_teacher(smoke_run):
    from utils.teachers import load_teachers

    teachers = load_teachers(smoke_run, data_name="FashionMNIST_x28")
    assert teachers.num_runs == 1 and teachers.model.depth == 8
    sidecar = teachers.sidecars[0]
    assert sidecar["seed"] == 1 and sidecar["num_snapshots"] == 8  # SWAG over epoch 2's 8 steps
    assert 0.0 <= sidecar["val"]["acc"] <= 1.0
    records = [json.loads(line) for line in open(os.path.join(smoke_run, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2]


@pytest.mark.slow
def test_save_to_existing_run_refuses_and_touches_nothing(smoke_run):
    before = {f: os.path.getmtime(os.path.join(smoke_run, f)) for f in os.listdir(smoke_run)}
    result = run(SMOKE + ["--save", smoke_run])
    assert result.returncode != 0
    assert "already holds a run" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert before == {f: os.path.getmtime(os.path.join(smoke_run, f)) for f in os.listdir(smoke_run)}


@pytest.mark.slow
def test_resume_continues_instead_of_restarting(smoke_run):
    result = run(["--resume", smoke_run, "--optim_ne", "3"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout and "from epoch 2" in result.stdout
    records = [json.loads(line) for line in open(os.path.join(smoke_run, "metrics.jsonl"))]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2, 3]
    assert records[-1]["step"] == 24


def test_misspelt_key_names_the_valid_one(tmp_path):
    result = run(SMOKE + ["--save", str(tmp_path / "x"), "--optim_lrr", "0.1"])
    assert result.returncode != 0 and "optim_lr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")
