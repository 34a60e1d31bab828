"""Tests of utils/logging.py: RunLogger's metrics.jsonl (one JSON line per call, NumPy values made
plain), read_metrics, quiet mode and format_metrics."""
import json
import os

import numpy as np

from utils.logging import RunLogger, format_metrics, read_metrics


def test_one_json_line_per_log_call(tmp_path, capsys):
    logger = RunLogger(str(tmp_path), quiet=True)
    records = [
        {"step": np.int64(10), "train/loss": np.float32(0.5), "lr": 0.1, "name": "a"},
        {"step": 20, "val/acc": np.float64(0.875), "hist": np.array([1, 2, 3]), "flag": np.bool_(True)},
        {"step": 30, "scalar_array": np.array(2.5, np.float32), "nested": [1, 2]},
    ]
    for record in records:
        logger.log(record)
    logger.close()
    with open(tmp_path / "metrics.jsonl") as f:
        lines = f.read().splitlines()
    assert len(lines) == 3
    parsed = [json.loads(line) for line in lines]
    assert parsed == [
        {"step": 10, "train/loss": 0.5, "lr": 0.1, "name": "a"},
        {"step": 20, "val/acc": 0.875, "hist": [1, 2, 3], "flag": True},
        {"step": 30, "scalar_array": 2.5, "nested": [1, 2]},
    ]
    assert isinstance(parsed[0]["step"], int) and isinstance(parsed[1]["flag"], bool)
    assert read_metrics(str(tmp_path)) == parsed
    assert capsys.readouterr().out == ""  # quiet: nothing printed


def test_logging_appends_to_an_existing_run(tmp_path):
    RunLogger(str(tmp_path), quiet=True).log({"step": 1})
    RunLogger(str(tmp_path), quiet=True).log({"step": 2})  # a resumed run adds to the file
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]


def test_read_metrics_skips_blank_lines(tmp_path):
    with open(os.path.join(tmp_path, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n\n{"step": 2, "x": 0.5}\n  \n')
    assert read_metrics(str(tmp_path)) == [{"step": 1}, {"step": 2, "x": 0.5}]


def test_not_quiet_prints_the_formatted_line(tmp_path, capsys):
    logger = RunLogger(str(tmp_path))
    record = {"step": 3, "loss": np.float32(0.123456789)}
    logger.log(record)
    out = capsys.readouterr().out
    loss = float(np.float32(0.123456789))
    assert out == f"step=3  loss={loss:.4g}\n"
    assert out.strip() == format_metrics({"step": 3, "loss": loss})


def test_format_metrics():
    metrics = {"step": 7, "loss": 1234.5678, "acc": 0.000123456, "name": "kd", "ok": True}
    assert format_metrics(metrics) == "  ".join(
        ["step=7", f"loss={1234.5678:.4g}", f"acc={0.000123456:.4g}", "name=kd", "ok=True"])
    assert format_metrics(metrics) == "step=7  loss=1235  acc=0.0001235  name=kd  ok=True"
    assert format_metrics({"x": 2.0 / 3.0}, digits=2) == "x=0.67"
    assert format_metrics({}) == ""


def test_progress_without_a_terminal_is_a_plain_line_every_ten_percent(capsys):
    """Under a log file or CI (stderr is not a terminal) progress is a few plain lines, not a
    carriage-return update per step."""
    from utils.logging import progress

    bar = progress(range(50), "epoch 1/2")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3g}")
    assert seen == list(range(50))
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines) and len(lines) == 10
    assert lines[0] == "epoch 1/2: 5/50 (10%)  loss=0.2" and lines[-1].startswith("epoch 1/2: 50/50 (100%)")
