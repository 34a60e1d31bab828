"""Timing helpers for benchmarks: warm-up, block_until_ready, medians; JSON results."""
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402


def time_call(fn, *args, warmup: int = 2, repeats: int = 10) -> dict:
    """Median (and spread) of the wall time of fn(*args) after warm-up, blocking on the result."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats}


def device_description() -> str:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    if device.platform == "cpu":
        kind = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{len(jax.devices())} x {kind}"


def flops_of(jitted, *args) -> float | None:
    """FLOPs of one call from XLA's cost analysis of the compiled program."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0)) or None if analysis else None


def save(name: str, results: dict) -> str:
    results = {"benchmark": name, "device": device_description(), "jax": jax.__version__, **results}
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    platform_tag = jax.devices()[0].platform
    path = os.path.join(out_dir, f"{name}-{platform_tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return path
