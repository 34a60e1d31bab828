"""The cost of a prediction: parameters, FLOPs per input (XLA cost analysis) and latency.

    flops = xla_flops(fn, *args)                    # one compiled call, loops unrolled
    timing = measure_latency(fn, *args, repeats=10) # seconds per call, after warm-up
    cost = predictor_cost(predictor, images_u8)     # all three for a utils.predict.Predictor

FLOPs come from XLA's own cost analysis of the compiled program
(`jax.jit(fn).lower(*args).compile().cost_analysis()`). XLA counts the body of a loop once,
whatever its trip count, so a `lax.map` over 12 ensemble members (how the teacher runs its
members on CPU) or a `lax.scan` over ODE steps would be undercounted 12x or 7x. `xla_flops`
therefore first unrolls every `scan` (fixed trip count) of the traced program into straight-line
code (`unroll_scans`) and compiles that; the result no longer depends on how the members or
steps are looped. A `while_loop` has no static trip count: its body stays counted once and the
result reports it (`dynamic_loops` > 0 means the count is a lower bound).

Latency is wall-clock time of one compiled call after warm-up, each call ended by
`block_until_ready`, summarised by the median of several repeats (spec §8: the reference timed
trace time [Q8]).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Call-like primitives whose body is inlined when unrolling: name -> the param holding it.
_CALL_BODIES = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
}
_DYNAMIC_LOOPS = ("while",)


@dataclasses.dataclass
class _UnrollStats:
    scans_unrolled: int = 0  # scan equations unrolled (each counted once, however nested)
    scans_kept: int = 0  # longer than max_unroll, or inside a while/cond: counted once by XLA
    dynamic_loops: int = 0  # while loops: counted once by XLA


def _eqn_context(eqn):
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None)
    return manager if manager is not None else contextlib.nullcontext()


def _body(param):
    """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
    if isinstance(param, jcore.ClosedJaxpr):
        return param.jaxpr, param.consts
    return param, ()


def _walk(jaxpr, max_unroll: int, stats: _UnrollStats, kept: bool = False):
    """Count the loops of `jaxpr` as `_eval_unrolled` will treat them (static, no tracing)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            unrolled = not kept and eqn.params["length"] <= max_unroll
            if unrolled:
                stats.scans_unrolled += 1
            else:
                stats.scans_kept += 1
            _walk(_body(eqn.params["jaxpr"])[0], max_unroll, stats, kept or not unrolled)
        elif name in _CALL_BODIES and _CALL_BODIES[name] in eqn.params:
            _walk(_body(eqn.params[_CALL_BODIES[name]])[0], max_unroll, stats, kept)
        else:
            if name in _DYNAMIC_LOOPS:
                stats.dynamic_loops += 1
            # other bodies (while, cond, ...) are bound as they are: their scans stay loops
            for sub in jcore.jaxprs_in_params(eqn.params):
                _walk(_body(sub)[0], max_unroll, stats, kept=True)


def _eval_unrolled(jaxpr, consts, args, max_unroll: int):
    env = {}

    def read(var):
        return var.val if isinstance(var, jcore.Literal) else env[var]

    def write(var, value):
        if not isinstance(var, jcore.DropVar):
            env[var] = value

    for var, value in zip(jaxpr.constvars, consts):
        write(var, value)
    for var, value in zip(jaxpr.invars, args):
        write(var, value)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "scan" and eqn.params["length"] <= max_unroll:
            outvals = _unrolled_scan(eqn.params, invals, max_unroll)
        elif name in _CALL_BODIES and _CALL_BODIES[name] in eqn.params:
            body, body_consts = _body(eqn.params[_CALL_BODIES[name]])
            outvals = _eval_unrolled(body, body_consts, invals, max_unroll)
        else:
            bind = eqn.primitive.get_bind_params(eqn.params)
            # jax >= 0.7 returns the params; older versions (subfuns, params)
            subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
            with _eqn_context(eqn):
                outvals = eqn.primitive.bind(*subfuns, *invals, **params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for var, value in zip(eqn.outvars, outvals):
            write(var, value)
    return [read(v) for v in jaxpr.outvars]


def _unrolled_scan(params, invals, max_unroll):
    body, body_consts = _body(params["jaxpr"])
    num_consts, num_carry, length = params["num_consts"], params["num_carry"], params["length"]
    consts, carry = invals[:num_consts], list(invals[num_consts:num_consts + num_carry])
    xs = invals[num_consts + num_carry:]
    steps = range(length - 1, -1, -1) if params["reverse"] else range(length)
    ys = []
    for i in steps:
        out = _eval_unrolled(body, body_consts, [*consts, *carry, *(x[i] for x in xs)],
                             max_unroll)
        carry, y = out[:num_carry], out[num_carry:]
        ys.append(y)
    if params["reverse"]:
        ys = ys[::-1]
    y_avals = [v.aval for v in body.outvars[num_carry:]]
    stacked = [jnp.stack([y[j] for y in ys]) if ys else jnp.zeros((0, *a.shape), a.dtype)
               for j, a in enumerate(y_avals)]
    return [*carry, *stacked]


def unroll_scans(fn: Callable, *example_args, max_unroll: int = 256):
    """`fn` as straight-line code: (unrolled_fn, stats), traced at `example_args`.

    Every `lax.scan` (hence `lax.map`, `fori_loop` with static bounds) of length <= max_unroll is
    replaced by its iterations one after another, inside nested jits and custom-derivative
    calls too. Numerically the same function; only for counting, not for running fast.
    """
    closed = jax.make_jaxpr(fn)(*example_args)
    out_tree = jax.tree.structure(jax.eval_shape(fn, *example_args))
    stats = _UnrollStats()
    _walk(closed.jaxpr, max_unroll, stats)

    def unrolled(*args):
        out = _eval_unrolled(closed.jaxpr, closed.consts, jax.tree.leaves(args), max_unroll)
        return jax.tree.unflatten(out_tree, out)

    return unrolled, stats


def _sum_cost(analysis, key: str) -> float:
    """cost_analysis() is a dict in current jax, a list of per-program dicts in older ones."""
    if analysis is None:
        return float("nan")
    parts = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    values = [float(p[key]) for p in parts if p and key in p]
    return float(sum(values)) if values else float("nan")


@dataclasses.dataclass
class FlopCount:
    flops: float  # floating-point operations of one call
    bytes_accessed: float
    scans_unrolled: int
    scans_kept: int
    dynamic_loops: int

    @property
    def exact_loops(self) -> bool:
        """False when some loop body was counted once only (the FLOPs are a lower bound)."""
        return self.scans_kept == 0 and self.dynamic_loops == 0


def _count(analysis, stats: _UnrollStats) -> FlopCount:
    return FlopCount(_sum_cost(analysis, "flops"), _sum_cost(analysis, "bytes accessed"),
                     stats.scans_unrolled, stats.scans_kept, stats.dynamic_loops)


def xla_flops(fn: Callable, *args, unroll: bool = True, max_unroll: int = 256) -> FlopCount:
    """FLOPs of one call of `fn(*args)` from XLA's cost analysis of the compiled program."""
    stats = _UnrollStats()
    if unroll:
        fn, stats = unroll_scans(fn, *args, max_unroll=max_unroll)
    return _count(jax.jit(fn).lower(*args).compile().cost_analysis(), stats)


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
        return predictor.member_logits(args, images.astype(jnp.float32) / 255.0, key)

    out = {"num_params": int(predictor.num_params), "num_members": int(predictor.num_members),
           "batch_size": batch_size}
    # One compile serves both the timing and, when the program has no loop to unroll, the count.
    compiled = jax.jit(call).lower(args, images, key).compile()
    if flops:
        unrolled, stats = unroll_scans(call, args, images, key)
        analysis = (compiled.cost_analysis() if stats.scans_unrolled == 0
                    else jax.jit(unrolled).lower(args, images, key).compile().cost_analysis())
        count = _count(analysis, stats)
        out.update(flops_per_input=count.flops / batch_size, flops_per_batch=count.flops,
                   flops_exact_loops=count.exact_loops, scans_unrolled=count.scans_unrolled,
                   dynamic_loops=count.dynamic_loops + count.scans_kept)
    timing = measure_latency(compiled, args, images, key, warmup=warmup, repeats=repeats, jit=False)
    out.update(latency_s=timing["median_s"], latency_per_input_s=timing["median_s"] / batch_size,
               latency_min_s=timing["min_s"],
               latency_max_s=timing["max_s"], latency_repeats=timing["repeats"],
               latency_device=str(device))
    return out
