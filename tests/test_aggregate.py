"""aggregate.py: mean ± std over evaluations, paired intervals over seeds and over test images."""
import json

import numpy as np
import pytest

import aggregate

NAMES = ["Teacher (4x3)", "KD", "EDFM"]


def _write_evaluation(path, seed_offset, nll, kl, labels, config=None, sweep_nll=None):
    """A save directory in evaluate.py's format: per-image NLL and KL arrays, their means in results.json."""
    path.mkdir(parents=True)
    np.savez_compressed(path / "per_example.npz", names=np.array(NAMES), labels=labels,
                        nll=np.stack([nll[n] for n in NAMES]).astype(np.float32),
                        kl_to_teacher=np.stack([kl[n] for n in NAMES]).astype(np.float32))
    methods = {}
    for n in NAMES:
        test = {"acc": 0.9 - 0.01 * seed_offset, "nll": float(nll[n].astype(np.float32).mean()),
                "amb": 0.02 if n != "KD" else None, "mi": 0.01 * (2 if n == "EDFM" else 1) if n != "KD" else None}
        if n != NAMES[0]:
            test["kl_to_teacher"] = float(kl[n].astype(np.float32).mean())
        methods[n] = {"test": test}
    sweeps = {"EDFM": {"members": {"x_label": "members", "points": [
        {"x": m, "acc": 0.9, "nll": sweep_nll[i], "kl_to_teacher": 0.1, "amb": 0.01 * m, "mi": 0.0}
        for i, m in enumerate([1, 4, 32])]}}}
    results = {"config": {"data_name": "FashionMNIST_x28", "teacher_dir": "t", "seed": 0, **(config or {})},
               "info": {"num_test": len(labels)}, "methods": methods, "sweeps": sweeps}
    (path / "results.json").write_text(json.dumps(results))


def _three(tmp_path, rng, n=400):
    labels = rng.integers(0, 10, n)
    dirs, diffs = [], []
    for s in range(3):
        kd = rng.exponential(0.3, n)
        edfm = kd + rng.normal(-0.01 * (s + 1), 0.05, n)
        nll = {NAMES[0]: rng.exponential(0.2, n), "KD": kd, "EDFM": edfm}
        kl = {NAMES[0]: np.zeros(n), "KD": rng.exponential(0.05, n), "EDFM": rng.exponential(0.04, n)}
        d = tmp_path / f"s{s}"
        _write_evaluation(d, s, nll, kl, labels, sweep_nll=[0.4 - 0.01 * s, 0.3, 0.28 + 0.01 * s])
        dirs.append(str(d))
        diffs.append((nll, kl))
    return dirs, diffs


def test_means_stds_and_paired_intervals(tmp_path):
    rng = np.random.default_rng(0)
    dirs, diffs = _three(tmp_path, rng)
    out = aggregate.main(["--evaluations", *dirs, "--against", "EDFM", "--save", str(tmp_path / "agg")])

    kd_nll = [d[0]["KD"].astype(np.float32).mean() for d in diffs]
    assert out["table"]["KD"]["nll"]["mean"] == pytest.approx(np.mean(kd_nll), rel=1e-6)
    assert out["table"]["KD"]["nll"]["std"] == pytest.approx(np.std(kd_nll, ddof=1), rel=1e-5)
    assert out["table"]["KD"]["acc"]["std"] == pytest.approx(0.01)
    assert out["table"]["KD"]["amb"]["mean"] is None and out["table"]["Teacher"]["kl_to_teacher"]["n"] == 0

    # over seeds: the three per-seed mean differences, t with 2 degrees of freedom (4.3027)
    per_seed = np.array([d[0]["EDFM"].astype(np.float32).mean() - d[0]["KD"].astype(np.float32).mean()
                         for d in diffs])
    seeds = out["paired"]["KD"]["nll"]["seeds"]
    half = 4.302653 * per_seed.std(ddof=1) / np.sqrt(3)
    assert seeds["mean"] == pytest.approx(per_seed.mean(), rel=1e-5)
    assert seeds["high"] - seeds["mean"] == pytest.approx(half, rel=1e-4) and seeds["n"] == 3
    # over images: each image's difference averaged over the seeds, normal interval (1.95996)
    per_image = np.mean([d[0]["EDFM"].astype(np.float32).astype(np.float64) - d[0]["KD"].astype(np.float32)
                         for d in diffs], axis=0)
    images = out["paired"]["KD"]["nll"]["images"]
    assert images["mean"] == pytest.approx(per_image.mean(), rel=1e-5) and images["n"] == 400
    assert images["high"] - images["mean"] == pytest.approx(1.959964 * per_image.std(ddof=1) / 20, rel=1e-4)
    assert images["high"] < 0  # EDFM is 0.02 nats better on average, by construction
    kl = out["paired"]["KD"]["kl_to_teacher"]["images"]
    assert kl["mean"] == pytest.approx(np.mean([d[1]["EDFM"].astype(np.float32).astype(np.float64)
                                                - d[1]["KD"].astype(np.float32) for d in diffs]), rel=1e-5)

    sweep = out["sweeps"]["members"]
    assert sweep["x"] == [1, 4, 32] and sweep["n"] == 3
    assert sweep["nll"][0]["mean"] == pytest.approx(0.39) and sweep["nll"][0]["std"] == pytest.approx(0.01)
    assert sweep["amb"][2]["mean"] == pytest.approx(0.32) and sweep["amb"][2]["std"] == pytest.approx(0)
    text = (tmp_path / "agg" / "results.md").read_text()
    assert "| KD | 3 |" in text and "ΔNLL over seeds" in text and "ratio EDFM / teacher" in text
    assert (tmp_path / "agg" / "edfm_members.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "agg" / "results.json").read_text())["paired"]["KD"]["nll"]["seeds"]["n"] == 3


def test_refuses_evaluations_of_different_teachers_and_existing_output(tmp_path, capsys):
    rng = np.random.default_rng(1)
    dirs, _ = _three(tmp_path, rng, n=50)
    other = json.loads((tmp_path / "s2" / "results.json").read_text())
    other["config"]["teacher_dir"] = "another"
    (tmp_path / "s2" / "results.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit) as info:
        aggregate.main(["--evaluations", *dirs, "--save", str(tmp_path / "agg")])
    assert info.value.code == 2 and "differ in teacher_dir" in capsys.readouterr().err
    assert not (tmp_path / "agg").exists()

    (tmp_path / "agg").mkdir()
    (tmp_path / "agg" / "results.md").write_text("kept")
    with pytest.raises(SystemExit):
        aggregate.main(["--evaluations", *dirs[:2], "--save", str(tmp_path / "agg")])
    assert (tmp_path / "agg" / "results.md").read_text() == "kept"
    with pytest.raises(SystemExit):
        aggregate.main(["--evaluations", *dirs[:2], "--against", "Nope", "--save", str(tmp_path / "b")])
    assert "no evaluation has a method named 'Nope'" in capsys.readouterr().err
