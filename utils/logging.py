"""Run logging: a line on the console, `metrics.jsonl` in the run directory, W&B when asked."""
import dataclasses
import json
import os
import secrets
import sys
from typing import Optional

import numpy as np


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item() if np.ndim(value) == 0 else value.tolist()
    return value


def format_metrics(metrics: dict, digits: int = 4) -> str:
    return "  ".join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items())


class _PlainProgress:
    """Progress without a terminal: one plain line every `every` items (no carriage returns)."""

    def __init__(self, iterable, desc: str, total: int, every: int):
        self.iterable, self.desc, self.total, self.every = iterable, desc, total, every
        self.postfix = ""

    def set_postfix(self, **values):
        self.postfix = "  " + "  ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self):
        for count, item in enumerate(self.iterable, start=1):
            yield item
            if count % self.every == 0 or count == self.total:
                print(f"{self.desc}: {count}/{self.total} ({100 * count // self.total}%){self.postfix}",
                      file=sys.stderr, flush=True)


def progress(iterable, desc: str, percent_step: int = 10, total: Optional[int] = None):
    """A progress bar over a sized iterable (or one of `total` items): tqdm on a terminal;
    elsewhere (a log file, CI) a plain line every `percent_step` percent."""
    total = len(iterable) if total is None else total
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, total=total)
    return _PlainProgress(iterable, desc, total, max(1, total * percent_step // 100))


def _process_index() -> int:
    import jax

    return jax.process_index()


def wandb_run_id(run_dir: str) -> str:
    """The run directory's W&B run id, made on its first start and read on every later one, so a
    resumed run continues the same W&B run (`<run_dir>/wandb_id`, written atomically)."""
    path = os.path.join(run_dir, "wandb_id")
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(secrets.token_hex(6) + "\n")
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return f.read().strip()


class RunLogger:
    def __init__(self, run_dir: str, config=None, use_wandb: bool = False, quiet: bool = False):
        self.run_dir, self.config, self.quiet = run_dir, config, quiet
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.use_wandb = use_wandb and _process_index() == 0  # one W&B run, kept by the first host
        self.wandb_run = None

    def _start_wandb(self):
        """Start (or continue) the run's W&B run at its first record, so a resume refused
        before training starts none."""
        self.use_wandb = False
        try:
            import wandb
        except ImportError:
            print("wandb is not installed (pip install -e '.[wandb]'); logging locally only",
                  file=sys.stderr)
            return
        # W&B's files stay in the run directory (<run_dir>/wandb/).
        config = self.config
        self.wandb_run = wandb.init(
            project=getattr(config, "wandb_project", "edfm"), name=getattr(config, "exp_name", None),
            dir=self.run_dir, id=wandb_run_id(self.run_dir), resume="allow",
            config=dataclasses.asdict(config) if config is not None else None)

    def log(self, record: dict):
        if _process_index() != 0:  # one log per run, written by the first host
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.quiet:
            print(format_metrics(record), flush=True)
        if self.use_wandb:
            self._start_wandb()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record.get("step"))

    def drop_after_epoch(self, epoch: int):
        """Forget the records of epochs after `epoch` (logged before a kill, but never
        checkpointed), so a resumed run's metrics.jsonl holds each epoch once."""
        import jax

        if jax.process_index() != 0 or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if _epoch(line) <= epoch]
        if len(kept) < len(lines):
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _epoch(line: str) -> float:
    """A record's epoch; a torn line (a write cut short by a full disk or a kill) counts as
    after every epoch, so it is dropped."""
    try:
        return json.loads(line).get("epoch", 0)
    except json.JSONDecodeError:
        return float("inf")


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
