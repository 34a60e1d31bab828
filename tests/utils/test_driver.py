"""utils/driver.py: what every script does around its method, through a real script (KD on the
tiny generated data of tests/conftest.py's tiny_setup): resume, re-export, the run lock, and
nothing changed by a refused input."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KD_CONFIG = os.path.join(ROOT, "config/distillation/kd_fmnist_frnrelu.yaml")


def _kd(setup, *extra):
    """A fresh KD run (--save) from the Fashion-MNIST config, or a --resume of one (its saved
    config, plus the given flags)."""
    import kd_and_endd

    if "--resume" in extra:
        kd_and_endd.main(list(extra))
        return
    kd_and_endd.main(["--config", KD_CONFIG, "--data_root", setup["data_root"],
                      "--teacher_dir", setup["teachers"], "--optim_bs", "8", "--model_depth", "8",
                      "--model_width", "1", "--num_teachers", "2", "--log_every", "1", *extra])


def _epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f if "epoch" in json.loads(line)]


def _snapshot(run_dir):
    """Every file's bytes (the lock file excepted): what a refused command must not change."""
    out = {}
    for folder, _, files in os.walk(run_dir):
        for name in files:
            if name != ".lock":
                with open(os.path.join(folder, name), "rb") as f:
                    out[os.path.relpath(os.path.join(folder, name), run_dir)] = f.read()
    return out


@pytest.mark.slow
def test_resume_reexports_dedups_epochs_and_accepts_a_copied_run(tiny_setup, tmp_path):
    from utils.checkpoints import load_export

    run = tmp_path / "kd"
    _kd(tiny_setup, "--optim_ne", "1", "--save", str(run))
    first, first_sidecar = load_export(str(run / "model"))
    assert _epochs(run) == [1]
    # An epoch logged but never checkpointed (a kill between the two) is forgotten on resume.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 99, "train/loss": 1.0}) + "\n")
    # A copied run directory resumes with --resume NEW alone, and extending it re-exports.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    _kd(tiny_setup, "--resume", str(copy), "--optim_ne", "2")
    assert _epochs(copy) == [1, 2]
    second, second_sidecar = load_export(str(copy / "model"))
    assert second_sidecar["val"]["epoch"] in (1, 2) and "array_sha256" in second_sidecar
    same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second))]
    # the export is the newly selected epoch's: epoch 2's weights, or epoch 1's again
    assert (not all(same)) if second_sidecar["val"]["epoch"] == 2 else all(same)
    with open(copy / "config.yaml") as f:
        assert f"save: {copy}" in f.read()  # the copy's config now names the copy
    # Resuming a finished run trains nothing and keeps the export as it is.
    before = _snapshot(copy / "model")
    _kd(tiny_setup, "--resume", str(copy))
    assert _snapshot(copy / "model") == before and _epochs(copy) == [1, 2]


@pytest.mark.slow
def test_refused_resume_changes_nothing(tiny_setup, tmp_path, capsys):
    """A resume whose checkpoint does not fit (another architecture) is one line, exit 2, and
    leaves config.yaml and everything else as they were."""
    run = tmp_path / "kd"
    _kd(tiny_setup, "--optim_ne", "1", "--save", str(run))
    before = _snapshot(run)
    capsys.readouterr()  # forget the first run's output
    with pytest.raises(SystemExit) as info:
        _kd(tiny_setup, "--resume", str(run), "--model_width", "2", "--optim_ne", "2")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint" in err
    assert _snapshot(run) == before


@pytest.mark.slow
def test_one_process_per_run_directory(tiny_setup, tmp_path, capsys):
    run = tmp_path / "kd"
    _kd(tiny_setup, "--optim_ne", "1", "--save", str(run))
    before = _snapshot(run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); f.truncate(); f.write('process 4242'); "
         "f.flush(); print('locked', flush=True); time.sleep(60)", str(run / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()  # forget the first run's output
        with pytest.raises(SystemExit) as info:
            _kd(tiny_setup, "--resume", str(run), "--optim_ne", "2")
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "in use by process 4242" in err and len(err.splitlines()) == 1
        assert _snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    _kd(tiny_setup, "--resume", str(run), "--optim_ne", "2")  # the lock died with its process
    assert _epochs(run) == [1, 2]


def test_ctrl_c_is_one_line_saying_how_to_resume(tiny_setup, tmp_path, monkeypatch, capsys):
    """Ctrl-C during training: exit 130 and one line naming the --resume command."""
    from utils.trainer import Trainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    run = tmp_path / "kd"
    with pytest.raises(SystemExit) as info:
        _kd(tiny_setup, "--optim_ne", "1", "--save", str(run))
    assert info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: interrupted; the checkpoints in {run} are kept: continue with "
                   f"python kd_and_endd.py --resume {run}"]
