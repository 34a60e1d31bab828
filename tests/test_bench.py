"""The benchmarks of bench/ through the one command a GPU session runs: `bash
bench/accelerator_suite.sh --smoke` runs every benchmark at the tiniest sizes (ResNet-8x1,
16x16 images, batch 8 over the 4 simulated devices, 1 timed call) into a temporary directory;
each JSON must be there, named after the device, with finite positive figures whose ratios
are the quotients of the reported medians."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import common  # noqa: E402
import suite  # noqa: E402

DEVICES = 4  # tests/conftest.py's simulated CPU devices, which the suite's processes inherit


def positive(*values):
    for value in values:
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, value


def load(out, key):
    with open(out / f"{key}-cpu.json") as f:
        return json.load(f)


def check_throughput(out):
    """MFU and its arithmetic: images/s = batch / median, the step's FLOPs = devices x one
    device's share, achieved = FLOPs / median, MFU = achieved / (peak x devices)."""
    for key, methods, dtype in (("throughput-c10", ["sgd_swag", "kd"], "float32"),
                                ("throughput-c100-bfloat16", ["sgd_swag"], "bfloat16")):
        result = load(out, key)
        assert result["benchmark"] == key and result["peak_flops_per_device"] == 1e12
        assert result["config"]["dtype"] == dtype and list(result["steps"]) == methods
        first = result["steps"][methods[0]]["median_s"]
        for row in result["steps"].values():
            positive(row["median_s"], row["images_per_s"], row["flops_per_step"],
                     row["achieved_flops_per_s"], row["mfu"])
            assert row["batch"] == 8 and row["devices"] == DEVICES and len(row["times_s"]) == 1
            assert row["images_per_s"] == pytest.approx(8 / row["median_s"])
            assert row["flops_per_step"] == pytest.approx(DEVICES * row["flops_per_device_step"])
            assert row["achieved_flops_per_s"] == pytest.approx(row["flops_per_step"] / row["median_s"])
            assert row["mfu"] == pytest.approx(row["achieved_flops_per_s"] / (DEVICES * 1e12))
            assert row["relative_step_time"] == pytest.approx(row["median_s"] / first)
    # KD adds the augmentation and a teacher forward to the student's forward and backward.
    steps = load(out, "throughput-c10")["steps"]
    assert steps["kd"]["flops_per_step"] > steps["sgd_swag"]["flops_per_step"]


def check_gendd_step(out):
    """GenDD's stage-2 step at the smoke's sizes (resnet8 -> resnet8, batch 4, M = 2, a 32-wide
    head): the networks and sizes asked for, images/s = batch / step, MFU = FLOPs / step / (peak x
    devices), the head's rows B·K·M (one 64-dim token per image), the parts' sum."""
    result = load(out, "gendd_step")
    assert result["benchmark"] == "gendd_step" and result["peak_flops_per_device"] == 1e12
    assert list(result["pairs"]) == ["res110_res32"] and result["batch"] == 4
    j = result["pairs"]["res110_res32"]["jax"]
    assert (j["teacher"], j["student"], j["devices"], j["head_width"]) == ("resnet8", "resnet8", DEVICES, 32)
    assert j["head_rows"] == 2 * 4 * 1
    positive(j["step_s"], j["step_flops"], j["mfu"])
    assert j["images_per_s"] == pytest.approx(4 / j["step_s"])
    assert j["mfu"] == pytest.approx(j["step_flops"] / j["step_s"] / (DEVICES * 1e12))
    assert j["parts_sum_s"] == pytest.approx(j["teacher_forward_s"] + j["student_forward_backward_s"]
                                             + j["head_forward_backward_s"])


def check_zoo(out):
    """The forward: resnet8's parameters are RepDistiller's (100 classes), its FLOPs about twice
    its multiply-adds (12.5M per 32x32 input; XLA skips the zero padding's, so a little less).
    The training step: forward, backward (about twice the forward) and the SGD update."""
    forward = load(out, "zoo")["models"]["resnet8"]
    assert forward["params"] == 83_892 and forward["input"] == [32, 32, 3] and forward["classes"] == 100
    assert 2 * 11.0e6 < forward["flops_per_input"] < 2 * 12.6e6
    positive(forward["latency_ms_per_batch"], forward["images_per_s"])
    for key, dtype in (("zoo_train", "float32"), ("zoo_train-bfloat16", "bfloat16")):
        result = load(out, key)
        assert result["dtype"] == dtype and result["peak_flops_per_device"] == 1e12
        row = result["models"]["resnet8"]
        assert row["params"] == 83_892 and row["batch"] == 2 and row["dtype"] == dtype
        positive(row["step_ms"], row["images_per_s"], row["flops_per_step"], row["mfu"])
        assert 2.5 < row["flops_per_step"] / (2 * forward["flops_per_input"]) < 4
        assert row["images_per_s"] == pytest.approx(2e3 / row["step_ms"])
        assert row["achieved_flops_per_s"] == pytest.approx(row["flops_per_step"] / (row["step_ms"] / 1e3))
        assert row["mfu"] == pytest.approx(row["achieved_flops_per_s"] / 1e12)


def check_data_pipeline(out):
    result = load(out, "data_pipeline-c10")
    row = result["methods"]["kd"]
    positive(row["pipeline_median_s"], row["step_median_s"], row["pipeline_share"])
    assert row["pipeline_median_s"] == row["pipeline"]["median_s"]
    assert row["pipeline_share"] == pytest.approx(row["pipeline_median_s"] / row["step_median_s"])
    assert row["meets_target"] == (row["pipeline_share"] <= result["target_share"])


def check_edfm_latency(out):
    result = load(out, "edfm_latency-c10")
    costs, ratios = result["predictors"], result["ratios"]
    assert costs["edfm"]["velocity_evaluations"] == 13  # heun_exp, 7 steps: 2·6 + 1
    assert [costs[n]["num_members"] for n in ("edfm", "backbone", "teacher")] == [2, 1, 2]
    for cost in costs.values():
        positive(cost["latency_s"], cost["flops_per_batch"])
        assert cost["batch_size"] == 8 and cost["flops_exact_loops"]
    for key, suffix in (("latency_s", "latency"), ("flops_per_batch", "flops")):
        assert ratios[f"edfm_over_backbone_{suffix}"] == pytest.approx(
            costs["edfm"][key] / costs["backbone"][key])
        assert ratios[f"edfm_over_teacher_{suffix}"] == pytest.approx(
            costs["edfm"][key] / costs["teacher"][key])
    assert result["meets_target"] == (ratios["edfm_over_backbone_latency"] <= 1.5)
    # The ODE evaluates the head 13 times on top of the backbone: more FLOPs than the backbone.
    assert ratios["edfm_over_backbone_flops"] > 1


def check_memory(out):
    """Each method in its own process (the allocator's peak cannot be reset), XLA's buffers in MiB."""
    result = load(out, "memory-c10")
    assert result["isolated"] and result["unit"] == "MiB per device"
    assert list(result["steps"]) == ["sgd_swag", "edfm"]
    for row in result["steps"].values():
        xla = row["xla"]
        positive(xla["argument"], xla["output"], xla["temp"], xla["peak_estimate"])
        assert xla["peak_estimate"] == pytest.approx(
            xla["argument"] + xla["output"] - xla["alias"] + xla["temp"])
        assert row["device"] is None  # CPU: no allocator statistics


def check_teacher_ensemble(out):
    result = load(out, "teacher_ensemble")
    timings, speedups = result["timings"], result["speedup_vs_python_loop"]
    assert set(timings) == {"vmap", "lax_map", "python_loop"} and result["config"]["members"] == 2
    for name, timing in timings.items():
        positive(timing["median_s"])
        assert speedups[name] == pytest.approx(timings["python_loop"]["median_s"] / timing["median_s"])


@pytest.mark.slow
@pytest.mark.parametrize("method", common.METHODS)
def test_each_step_splits_its_work_over_the_devices(method):
    """On a data-parallel mesh each device computes its own rows of the batch: one device's
    compiled program does about half the FLOPs on 2 devices that it does on 1. The rest is work
    every device repeats, mostly drawing the teacher members, which XLA's compiled count
    inflates (utils/cost.py); a large batch (nothing runs, so it costs nothing) keeps it small.
    A loss whose per-example work XLA cannot keep with the batch's sharding, as GenDD's rows in
    the reference's order, comes out near 1."""
    import jax

    from utils.cost import compiled_flops
    from utils.trainer import make_mesh

    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    common.add_run_args(parser)
    args = parser.parse_args(["--depth", "8", "--width", "1", "--batch", "128", "--size", "32",
                              "--num_images", "128", "--num_teachers", "2"])

    def one_device_flops(num_devices):
        bench = common.build_step(method, args, mesh=make_mesh(jax.devices()[:num_devices]))
        return compiled_flops(common.compile_step(bench))

    assert one_device_flops(2) < 0.6 * one_device_flops(1)


def test_accelerator_suite_smoke_writes_every_benchmark(tmp_path, tmp_path_factory):
    """The GPU session's command with --smoke: every step ok, one summary line each, each JSON
    named <key>-cpu.json with its figures right, the summary and the README tables written, and
    no scratch left behind."""
    scratch = tmp_path_factory.mktemp("TMPDIR")
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(scratch))
    env.pop("OUT", None)
    proc = subprocess.run(["bash", os.path.join(BENCH, "accelerator_suite.sh"), "--smoke", "--out_dir",
                           str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    keys = [step.key for step in suite.smoke_steps()]
    assert {p.name for p in tmp_path.iterdir()} == {f"{k}-cpu.json" for k in keys} | {
        "suite-cpu.json", "tables-cpu.md"}
    for key in keys:
        assert f"[suite] {key:<26} ok" in proc.stdout
        result = load(tmp_path, key)
        assert result["benchmark"] == key and suite.check(result) == []
    summary = load(tmp_path, "suite")
    assert summary["smoke"] and [r["key"] for r in summary["steps"]] == keys
    assert all(r["status"] == "ok" and r["files"] == [str(tmp_path / f"{r['key']}-cpu.json")]
               for r in summary["steps"])
    check_throughput(tmp_path)
    check_zoo(tmp_path)
    check_data_pipeline(tmp_path)
    check_edfm_latency(tmp_path)
    check_memory(tmp_path)
    check_teacher_ensemble(tmp_path)
    check_gendd_step(tmp_path)
    tables = (tmp_path / "tables-cpu.md").read_text()
    assert f"Device: **{DEVICES} x CPU" in tables and "| c10 (ResNet-8×1) | float32 | kd | 8 |" in tables
    assert "| GenDD stage 2, c100 (resnet8 → resnet8) | float32 | gendd | 4 |" in tables
    assert list(scratch.iterdir()) == []


def test_suite_plan_covers_every_benchmark_and_fits_its_budget():
    """The GPU plan runs every benchmark (c10 and c100, float32 and bfloat16; ResNet-18/50 at
    224 trained and run) and the smoke every script with keys of that plan; the device in the
    file names; the warm-up and the time limit end what runs past them."""
    plan = {step.key: step for step in suite.accelerator_steps()}
    assert {f"throughput-{p}{d}" for p in ("c10", "c100") for d in ("", "-bfloat16")} <= set(plan)
    assert {"zoo_train", "zoo_train-bfloat16", "edfm_latency-c10", "data_pipeline-c10", "memory-c10",
            "memory-c10-bfloat16", "teacher_ensemble", "zoo", "streaming", "multiswag-c10-R10",
            "gendd_step"} <= set(plan)
    # The GPU targets first: a suite that runs out of budget loses the rest, not them.
    assert list(plan)[:5] == ["throughput-c10", "throughput-c10-bfloat16", "edfm_latency-c10", "data_pipeline-c10",
                              "multiswag-c10-R10"]
    assert "resnet18,resnet50" in plan["zoo_train"].argv and "--train" in plan["zoo_train"].argv
    assert suite.BUDGET_S < 8 * 60 and all(suite.MIN_STEP_S <= s.budget_s < suite.BUDGET_S for s in plan.values())
    smoke = suite.smoke_steps()
    assert {s.key for s in smoke} <= set(plan)
    assert {s.script for s in smoke} == {s.script for s in plan.values()} == {
        "throughput.py", "zoo.py", "edfm_latency.py", "data_pipeline.py", "memory.py", "teacher_ensemble.py",
        "streaming.py", "multiswag.py", "gendd_step.py"}
    # Every command line of the GPU plan (timed and warm-up) parses with its script's parser.
    class Parsed(Exception):
        pass

    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parse_args(parser, args, namespace)  # exits on a bad flag
        raise Parsed

    for step in plan.values():
        for argv in [step.argv, *step.warm]:
            module = __import__(step.script[:-len(".py")])
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
                patch.setattr(sys, "argv", [step.script, *argv])
                with pytest.raises(Parsed):
                    module.main() if step.script == "teacher_ensemble.py" else module.main(argv)
    assert suite.device_tag("1 x NVIDIA H200", "gpu") == "h200"
    assert suite.device_tag("8 x NVIDIA H100 80GB HBM3", "gpu") == "8xh100-80gb-hbm3"
    assert suite.device_tag("4 x CPU (2 cores, x86_64)", "cpu") == "cpu"
    # A step past its limit is ended, with its process group.
    rc, seconds = suite._run([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), 1)
    assert rc is None and seconds < 30


def test_suite_warm_up_runs_in_parallel_and_logs(tmp_path):
    step = suite.Step("teacher_ensemble", "teacher_ensemble.py", [], 1, warm=[["--help"], ["--help"]])
    out = suite.warm_up([step], dict(os.environ), sys.executable, jobs=2, budget_s=300, scratch=str(tmp_path))
    assert out["runs"] == 2 and out["ok"] == 2
    assert len(list(tmp_path.glob("warm-*-teacher_ensemble.log"))) == 2


def test_peak_flops_unknown_on_cpu_and_override():
    assert common.peak_flops("float32") == (None, "unknown for cpu: pass --peak_flops")
    assert common.peak_flops("bfloat16", 2e12) == (2e12, "--peak_flops")


# A stand-in for a checkout of the GenDD reference: its interfaces (model_dict, the networks'
# `is_feat` forward and `.fc`, DiffModel's stage-2 (loss, probe logits)) on tiny torch modules,
# each DiffModel forward counted in $CALLS.
FAKE_REFERENCE_MODELS = '''
import os
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body, self.fc = nn.Linear(3 * 32 * 32, 8), nn.Linear(8, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        feature = self.body(x.flatten(1))
        return ([feature], self.fc(feature)) if is_feat else self.fc(feature)


class DiffModel(nn.Module):
    def __init__(self, model, classifier, **flags):
        super().__init__()
        assert flags["diffusion_batch_mul"] == 30 and flags["stage"] == "stage-2", flags
        self.model, self.classifier = model, classifier

    def forward(self, x, y=None, target_feature=None):
        with open(os.environ["CALLS"], "a") as calls:
            calls.write("step\\n")
        feats, _ = self.model(x, is_feat=True)
        return ((feats[-1] - target_feature) ** 2).mean(), self.model.fc(feats[-1].detach())


model_dict = {"resnet110": Net, "resnet32": Net, "DiffModel": DiffModel}
'''


@pytest.fixture
def fake_reference(tmp_path, monkeypatch):
    root = tmp_path / "reference" / "GenDD_cifar"
    (root / "models").mkdir(parents=True)
    (root / "diffloss.py").write_text("")
    (root / "models" / "__init__.py").write_text(FAKE_REFERENCE_MODELS)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.txt"))
    return tmp_path


def test_gendd_reference_step_runs_the_checkouts_step_and_takes_turns(fake_reference):
    """gendd_reference_step.py runs the checkout's own step (warm-up + repeats of them); served,
    one step per request, as gendd_step.py's turns use it; a folder that is not a checkout, or
    the reference beside a smaller step, is refused in one line before any timing."""
    import gendd_step

    script = os.path.join(BENCH, "gendd_reference_step.py")
    reference, calls = fake_reference / "reference", fake_reference / "calls.txt"
    done = subprocess.run([sys.executable, script, "--reference", str(reference), "--pairs", "res110_res32",
                           "--repeats", "3", "--warmup", "1"], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)["res110_res32"]
    positive(result["step_s"])
    assert calls.read_text().count("step") == 4
    calls.unlink()
    served = gendd_step.ReferenceStep("res110_res32", str(reference))
    assert served.header["reference_commit"] == "unknown"  # not a git checkout
    positive(served.step(), served.step())
    served.close()
    assert calls.read_text().count("step") == 2
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "gendd_step.py"), "--reference",
                          str(fake_reference)], capture_output=True, text=True)
    assert bad.returncode != 0 and "not a checkout of the GenDD reference" in bad.stderr
    assert "JAX" not in bad.stdout  # refused before the timings
    # The reference runs its recipe: a smaller JAX step beside it would be no comparison.
    smaller = subprocess.run([sys.executable, os.path.join(BENCH, "gendd_step.py"), "--reference", str(reference),
                              "--batch", "4"], capture_output=True, text=True)
    assert smaller.returncode == 2 and "drop the size flags" in smaller.stderr and "JAX" not in smaller.stdout


def test_throughput_vs_commit_takes_turns_with_the_base_checkout(tmp_path):
    """bench/throughput_vs_commit.py runs throughput.py at the base commit (a git worktree,
    removed afterwards) and at this checkout, taking turns; speedup = base's median / this one's;
    a base that is no commit is refused in one line before anything runs."""
    import throughput_vs_commit

    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    worktrees = subprocess.run(["git", "-C", ROOT, "worktree", "list"], capture_output=True, text=True).stdout
    methods = throughput_vs_commit.main([
        "--base", "HEAD", "--rounds", "1", "--out_dir", str(tmp_path), "--", "--preset", "c10", *suite.SMOKE_TRAIN,
        *suite.SMOKE_TIMING, "--methods", "sgd_swag", "--skip_flops"])
    result = load(tmp_path, "throughput_vs_commit")
    assert result["base"] == result["this"] == head and result["rounds"] == 1 and list(methods) == ["sgd_swag"]
    row = result["methods"]["sgd_swag"]
    positive(row["base_median_s"], row["this_median_s"])
    assert row["base_runs_s"] == [row["base_median_s"]] and row["this_runs_s"] == [row["this_median_s"]]
    assert row["speedup"] == pytest.approx(row["base_median_s"] / row["this_median_s"])
    assert subprocess.run(["git", "-C", ROOT, "worktree", "list"], capture_output=True,
                          text=True).stdout == worktrees  # the base's worktree is gone
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "throughput_vs_commit.py"), "--base", "no-such-commit",
                          "--", "--preset", "c10"], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a commit of this repository" in bad.stderr.splitlines()[-1]


def test_tables_read_the_committed_cpu_results():
    """The tables come out of every committed bench/results/*-cpu.json, older files included
    (the GenDD rows of a file from before its runs named their networks name the recipe's)."""
    text = suite.tables(os.path.join(BENCH, "results"), "cpu")
    assert "| GenDD stage 2, c100 (resnet110 → resnet32) | float32 | gendd | 64 |" in text
    assert "| c10 (ResNet-32×2) | float32 | sgd_swag |" in text and "(b) EDFM latency" in text


def test_cpu_kernels_times_the_same_arithmetic_in_xla_and_pytorch(tmp_path):
    """bench/cpu_kernels.py: every kernel timed in its three builds, GFLOP/s and the XLA/PyTorch
    ratio from those times, and the builds' outputs equal (PyTorch's NCHW/OIHW laid out as
    JAX's); a malformed --convs is refused in one line."""
    import cpu_kernels

    cpu_kernels.main(["--batch", "2", "--convs", "8x4", "4x6", "--rows", "8", "--width", "16", "--repeats", "1",
                      "--warmup", "1", "--out", str(tmp_path)])
    result = load(tmp_path, "cpu_kernels")
    flops = {"conv 8x4 forward": 2 * 2 * 8 * 8 * 4 * 4 * 9, "conv 4x6 forward + gradients": 3 * 2 * 2 * 4 * 4 * 6 * 6 * 9,
             "dense 8x16x48 (modulation) forward": 2 * 8 * 16 * 48,
             "dense 8x16x16 (mlp) forward + gradients": 3 * 2 * 8 * 16 * 16}
    kernels = result["kernels"]
    assert len(kernels) == 2 * 2 + 3 and set(flops) <= set(kernels)
    for name, row in kernels.items():
        positive(row["xla_step_options_ms"], row["xla_defaults_ms"], row["torch_ms"])
        assert row["xla_over_torch"] == pytest.approx(row["xla_step_options_ms"] / row["torch_ms"])
        assert row["max_relative_difference"] < 1e-5, name
    for name, count in flops.items():
        for build in ("xla_step_options", "xla_defaults", "torch"):
            assert kernels[name][f"{build}_gflops"] == pytest.approx(count / kernels[name][f"{build}_ms"] / 1e6)
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "cpu_kernels.py"), "--convs", "32by16"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--convs takes HxC" in bad.stderr.splitlines()[-1]
