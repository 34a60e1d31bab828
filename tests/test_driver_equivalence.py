"""The new driver gives the old scripts' numbers, to the last digit (kept until the old path is
gone from the history this suite can reach).

The old path is edfm.py's own main at the commit before the method seam (d332431), extracted
with `git archive`; both run the main job's command on a small slice of the real Fashion-MNIST
(512 training images, one epoch) with the shipped teachers and KD backbone, then print the
test table on the 10 000 test images. Every training and validation number in metrics.jsonl and
every number of the test table must be equal.
"""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_COMMIT = "d332431"
ARGS = ["--config", "config/distillation/edfm_fmnist_frnrelu.yaml",
        "--data_root", "/usr/share/datasets/fashion-mnist", "--num_train_examples", "512",
        "--optim_ne", "1", "--log_every", "4"]


def _run(tree, run_dir):
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "edfm.py", *ARGS, "--save", str(run_dir)], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    table = re.findall(r"^(Teacher \(4x3\)|KD backbone|EDFM \(32\))\s+([-\d. ]+)$", out.stdout, re.M)
    return records, {name: [float(v) for v in values.split()[:4]] for name, values in table}


@pytest.mark.slow
def test_edfm_main_job_numbers_equal_the_old_path(tmp_path):
    old_tree = tmp_path / "old"
    old_tree.mkdir()
    archive = subprocess.run(["git", "archive", OLD_COMMIT], cwd=ROOT, capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode()
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    old_records, old_table = _run(old_tree, tmp_path / "old_run")
    new_records, new_table = _run(ROOT, tmp_path / "new_run")
    assert len(old_table) == len(new_table) == 3
    assert new_table == old_table  # acc, nll, ece, KL(T||S) as printed
    numbers = lambda records: [{k: v for k, v in r.items()  # noqa: E731
                                if k.startswith(("train/", "val/", "step", "epoch"))
                                and not k.startswith("test/")} for r in records if "step" in r]
    assert numbers(new_records) == numbers(old_records)
