"""Every benchmark of bench/ in one command, each step in its own process under its own time
limit, the results named after the device; `--smoke` runs the same steps at the tiniest sizes.

    bash bench/accelerator_suite.sh            # on one GPU: about 8 minutes in all (the wrapper)
    python3 bench/suite.py [--budget_s 470]    # the same without the wrapper's set-up
    python3 bench/suite.py --smoke --out_dir /tmp/r   # every step at tiny sizes, on the CPU (CI)
    python3 bench/suite.py --list              # the steps, their commands and time limits
    python3 bench/suite.py --only throughput-c10 zoo_train   # some steps (a rerun)
    python3 bench/suite.py --tables h200       # bench/results/tables-h200.md from the JSON files

The steps (accelerator_steps(); a step's key is the name of the JSON it writes):
  throughput-{c10,c100}[-bfloat16]   sgd_swag, KD and EDFM train steps: images/s, FLOPs, MFU
  zoo_train[-bfloat16]               ResNet-18/50 training step at 224x224 (synthetic): MFU
  gendd_step                         GenDD's stage-2 step, both CIFAR-100 pairs, batch 64, and
                                     its parts (teacher forward, student, diffusion head): MFU
  edfm_latency-c10                   EDFM, 32 members x 13 evaluations, against one backbone
                                     forward and the 30-member teacher ensemble
  data_pipeline-c10                  gather + augmentation + mixup against the KD step
  memory-c10[-bfloat16]              per-device memory of each step (allocator peak on GPUs)
  teacher_ensemble                   30 members: vmap and lax.map against a Python loop
  zoo                                ResNet-18/50 forward at 224x224

How it keeps to the time: each step runs as its own process group (a crash or a hang costs that
step only) under a time limit = its budget in accelerator_steps(), never more than what is left
of `--budget_s` (the whole suite, default 470 s: under 8 minutes with the interpreter's start);
a step that would get under 10 s is skipped, and the rest still run. The steps are in order of
importance and run one at a time (`--jobs 1`), so each timing has the device to itself.
Compiling dominates on a GPU (the steps run for milliseconds; XLA compiles each program for tens
of seconds on the host), so every step shares one persistent compilation cache
(JAX_COMPILATION_CACHE_DIR, a fresh directory unless --cache_dir): memory and data_pipeline
rebuild the very programs throughput compiled and load them from it. Before the timed steps, a
warm-up phase (`--warm_jobs` processes at once, at most `--warm_budget_s`) runs every step's
compiles in parallel on the host's cores, each throughput method and zoo network in a process of
its own, with one timed call and the results thrown away; the timed steps then mostly load from
the cache. Timings are taken in the sequential phase only, one process on the device at a time.
(Caveat: XLA autotunes GPU kernels while compiling, and the warm-up's kernels ran beside
others; `--warm_jobs 0` compiles in the timed steps instead, for a comparison.)

The budgets are estimates made without a GPU (none has run this yet): on the CPU, compiling is
~70% of a step's process time (the tiny KD step: 53 s cold, 15 s with the cache), and a GPU
host compiles a full-size ResNet train step in tens of seconds, so the cache-filled timed steps
are given 25-45 s each. suite-<device>.json records every step's seconds (and the warm-up's),
so the first GPU run recalibrates them; `--only KEY ...` reruns the steps that did not fit.

`--smoke` (smoke_steps()): every benchmark script at the tiniest sizes on the CPU, one setting
each where the GPU plan runs several, two steps at a time (`--jobs 2`; a smoke's timings are not
measurements), no warm-up; the JSON files, the summary and the tables are written as above.

Output (in --out_dir, default bench/results): each benchmark's JSON, named
`<key>-<device>.json` (device: `cpu`, or the accelerator's kind, e.g. `h200` for
"NVIDIA H200"; the scripts run alone name theirs after the platform, `-gpu`), `suite-<device>.json`
(each step's command, status, seconds, files) and `tables-<device>.md`, the README's
"Performance" tables filled from those files, with the device named. One line per step:
`<key> ok|failed|timed out|skipped <seconds> s`. Exit status 0 only if every step is ok.
"""
import argparse
import concurrent.futures
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import gendd_reference_step  # noqa: E402  (the GenDD pairs; imports neither JAX nor the project)
from utils.reporting import fmt  # noqa: E402  (light: no JAX in this driver process)
MIN_STEP_S = 10  # a step that would get less is skipped
BUDGET_S = 470  # the whole suite on an accelerator (the issue: under 8 minutes on one GPU)
SMOKE_BUDGET_S = 1800


@dataclasses.dataclass
class Step:
    key: str  # the result's name: <key>-<platform>.json
    script: str  # in bench/
    argv: list
    budget_s: float  # time limit of the timed run on an accelerator
    warm: list = dataclasses.field(default_factory=list)  # argv of its warm-up processes
    after: tuple = ()  # steps that must end first (they fill the compilation cache it reads)


# ---------------------------------------------------------------------------------- the plan
IMAGENET_MODELS = ("resnet18", "resnet50")
METHODS = ("sgd_swag", "kd", "edfm")  # the GPU targets' steps (bench/throughput.py has every method's)
# Tiny sizes (as the tests always ran them): ResNet-8x1, 16x16 images, batch 8, 2 teacher runs.
SMOKE_SIZES = ["--depth", "8", "--width", "1", "--batch", "8", "--size", "16", "--teacher_runs", "2"]
SMOKE_TRAIN = SMOKE_SIZES + ["--num_images", "16", "--num_teachers", "1"]
SMOKE_TIMING = ["--repeats", "1", "--warmup", "1"]
SMOKE_PEAK = ["--peak_flops", "1e12"]  # CPUs have no peak in the table: MFU's arithmetic checked


def _timing_once(argv: list) -> list:
    """`argv` with one timed call after one warm-up call (the warm-up phase's runs)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--repeats", "--warmup"):
            skip = True
            continue
        out.append(arg)
    return out + ["--repeats", "1", "--warmup", "1"]


def accelerator_steps() -> list:
    """The suite on one GPU, in order of importance (what runs out of budget is what comes last):
    first the steps of the issue's GPU targets (c10's ResNet-32x2 throughput, EDFM's latency, the
    data path's share, R = 10 MultiSWAG runs together), then the rest. Budgets (s) are for the
    timed phase, after the warm-up."""
    throughput = {}
    for preset in ("c10", "c100"):
        for dtype in ("float32", "bfloat16"):
            argv = ["--preset", preset, "--batch", "128", "--dtype", dtype]
            key = f"throughput-{preset}" + ("-bfloat16" if dtype == "bfloat16" else "")
            throughput[key] = Step(key, "throughput.py", argv + ["--methods", *METHODS, "--repeats", "20",
                                                                 "--warmup", "3"], 40,
                                   [_timing_once(argv + ["--methods", m]) for m in METHODS])
    edfm = ["--preset", "c10", "--batch", "128", "--members", "32", "--teacher_members", "30"]
    edfm_latency = Step("edfm_latency-c10", "edfm_latency.py", edfm + ["--repeats", "20", "--warmup", "3"],
                        35, [_timing_once(edfm)])
    # No warm-up: its KD step is throughput-c10's (from the cache); the pipeline alone is small.
    pipeline = Step("data_pipeline-c10", "data_pipeline.py",
                    ["--preset", "c10", "--batch", "128", "--repeats", "20", "--warmup", "3"], 25,
                    after=("throughput-c10",))
    # MultiSWAG: R = 10 runs of the c10 teacher step in one program (vmap) against one by one.
    runs = ["--preset", "c10", "--runs", "10", "--batch", "128"]
    multiswag = Step("multiswag-c10-R10", "multiswag.py", runs + ["--repeats", "10", "--warmup", "2"], 40,
                     [_timing_once(runs)])
    models = ",".join(IMAGENET_MODELS)
    zoo_train = []
    for dtype in ("float32", "bfloat16"):
        argv = ["--train", "--models", models, "--batch", "128", "--dtype", dtype]
        zoo_train.append(Step("zoo_train" + ("-bfloat16" if dtype == "bfloat16" else ""), "zoo.py",
                              argv + ["--repeats", "20", "--warmup", "3"], 35,
                              [_timing_once(["--train", "--models", m, "--batch", "128", "--dtype", dtype])
                               for m in IMAGENET_MODELS]))
    # GenDD's stage-2 step at the recipe's batch (64), both CIFAR-100 pairs, whole and in parts.
    pairs = sorted(gendd_reference_step.PAIRS)
    gendd = Step("gendd_step", "gendd_step.py", ["--pairs", *pairs, "--repeats", "20", "--warmup", "3"], 60,
                 [_timing_once(["--pairs", pair]) for pair in pairs])
    memory = []
    for dtype in ("float32", "bfloat16"):  # the steps throughput compiled: loaded from the cache
        suffix = "-bfloat16" if dtype == "bfloat16" else ""
        memory.append(Step("memory-c10" + suffix, "memory.py", ["--preset", "c10", "--batch", "128", "--dtype", dtype,
                                                                "--methods", *METHODS],
                           45, after=("throughput-c10" + suffix,)))
    ensemble = ["--members", "30", "--batch", "256", "--depth", "32", "--width", "2"]
    teacher_ensemble = Step("teacher_ensemble", "teacher_ensemble.py", ensemble + ["--repeats", "10"], 25,
                            [ensemble + ["--repeats", "1"]])
    forward = ["--models", models, "--batch", "64"]
    zoo = Step("zoo", "zoo.py", forward + ["--repeats", "20", "--warmup", "3"], 25,
               [_timing_once(["--models", m, "--batch", "64"]) for m in IMAGENET_MODELS])
    # The streaming loader on generated JPEGs (in-process and 8 workers) and its share of a
    # ResNet-18 224 step; its first epoch and first step are its own warm-up.
    streaming = Step("streaming", "streaming.py", ["--images", "768", "--batch", "128", "--workers", "0", "8",
                                                   "--steps", "4"], 60)
    return [throughput["throughput-c10"], throughput["throughput-c10-bfloat16"], edfm_latency, pipeline,
            multiswag, throughput["throughput-c100"], throughput["throughput-c100-bfloat16"], *zoo_train, gendd,
            *memory, teacher_ensemble, zoo, streaming]


def smoke_steps() -> list:
    """Every benchmark at the tiniest sizes (CI, on the CPU), one setting each where the GPU runs
    several: throughput-c10 (sgd_swag and KD) and throughput-c100-bfloat16 (sgd_swag) cover
    both presets' YAMLs and both dtypes' MFU; memory-c10 runs sgd_swag and EDFM in their own
    processes (the EDFM step's one compile); the zoo trains and runs a CIFAR ResNet-8 (the
    ImageNet networks are the same code at 224x224). Listed longest first: the smoke runs two
    steps at a time (--jobs 2), memory and data_pipeline after throughput-c10, whose compiled
    steps they load from the cache."""
    throughput = ["--preset", "c10", *SMOKE_TRAIN, *SMOKE_TIMING, *SMOKE_PEAK]
    ensemble = ["--members", "2", "--batch", "2", "--depth", "8", "--width", "1", "--size", "16"]
    zoo_train = ["--train", "--models", "resnet8", "--batch", "2", *SMOKE_TIMING, *SMOKE_PEAK]
    return [
        Step("throughput-c10", "throughput.py", throughput + ["--methods", "sgd_swag", "kd"], 600),
        Step("teacher_ensemble", "teacher_ensemble.py", ensemble + ["--repeats", "1"], 600),
        Step("throughput-c100-bfloat16", "throughput.py",
             ["--preset", "c100", "--dtype", "bfloat16", *SMOKE_TRAIN, *SMOKE_TIMING, *SMOKE_PEAK,
              "--methods", "sgd_swag"], 600),
        Step("edfm_latency-c10", "edfm_latency.py", ["--preset", "c10", *SMOKE_SIZES, *SMOKE_TIMING,
                                                     "--members", "2", "--teacher_members", "2"], 600),
        Step("gendd_step", "gendd_step.py", ["--pairs", "res110_res32", "--teacher", "resnet8", "--student",
                                             "resnet8", "--batch", "4", "--head_width", "32",
                                             "--diffusion_batch_mul", "2", *SMOKE_TIMING, *SMOKE_PEAK], 600),
        Step("zoo_train", "zoo.py", zoo_train + ["--dtype", "float32"], 600),
        Step("zoo_train-bfloat16", "zoo.py", zoo_train + ["--dtype", "bfloat16"], 600),
        Step("zoo", "zoo.py", ["--models", "resnet8", "--batch", "2", *SMOKE_TIMING], 600,
             after=("zoo_train",)),
        Step("memory-c10", "memory.py", ["--preset", "c10", *SMOKE_TRAIN, "--steps", "1",
                                         "--methods", "sgd_swag", "edfm"], 600, after=("throughput-c10",)),
        Step("data_pipeline-c10", "data_pipeline.py", ["--preset", "c10", *SMOKE_TRAIN, *SMOKE_TIMING], 600,
             after=("throughput-c10",)),
        Step("multiswag-c10-R10", "multiswag.py", ["--preset", "c10", "--depth", "8", "--width", "1",
                                                   "--size", "16", "--batch", "8", "--num_images", "16",
                                                   "--runs", "10", *SMOKE_TIMING], 600),
        Step("streaming", "streaming.py", ["--images", "24", "--batch", "8", "--size", "32", "--steps", "1",
                                           "--workers", "0"], 600),
    ]


# ------------------------------------------------------------------------------- the results
def device_tag(description: str, platform: str) -> str:
    """The device in a file name: `cpu`, or the accelerator's kind ("1 x NVIDIA H200" -> `h200`,
    "8 x NVIDIA H100 80GB HBM3" -> `8xh100-80gb-hbm3`)."""
    if platform == "cpu":
        return "cpu"
    match = re.match(r"\s*(\d+)\s*x\s*(.*)", description)
    count, kind = (int(match.group(1)), match.group(2)) if match else (1, description)
    kind = re.sub(r"^nvidia\s+", "", kind.strip().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", kind).strip("-") or platform
    return f"{count}x{slug}" if count > 1 else slug


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0


def figures(result: dict) -> dict:
    """The figures of a result that must be finite and positive: {where: value}."""
    name = result["benchmark"].split("-")[0]
    out = {}
    if name == "throughput":
        for method, row in result["steps"].items():
            for key in ("median_s", "images_per_s", "flops_per_step", "mfu"):
                if key in row and (key != "mfu" or result.get("peak_flops_per_device")):
                    out[f"{method}.{key}"] = row[key]
    elif name == "zoo_train":
        for model, row in result["models"].items():
            for key in ("step_ms", "images_per_s", "flops_per_step", "params"):
                out[f"{model}.{key}"] = row[key]
            if result.get("peak_flops_per_device"):
                out[f"{model}.mfu"] = row["mfu"]
    elif name == "gendd_step":
        for pair, row in result["pairs"].items():
            for key in ("step_s", "images_per_s", "step_flops", "teacher_forward_s", "student_forward_backward_s",
                        "head_forward_backward_s"):
                out[f"{pair}.{key}"] = row["jax"][key]
            if result.get("peak_flops_per_device"):
                out[f"{pair}.mfu"] = row["jax"]["mfu"]
    elif name == "zoo":
        for model, row in result["models"].items():
            for key in ("params", "flops_per_input", "latency_ms_per_batch", "images_per_s"):
                out[f"{model}.{key}"] = row[key]
    elif name == "edfm_latency":
        for predictor, row in result["predictors"].items():
            out[f"{predictor}.latency_s"] = row["latency_s"]
            if "flops_per_batch" in row:
                out[f"{predictor}.flops_per_batch"] = row["flops_per_batch"]
        out.update({f"ratios.{k}": v for k, v in result["ratios"].items()})
    elif name == "data_pipeline":
        for method, row in result["methods"].items():
            for key in ("pipeline_median_s", "step_median_s", "pipeline_share"):
                out[f"{method}.{key}"] = row[key]
    elif name == "memory":
        for method, row in result["steps"].items():
            out[f"{method}.xla.peak_estimate"] = (row["xla"] or {}).get("peak_estimate")
            if row.get("device"):
                out[f"{method}.device.peak_in_use"] = row["device"].get("peak_in_use")
    elif name == "streaming":
        out["per_worker.images_per_s"] = result["per_worker"]["images_per_s"]
        for row in result["loader"]:
            out[f"loader.{row['workers']}.images_per_s"] = row["images_per_s"]
        for key in ("streamed_step_s", "synthetic_step_s"):  # the share may be 0: not checked
            out[f"step.{key}"] = result["step"][key]
    elif name == "multiswag":
        for way in ("together", "sequential"):
            out[f"{way}.runs_images_per_s"] = result[way]["runs_images_per_s"]
        out["speedup"] = result["speedup"]
    elif name == "teacher_ensemble":
        for way, row in result["timings"].items():
            out[f"{way}.median_s"] = row["median_s"]
        out.update({f"speedup.{k}": v for k, v in result["speedup_vs_python_loop"].items()})
    return out


def check(result: dict) -> list:
    """The figures of `result` that are not finite and positive (empty: all good)."""
    return [f"{k}={v!r}" for k, v in figures(result).items() if not _finite_positive(v)] or (
        [] if figures(result) else ["no figures"])


# ------------------------------------------------------------------------------ running steps
def _command(step: Step, argv: list, python: str) -> list:
    return [python, os.path.join(HERE, step.script), *argv]


def _stop(proc: subprocess.Popen):
    """End a step's process group (it and the children it started, e.g. memory.py's)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(cmd: list, env: dict, timeout: float, log: Optional[str] = None) -> tuple:
    """(return code or None when timed out, seconds)."""
    start = time.monotonic()
    out = open(log, "w") if log else None
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = None
    finally:
        if out:
            out.close()
    return rc, time.monotonic() - start


def warm_up(steps: list, env: dict, python: str, jobs: int, budget_s: float, scratch: str) -> dict:
    """Every step's warm-up runs, `jobs` at a time, until `budget_s`: the persistent cache fills.
    Returns {"runs": n, "ok": n, "seconds": s}."""
    runs = [(step, argv) for step in steps for argv in step.warm]
    if not runs or jobs < 1 or budget_s < MIN_STEP_S:
        return {"runs": 0, "ok": 0, "seconds": 0.0}
    env = {**env, "BENCH_RESULTS_DIR": os.path.join(scratch, "warm-results"),
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # several processes share the device
    start = time.monotonic()
    deadline = start + budget_s
    print(f"[suite] warm-up: {len(runs)} compile runs, {jobs} at a time, at most {budget_s:.0f} s", flush=True)

    def one(i, step, argv):
        left = deadline - time.monotonic()
        if left < 1:
            return step.key, None, 0.0
        rc, seconds = _run(_command(step, argv, python), env, left,
                           os.path.join(scratch, f"warm-{i:02d}-{step.key}.log"))
        return step.key, rc, seconds

    ok = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, i, step, argv) for i, (step, argv) in enumerate(runs)]
        for future in concurrent.futures.as_completed(futures):
            key, rc, seconds = future.result()
            ok += rc == 0
            state = "ok" if rc == 0 else "stopped" if rc is None else f"failed (rc {rc})"
            print(f"[suite] warm-up {key:<24} {state:<14} {seconds:6.1f} s", flush=True)
    seconds = time.monotonic() - start
    print(f"[suite] warm-up done: {ok}/{len(runs)} ok in {seconds:.1f} s", flush=True)
    return {"runs": len(runs), "ok": ok, "seconds": seconds}


def run_step(step: Step, env: dict, python: str, timeout: float, out_dir: str, scratch: str,
             quiet: bool = False) -> dict:
    """One timed step into a staging directory; its JSON checked and moved to
    `out_dir/<key>-<device>.json`. `quiet`: its output goes to a log file (steps running side
    by side), whose end is printed if the step is not ok."""
    staging = tempfile.mkdtemp(prefix=f"{step.key}-", dir=scratch)
    cmd = _command(step, step.argv, python)
    print(f"[suite] {step.key}: {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)}"
          f"  (limit {timeout:.0f} s)", flush=True)
    log = os.path.join(scratch, f"{step.key}.log") if quiet else None
    rc, seconds = _run(cmd, {**env, "BENCH_RESULTS_DIR": staging}, timeout, log)
    record = {"key": step.key, "command": ["python3", f"bench/{step.script}", *step.argv],
              "limit_s": round(timeout, 1), "seconds": round(seconds, 1), "rc": rc, "files": []}
    problems = []
    for path in sorted(glob.glob(os.path.join(staging, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        base, platform = os.path.basename(path)[:-len(".json")].rsplit("-", 1)
        tag = device_tag(result.get("device", ""), platform)
        record["device"], record["tag"] = result.get("device"), tag
        problems += [f"{base}: {p}" for p in check(result)]
        if base != step.key:
            problems.append(f"unexpected result {base}")
        target = os.path.join(out_dir, f"{base}-{tag}.json")
        shutil.move(path, target)
        record["files"].append(os.path.relpath(target, ROOT) if target.startswith(ROOT) else target)
    if rc is None:
        record["status"] = "timed out"
    elif rc != 0:
        record["status"] = "failed"
        problems.append(f"exit status {rc}")
    elif not record["files"]:
        record["status"] = "failed"
        problems.append(f"no {step.key}-*.json written")
    else:
        record["status"] = "failed" if problems else "ok"
    record["problems"] = problems
    shutil.rmtree(staging, ignore_errors=True)
    if log and record["status"] != "ok":
        with open(log) as f:
            print(f"[suite] {step.key}: the end of its output\n" + "".join(f.readlines()[-40:]), flush=True)
    return record


def run_steps(steps: list, jobs: int, deadline: float, run) -> list:
    """`run(step, limit)` for every step, `jobs` at a time, each once the steps in its `after`
    have ended, in the order given; a step's limit is its budget or what is left before
    `deadline`, and under MIN_STEP_S it is skipped. Returns the records in the steps' order."""
    keys = {step.key for step in steps}
    records, pending, running = {}, list(steps), {}

    def report(record):
        records[record["key"]] = record
        print(f"[suite] {record['key']:<26} {record['status']:<10} {record['seconds']:6.1f} s"
              + (f"  {'; '.join(record['problems'])}" if record["problems"] else ""), flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for step in list(pending):
                if len(running) >= max(1, jobs):
                    break
                if any(k in keys and k not in records for k in step.after):
                    continue
                pending.remove(step)
                left = deadline - time.monotonic()
                limit = min(step.budget_s, left)
                if limit < MIN_STEP_S:
                    report({"key": step.key, "status": "skipped", "seconds": 0.0, "limit_s": round(limit, 1),
                            "command": ["python3", f"bench/{step.script}", *step.argv], "files": [],
                            "problems": [f"{max(left, 0):.0f} s left of the suite's budget"]})
                    continue
                running[pool.submit(run, step, limit)] = step
            if running:
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    report(future.result())
    return [records[step.key] for step in steps]


# ---------------------------------------------------------------------------------- the tables
def _load(out_dir: str, key: str, tag: str) -> Optional[dict]:
    path = os.path.join(out_dir, f"{key}-{tag}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def throughput_row(network: str, dtype: str, step: str, batch: int, images_per_s, step_s, flops, mfu) -> str:
    """One row of the training-throughput table (a missing figure is a dash)."""
    return (f"| {network} | {dtype} | {step} | {batch} | {fmt(images_per_s, ',.0f')} | {fmt(step_s, '.2f', 1e3)} | "
            f"{fmt(flops, '.3g')} | {fmt(mfu, '.1%')} |")


def tables(out_dir: str, tag: str) -> str:
    """The README's "Performance" tables (markdown), every figure read from
    `out_dir/*-<tag>.json`; a missing file leaves its rows out."""
    lines, device, jax_version = [], None, None

    def seen(result):
        nonlocal device, jax_version
        device = device or result.get("device")
        jax_version = jax_version or result.get("jax")
        return result

    rows = []
    for preset in ("c10", "c100"):
        for dtype in ("float32", "bfloat16"):
            key = f"throughput-{preset}" + ("-bfloat16" if dtype == "bfloat16" else "")
            result = _load(out_dir, key, tag)
            if result:
                seen(result)
                config = result["config"]
                net = f"ResNet-{config.get('depth') or 32}×{config.get('width') or (2 if preset == 'c10' else 4)}"
                for method, row in result["steps"].items():
                    rows.append(throughput_row(f"{preset} ({net})", dtype, method, config["batch"],
                                               row["images_per_s"], row["median_s"], row.get("flops_per_step"),
                                               row.get("mfu")))
    for dtype in ("float32", "bfloat16"):
        result = _load(out_dir, "zoo_train" + ("-bfloat16" if dtype == "bfloat16" else ""), tag)
        if result:
            seen(result)
            for model, row in result["models"].items():
                shape = "x".join(str(s) for s in row["input"][:2])
                rows.append(throughput_row(f"{model} {shape} (synthetic)", dtype, "SGD step", row["batch"],
                                           row["images_per_s"], row["step_ms"] / 1e3, row["flops_per_step"],
                                           row.get("mfu")))
    result = _load(out_dir, "gendd_step", tag)
    if result:
        seen(result)
        for pair, row in result["pairs"].items():
            j = row["jax"]
            # the recipe's networks unless the run named others (older files name none)
            teacher, student = j.get("teacher"), j.get("student")
            if not teacher:
                teacher, student = gendd_reference_step.PAIRS[pair][:2]
            rows.append(throughput_row(f"GenDD stage 2, c100 ({teacher} → {student})", "float32", "gendd",
                                       result["batch"], j["images_per_s"], j["step_s"], j["step_flops"],
                                       j.get("mfu")))
    if rows:
        lines += ["**Training throughput** (`throughput-*`, `zoo_train-*`, `gendd_step`; MFU against "
                  "bench/common.py's peak table: TF32 for float32, bf16 dense for bfloat16)", "",
                  "| preset / network | dtype | step | batch | images/s | ms per step | FLOPs per step | MFU |",
                  "|---|---|---|---|---|---|---|---|", *rows, ""]

    rows = []
    result = _load(out_dir, "edfm_latency-c10", tag)
    if result:
        seen(result)
        costs, ratios = result["predictors"], result["ratios"]
        rows.append(f"| (b) EDFM latency, c10, batch {result['config']['batch']} | EDFM "
                    f"({costs['edfm']['num_members']} members, {costs['edfm'].get('velocity_evaluations')} "
                    f"evaluations) {fmt(costs['edfm']['latency_s'], '.2f', 1e3)} ms = "
                    f"**{fmt(ratios.get('edfm_over_backbone_latency'), '.2f')}×** one backbone forward "
                    f"({fmt(costs['backbone']['latency_s'], '.2f', 1e3)} ms) and "
                    f"**{fmt(ratios.get('edfm_over_teacher_latency'), '.3f')}×** the "
                    f"{costs['teacher']['num_members']}-member teacher "
                    f"({fmt(costs['teacher']['latency_s'], '.2f', 1e3)} ms) | ≤ 1.5× one backbone forward |")
    result = _load(out_dir, "teacher_ensemble", tag)
    if result:
        seen(result)
        speed, config = result["speedup_vs_python_loop"], result["config"]
        rows.append(f"| (c) teacher ensemble, {config['members']} members, batch {config['batch']} | "
                    f"`vmap` **{fmt(speed.get('vmap'), '.2f')}×** a Python loop, `lax.map` "
                    f"{fmt(speed.get('lax_map'), '.2f')}× | vmap ≥ 3× the loop |")
    result = _load(out_dir, "data_pipeline-c10", tag)
    if result:
        seen(result)
        for method, row in result["methods"].items():
            rows.append(f"| (d) data pipeline, c10, batch {row['batch']} | {fmt(row['pipeline_median_s'], '.2f', 1e3)}"
                        f" ms of a {fmt(row['step_median_s'], '.2f', 1e3)} ms {method.upper()} step: "
                        f"**{fmt(row['pipeline_share'], '.1%')}** | ≤ 10% of the step |")
    for dtype in ("float32", "bfloat16"):
        result = _load(out_dir, "memory-c10" + ("-bfloat16" if dtype == "bfloat16" else ""), tag)
        if result:
            seen(result)
            cells = []
            for method, row in result["steps"].items():
                peak = (row.get("device") or {}).get("peak_in_use")
                estimate = (row.get("xla") or {}).get("peak_estimate")
                cells.append(f"`{method}` {fmt(peak, ',.0f')} (XLA {fmt(estimate, ',.0f')})")
            rows.append(f"| (e) memory, c10, batch {result['config']['batch']}, {dtype}: allocator peak "
                        f"(XLA's estimate), MiB per device | {', '.join(cells)} | reported |")
    result = _load(out_dir, "multiswag-c10-R10", tag)
    if result:
        seen(result)
        rows.append(f"| (g) MultiSWAG, {result['runs']} runs of the c10 teacher step ({result['model']}, "
                    f"batch {result['batch']}) | together ({result['vectorize']}) "
                    f"{fmt(result['together']['runs_images_per_s'], ',.0f')} runs × images/s, one by one "
                    f"{fmt(result['sequential']['runs_images_per_s'], ',.0f')}: **{fmt(result['speedup'], '.2f')}×** "
                    f"| R = 10 together ≥ 3× sequential |")
    result = _load(out_dir, "streaming", tag)
    if result:
        seen(result)
        step = result["step"]
        loaders = f"{fmt(result['per_worker']['images_per_s'], ',.0f')} images/s per worker; " + ", ".join(
            f"grain with {r['workers'] or 'no'} worker processes {fmt(r['images_per_s'], ',.0f')} images/s "
            f"over an epoch of {r['images']} ({fmt(r['first_batch_s'], '.1f')} s to the first batch)"
            for r in result["loader"])
        rows.append(f"| (h) streaming, generated JPEGs -> {result['size']}² RandomResizedCrop, flip, "
                    f"RandAugment | {loaders}; ResNet-18 step, batch {step['batch']}: "
                    f"{fmt(step['streamed_step_s'], '.2f', 1e3)} ms streamed, "
                    f"{fmt(step['synthetic_step_s'], '.2f', 1e3)} ms synthetic: loader share "
                    f"**{fmt(step['loader_share'], '.1%')}** | ≤ 10% of the step |")
    result = _load(out_dir, "zoo", tag)
    if result:
        seen(result)
        cells = [f"{m} {fmt(r['images_per_s'], ',.0f')} images/s ({fmt(r['latency_ms_per_batch'], '.2f')} ms)"
                 for m, r in result["models"].items()]
        rows.append(f"| zoo forward, batch {result['batch']} | {', '.join(cells)} | – |")
    if rows:
        lines += ["| benchmark | result | issue target |", "|---|---|---|", *rows, ""]
    if not lines:
        return ""
    where = os.path.relpath(out_dir, ROOT) if out_dir.startswith(ROOT + os.sep) else out_dir
    head = [f"Device: **{device}** (jax {jax_version}); from `{where}/*-{tag}.json`, "
            f"written by `bash bench/accelerator_suite.sh`.", ""]
    return "\n".join(head + lines)


def write_tables(out_dir: str, tag: str) -> Optional[str]:
    text = tables(out_dir, tag)
    if not text:
        return None
    path = os.path.join(out_dir, f"tables-{tag}.md")
    with open(path, "w") as f:
        f.write(text)
    return path


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every step at the tiniest sizes (CPU, CI)")
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--budget_s", type=float, help="the whole suite, seconds (default 470; smoke 1800)")
    parser.add_argument("--jobs", type=int, help="steps run at a time (default 1; smoke 2: its timings "
                                                  "are not measurements)")
    parser.add_argument("--warm_jobs", type=int,
                        help="parallel warm-up processes (default: the host's cores - 2, 2 to 12; "
                             "smoke 0; 0: no warm-up)")
    parser.add_argument("--warm_budget_s", type=float, default=170, help="the warm-up phase at most, s")
    parser.add_argument("--cache_dir", help="JAX persistent compilation cache (default: a fresh one)")
    parser.add_argument("--only", nargs="+", metavar="KEY", help="only these steps (keys or prefixes)")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--tables", metavar="DEVICE", help="only write tables-DEVICE.md from the JSON files")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the steps")
    args = parser.parse_args(argv)

    out_dir = os.path.abspath(args.out_dir)
    if args.tables:
        path = write_tables(out_dir, args.tables)
        print(f"wrote {path}" if path else f"no *-{args.tables}.json in {out_dir}")
        return 0 if path else 1
    steps = smoke_steps() if args.smoke else accelerator_steps()
    if args.only:
        steps = [s for s in steps if any(s.key == k or s.key.startswith(k + "-") for k in args.only)]
        if not steps:
            parser.error(f"no step matches {args.only}")
    if args.list:
        for step in steps:
            print(f"{step.key:<26} {step.budget_s:5.0f} s  python3 bench/{step.script} {' '.join(step.argv)}")
            for warm in step.warm:
                print(f"{'':<26} warm-up   python3 bench/{step.script} {' '.join(warm)}")
        return 0
    budget = args.budget_s or (SMOKE_BUDGET_S if args.smoke else BUDGET_S)
    jobs = args.jobs or (2 if args.smoke else 1)
    if args.warm_jobs is not None:
        warm_jobs = args.warm_jobs
    else:  # the host's cores, two left for the driver and the device's own threads
        warm_jobs = 0 if args.smoke else max(2, min(12, (os.cpu_count() or 4) - 2))
    start = time.monotonic()
    deadline = start + budget
    os.makedirs(out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-suite-")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=args.cache_dir or os.path.join(scratch, "jax-cache"))
    env.pop("BENCH_RESULTS_DIR", None)
    try:
        warm = warm_up(steps, env, args.python, warm_jobs, min(args.warm_budget_s, budget / 2), scratch)
        records = run_steps(steps, jobs, deadline, lambda step, limit: run_step(
            step, env, args.python, limit, out_dir, scratch, quiet=jobs > 1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    total = time.monotonic() - start
    tag = next((r["tag"] for r in records if r.get("tag")), None)
    device = next((r["device"] for r in records if r.get("device")), None)
    print("[suite] summary")
    for r in records:
        print(f"  {r['key']:<26} {r['status']:<10} {r['seconds']:6.1f} s (limit {r['limit_s']:.0f} s)")
    failed = [r["key"] for r in records if r["status"] != "ok"]
    print(f"  {'total':<26} {'ok' if not failed else f'{len(failed)} not ok':<10} {total:6.1f} s "
          f"(budget {budget:.0f} s; warm-up {warm['seconds']:.1f} s)")
    if tag:
        summary = {"benchmark": "suite", "device": device, "smoke": args.smoke, "budget_s": budget,
                   "total_s": round(total, 1), "jobs": jobs, "warm_up": warm, "warm_jobs": warm_jobs,
                   "steps": records}
        path = os.path.join(out_dir, f"suite-{tag}.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        tables_path = write_tables(out_dir, tag)
        print(f"[suite] wrote {path}" + (f" and {tables_path}" if tables_path else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
