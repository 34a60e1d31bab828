"""The cost of a prediction: parameters, FLOPs per input (XLA cost analysis) and latency.

    flops = xla_flops(fn, *args)                    # one call, every loop iteration counted
    timing = measure_latency(fn, *args, repeats=10) # seconds per call, after warm-up
    cost = predictor_cost(predictor, images_u8)     # all three for a utils.predict.Predictor

FLOPs come from XLA's cost analysis of the program as jax lowers it, before XLA optimises it
(`jax.jit(fn).lower(*args).cost_analysis()`): the arithmetic the program asks for, at its global
shapes when it is sharded over several devices (the usual basis of MFU). Not the compiled
program's count: XLA's fusion copies a cheap producer into each consumer, and its cost analysis
then counts the producer's whole shape once per consumer (one normal draw cut into a network's
100 parameter leaves counted 48x; a SWAG teacher member's draw 14 GFLOP instead of 0.15
at ResNet-32x2), though the compiled code computes each element once.

XLA counts the body of a loop once, whatever its trip count, so a `lax.map` over 12 ensemble
members (how the teacher runs its members on CPU) or a `lax.scan` over 100 sampling steps would
be undercounted 12x or 100x. `xla_flops` therefore lowers each `scan` body of the traced program
on its own and adds (trip count x body) - (the copies XLA already counted), recursively for
nested scans. A `while_loop` has no static trip count: its body stays counted once and the
result reports it (`dynamic_loops` > 0 means the count is a lower bound).

Latency is wall-clock time of one compiled call after warm-up, each call ended by
`block_until_ready`, summarised by the median of several repeats (spec §8: the reference timed
trace time [Q8]).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import numpy as np
from jax.extend import core as jcore

from data.augment import eval_images

# Call-like primitives whose body runs once per call: name -> the param holding it.
_CALL_BODIES = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
}
_DYNAMIC_LOOPS = ("while",)


@dataclasses.dataclass
class FlopCount:
    flops: float  # floating-point operations of one call
    bytes_accessed: float  # before fusion: every operation's inputs and outputs
    scans_counted: int = 0  # scans whose body was counted trip-count times
    scans_kept: int = 0  # scans inside a while/cond: their body counted once, as XLA does
    dynamic_loops: int = 0  # while loops: body counted once

    @property
    def exact_loops(self) -> bool:
        """False when some loop body was counted once only (the FLOPs are a lower bound)."""
        return self.scans_kept == 0 and self.dynamic_loops == 0


def _sum_cost(analysis, key: str) -> float:
    """cost_analysis() is a dict in current jax, a list of per-program dicts in older ones."""
    if analysis is None:
        return float("nan")
    parts = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    values = [float(p[key]) for p in parts if p and key in p]
    return float(sum(values)) if values else float("nan")


def compiled_flops(compiled) -> float:
    """XLA's count of a compiled program: one device's part when it is sharded, so comparing it
    on one device and on two shows work every device repeats. Fusion inflates it (see above)."""
    return _sum_cost(compiled.cost_analysis(), "flops")


def _xla_count(lowered) -> FlopCount:
    analysis = lowered.cost_analysis()
    return FlopCount(_sum_cost(analysis, "flops"), _sum_cost(analysis, "bytes accessed"))


def _lower_body(closed: jcore.ClosedJaxpr):
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.jit(jcore.jaxpr_as_fun(closed)).lower(*args)


def _closed(param) -> jcore.ClosedJaxpr:
    return param if isinstance(param, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(param, ())


def _scans(jaxpr, count: FlopCount):
    """The scans of `jaxpr` that run a static number of times (through calls, not loops);
    counts into `count` the loops whose bodies stay counted once."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            yield eqn
        elif name in _CALL_BODIES and _CALL_BODIES[name] in eqn.params:
            yield from _scans(_closed(eqn.params[_CALL_BODIES[name]]).jaxpr, count)
        else:
            count.dynamic_loops += name in _DYNAMIC_LOOPS
            for sub in jcore.jaxprs_in_params(eqn.params):  # while, cond: bodies counted once
                _count_kept(_closed(sub).jaxpr, count)


def _count_kept(jaxpr, count: FlopCount):
    for eqn in jaxpr.eqns:
        count.scans_kept += eqn.primitive.name == "scan"
        count.dynamic_loops += eqn.primitive.name in _DYNAMIC_LOOPS
        for sub in jcore.jaxprs_in_params(eqn.params):
            _count_kept(_closed(sub).jaxpr, count)


def _copies_counted_by_xla(length: int, unroll: int) -> int:
    """How many copies of a scan body XLA's count of the program holds (jax lowers a scan
    with unroll k to a loop of k copies plus length % k copies after it; 0: fully unrolled)."""
    if unroll == 0:
        return length
    trips, remainder = divmod(length, unroll)
    return (unroll if trips else 0) + remainder


def _add_loop_iterations(jaxpr, count: FlopCount) -> FlopCount:
    """`count` (XLA's count of `jaxpr`) with every scan body counted trip-count times."""
    for eqn in _scans(jaxpr, count):
        body = _closed(eqn.params["jaxpr"])
        body_once = _xla_count(_lower_body(body))
        body_all = _add_loop_iterations(body.jaxpr, dataclasses.replace(body_once))
        length = eqn.params["length"]
        copies = _copies_counted_by_xla(length, int(eqn.params.get("unroll", 1)))
        count.flops += length * body_all.flops - copies * body_once.flops
        count.bytes_accessed += length * body_all.bytes_accessed - copies * body_once.bytes_accessed
        count.scans_counted += 1 + body_all.scans_counted
        count.scans_kept += body_all.scans_kept
        count.dynamic_loops += body_all.dynamic_loops
    return count


def xla_flops(fn: Callable, *args, count_loops: bool = True) -> FlopCount:
    """FLOPs of one call of `fn(*args)` from XLA's cost analysis of the lowered program (all
    devices together when it is sharded), each scan's body counted as many times as it runs
    (`count_loops=False`: what XLA alone says). Lowering compiles nothing."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)  # never a jit nested in a jit (see below)
    count = _xla_count(jitted.lower(*args))
    if not count_loops:
        return count
    # A jitted fn is traced at the top level (its own .trace): make_jaxpr would nest it, which
    # jit-level compiler_options (the trainer's steps on the CPU) do not allow.
    traced = jitted.trace(*args).jaxpr
    return _add_loop_iterations(traced.jaxpr, count)


def measure_latency(fn: Callable, *args, warmup: int = 2, repeats: int = 10,
                    jit: bool = True) -> dict:
    """Seconds per call of the jitted `fn(*args)`: compile, `warmup` untimed calls, then
    `repeats` timed calls, each ended by `block_until_ready`. Returns median, min, max, all.
    `jit=False`: `fn` is already compiled (e.g. `jax.jit(f).lower(...).compile()`)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    jitted = jax.jit(fn) if jit else fn
    for _ in range(max(1, warmup)):  # at least one: the first call compiles
        jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats, "warmup": max(1, warmup), "times_s": times}


def predictor_cost(predictor, images_u8: np.ndarray, *, key=None, repeats: int = 10,
                   warmup: int = 2, device=None, flops: bool = True) -> dict:
    """Parameters, FLOPs per input and latency per batch of a `utils.predict.Predictor`.

    images_u8: one batch [B, H, W, C] uint8 (the batch whose latency is reported). The timed and
    counted function is the prediction itself, `member_logits(args, images / 255, key)`, on one
    device, with the parameters and the batch already there.
    """
    device = device or jax.devices()[0]
    key = jax.random.PRNGKey(0) if key is None else key
    args, images, key = jax.device_put((predictor.args, np.asarray(images_u8), key), device)
    batch_size = int(images.shape[0])

    def call(args, images, key):
        return predictor.member_logits(args, eval_images(images), key)

    out = {"num_params": int(predictor.num_params), "num_members": int(predictor.num_members),
           "batch_size": batch_size}
    compiled = jax.jit(call).lower(args, images, key).compile()
    if flops:
        count = xla_flops(call, args, images, key)
        out.update(flops_per_input=count.flops / batch_size, flops_per_batch=count.flops,
                   flops_exact_loops=count.exact_loops, scans_counted=count.scans_counted,
                   dynamic_loops=count.dynamic_loops + count.scans_kept)
    timing = measure_latency(compiled, args, images, key, warmup=warmup, repeats=repeats, jit=False)
    out.update(latency_s=timing["median_s"], latency_per_input_s=timing["median_s"] / batch_size,
               latency_min_s=timing["min_s"],
               latency_max_s=timing["max_s"], latency_repeats=timing["repeats"],
               latency_device=str(device))
    return out
