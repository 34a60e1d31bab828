"""The benchmarks of bench/ at the tiniest sizes (ResNet-8x1, 16x16 images, batch 8 over the 4
simulated devices, 1 timed call): each main() runs, writes its JSON into a temporary directory,
and reports finite positive figures whose ratios are the quotients of the reported medians."""
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import common  # noqa: E402

SIZES = ["--depth", "8", "--width", "1", "--batch", "8", "--size", "16", "--teacher_runs", "2"]
TRAIN_SIZES = SIZES + ["--num_images", "16", "--num_teachers", "1"]
TIMING = ["--repeats", "1", "--warmup", "1"]


def run(module, argv, tmp_path, name):
    __import__(module).main([*argv, "--out_dir", str(tmp_path)])
    path = tmp_path / f"{name}-c10-cpu.json"  # the default preset, float32
    with open(path) as f:
        return json.load(f)


def positive(*values):
    for value in values:
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, value


@pytest.mark.slow
def test_throughput_reports_steps_flops_and_mfu(tmp_path):
    """sgd_swag and KD here; the EDFM step is built and compiled by the memory test."""
    out = run("throughput", TRAIN_SIZES + TIMING + ["--peak_flops", "1e12", "--methods", "sgd_swag",
                                                    "kd"], tmp_path, "throughput")
    assert out["benchmark"] == "throughput-c10" and out["peak_flops_per_device"] == 1e12
    assert list(out["steps"]) == ["sgd_swag", "kd"]
    first = out["steps"]["sgd_swag"]["median_s"]
    for row in out["steps"].values():
        positive(row["median_s"], row["images_per_s"], row["flops_per_step"],
                 row["achieved_flops_per_s"], row["mfu"])
        assert row["batch"] == 8 and row["devices"] == 4 and len(row["times_s"]) == 1
        assert row["images_per_s"] == pytest.approx(8 / row["median_s"])
        assert row["flops_per_step"] == pytest.approx(4 * row["flops_per_device_step"])
        assert row["achieved_flops_per_s"] == pytest.approx(row["flops_per_step"] / row["median_s"])
        assert row["mfu"] == pytest.approx(row["achieved_flops_per_s"] / (4 * 1e12))
        assert row["relative_step_time"] == pytest.approx(row["median_s"] / first)
    # KD adds the augmentation and a teacher forward to the student's forward and backward.
    assert out["steps"]["kd"]["flops_per_step"] > out["steps"]["sgd_swag"]["flops_per_step"]


def test_peak_flops_unknown_on_cpu_and_override():
    assert common.peak_flops("float32") == (None, "unknown for cpu: pass --peak_flops")
    assert common.peak_flops("bfloat16", 2e12) == (2e12, "--peak_flops")


@pytest.mark.slow
def test_data_pipeline_share_is_pipeline_over_step(tmp_path):
    out = run("data_pipeline", TRAIN_SIZES + TIMING, tmp_path, "data_pipeline")
    row = out["methods"]["kd"]
    positive(row["pipeline_median_s"], row["step_median_s"], row["pipeline_share"])
    assert row["pipeline_median_s"] == row["pipeline"]["median_s"]
    assert row["pipeline_share"] == pytest.approx(row["pipeline_median_s"] / row["step_median_s"])
    assert row["meets_target"] == (row["pipeline_share"] <= out["target_share"])


@pytest.mark.slow
def test_edfm_latency_ratios_are_quotients_of_the_medians(tmp_path):
    out = run("edfm_latency", SIZES + TIMING + ["--members", "2", "--teacher_members", "2"], tmp_path,
              "edfm_latency")
    costs, ratios = out["predictors"], out["ratios"]
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
    assert out["meets_target"] == (ratios["edfm_over_backbone_latency"] <= 1.5)
    # The ODE evaluates the head 13 times on top of the backbone: more FLOPs than the backbone.
    assert ratios["edfm_over_backbone_flops"] > 1


@pytest.mark.slow
def test_memory_reports_xla_buffers_in_mib(tmp_path):
    out = run("memory", TRAIN_SIZES + ["--methods", "edfm"], tmp_path, "memory")
    row = out["steps"]["edfm"]
    xla = row["xla"]
    positive(xla["argument"], xla["output"], xla["temp"], xla["peak_estimate"])
    assert xla["peak_estimate"] == pytest.approx(
        xla["argument"] + xla["output"] - xla["alias"] + xla["temp"])
    assert row["device"] is None  # CPU: no allocator statistics
    assert not out["isolated"] and out["unit"] == "MiB per device"


def test_zoo_reports_params_flops_and_latency(tmp_path):
    """bench/zoo.py at batch 2: resnet8's parameters are RepDistiller's (100 classes), its FLOPs
    about twice its multiply-adds (12.5M per 32x32 input; XLA skips the zero padding's, so a
    little less), its speed positive."""
    __import__("zoo").main(["--models", "resnet8", "--batch", "2", *TIMING, "--out_dir", str(tmp_path)])
    with open(tmp_path / "zoo-cpu.json") as f:
        row = json.load(f)["models"]["resnet8"]
    assert row["params"] == 83_892 and row["input"] == [32, 32, 3] and row["classes"] == 100
    assert 2 * 11.0e6 < row["flops_per_input"] < 2 * 12.6e6
    positive(row["latency_ms_per_batch"], row["images_per_s"])
