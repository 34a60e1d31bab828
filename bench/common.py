"""Shared by the benchmarks: the repository on sys.path, the device in words, JSON results.

Timing and FLOPs come from utils/cost.py (measure_latency: warm-up, block_until_ready,
medians; xla_flops: XLA cost analysis), the same code evaluate.py reports with."""
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402


def device_description() -> str:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    if device.platform == "cpu":
        kind = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{len(jax.devices())} x {kind}"


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
