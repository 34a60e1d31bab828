"""W&B logging (utils/logging.RunLogger) through a real script in offline mode: a resumed run
continues the same W&B run (its id kept in <run>/wandb_id), and W&B records the run's config and
the metrics of metrics.jsonl.

wandb (0.31) writes no files/config.yaml nor files/wandb-summary.json offline: everything is in
the run's transaction log, <run>/wandb/offline-run-<time>-<id>/run-<id>.wandb, which `wandb sync`
uploads later. It is read here directly: a 7-byte file header, then LevelDB-log records (4-byte
checksum, 2-byte length, 1-byte type) in 32 KiB blocks, whose pieces make protobuf Records."""
import glob
import json
import os
import struct

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KD_CONFIG = os.path.join(ROOT, "config/distillation/kd_fmnist_frnrelu.yaml")

_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4  # record types; FIRST (2) and MIDDLE (3) pieces are joined up to the LAST


def read_transaction_log(path: str) -> list:
    """The protobuf Records of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"not a W&B transaction log: {path}"
    records, pos, pieces = [], _HEADER, []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zeroed end of a block
            pos += _BLOCK - pos % _BLOCK
            continue
        pieces.append(data[pos + _HEADER:pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    return records


def _items(items) -> dict:
    """{key: value} of config, history or summary items; a key may come split into nested_key."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def recorded(path: str) -> dict:
    """What one start of a run sent to W&B: its id, its config, its history rows and its summary
    (the last value of each key), W&B's own keys (`_wandb`, `_step`, `_runtime`, ...) left out."""
    out = {"run_id": None, "config": {}, "history": [], "summary": {}}
    for record in read_transaction_log(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
    ours = lambda values: {k: v for k, v in values.items() if not k.startswith("_")}
    return {"run_id": out["run_id"], "config": ours(out["config"]),
            "history": [ours(row) for row in out["history"]], "summary": ours(out["summary"])}


def _kd(setup, *args):
    import kd_and_endd

    kd_and_endd.main(list(args) if "--resume" in args else [
        "--config", KD_CONFIG, "--data_root", setup["data_root"], "--teacher_dir", setup["teachers"],
        "--optim_bs", "8", "--model_depth", "8", "--model_width", "1", "--num_teachers", "2",
        "--log_every", "1", *args])


def _read(run, name):
    with open(run / name) as f:
        if name.endswith(".yaml"):
            return yaml.safe_load(f)
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_offline_wandb_keeps_one_run_over_a_resume(tiny_setup, tmp_path, monkeypatch, request):
    import wandb  # the dev extra installs it; without it RunLogger logs nothing to W&B

    home = tmp_path / "wandb_home"  # W&B's settings, cache and staging: nothing under $HOME
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": home / "dir",
                        "WANDB_CACHE_DIR": home / "cache", "WANDB_CONFIG_DIR": home / "config",
                        "WANDB_DATA_DIR": home / "data"}.items():
        monkeypatch.setenv(name, str(value))
    request.addfinalizer(wandb.teardown)  # stop W&B's service process, started with these settings

    run = tmp_path / "kd"
    _kd(tiny_setup, "--optim_ne", "1", "--save", str(run), "--wandb", "true")
    configs, metrics = [_read(run, "config.yaml")], [_read(run, "metrics.jsonl")]
    with open(run / "wandb_id") as f:
        run_id = f.read().strip()
    _kd(tiny_setup, "--resume", str(run), "--optim_ne", "2")  # --wandb true from the saved config
    configs.append(_read(run, "config.yaml"))
    metrics.append(_read(run, "metrics.jsonl")[len(metrics[0]):])
    assert [[m["epoch"] for m in epochs] for epochs in metrics] == [[1], [2]]

    # Both starts are one W&B run: the id made on the first start is reused by the resume.
    logs = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(logs) == 2 and len(run_id) >= 8
    assert [os.path.dirname(path).rsplit("-", 1)[1] for path in logs] == [run_id, run_id]
    starts = [recorded(path) for path in logs]
    assert [start["run_id"] for start in starts] == [run_id, run_id]
    for start, config, epochs in zip(starts, configs, metrics):
        # the run's config as the run directory's config.yaml holds it
        assert start["config"] == config
        assert (start["config"]["seed"], start["config"]["optim_bs"]) == (2025, 8)
        # every epoch's record of metrics.jsonl, and the last one's values as the summary
        assert start["history"] == epochs
        assert start["summary"] == epochs[-1]
    assert [start["config"]["optim_ne"] for start in starts] == [1, 2]
    assert {"epoch", "train/loss", "val/nll"} <= set(starts[1]["summary"])
