"""Flow matching on the straight noise-to-data path: path, time sampler, loss, ODE solvers.

Conventions (spec `edfm_methods.md` section 7):

* time runs from t = 0 (noise, x_0 = noise_std * xi) to t = 1 (data x_1);
* the path is x_t = t * x_1 + (1 - t) * noise_std * xi, with velocity u_t = x_1 - noise_std * xi;
* a vector field is passed around as a closure `velocity_fn(x, t) -> v` with x of shape
  [B, ...]; the loss calls it with t of shape [B], the solvers with a scalar t (0-d array),
  so the closure must broadcast (models.vector_field.AdaLNMLP does).

Every solver is a pure JAX function (lax.scan over a static grid, or lax.while_loop for
the adaptive one), so it can be jitted together with the network that `velocity_fn` closes
over. Methods of `solve` / `sample`:

  "heun_exp"  the reference sampler: exponential grid t_i = (1 - a^i) / (1 - a^S),
              Heun on steps 0..S-2, Euler on the last step; 2(S-1)+1 evaluations,
              v is never evaluated at t = 1.
  "heun"      Heun (explicit trapezoid) on every step of a uniform grid; 2S evaluations.
  "euler"     Euler on a uniform grid; S evaluations.
  "midpoint"  explicit midpoint on a uniform grid; 2S evaluations.
  "adaptive"  embedded Runge-Kutta with error control (Dormand-Prince 5(4) by default,
              Bogacki-Shampine 3(2) as "bosh3"); the number of evaluations is dynamic.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = Any
VelocityFn = Callable[[Array, Array], Array]

FIXED_METHODS = ("heun_exp", "heun", "euler", "midpoint")
METHODS = FIXED_METHODS + ("adaptive",)


# ---------------------------------------------------------------------------------------
# Path and target
# ---------------------------------------------------------------------------------------
def _per_row(t: Array, like: Array) -> Array:
    """Reshape a per-row time [B] (or a scalar) to broadcast against `like` [B, ...]."""
    t = jnp.asarray(t, dtype=like.dtype)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def sample_path(x1: Array, noise: Array, t: Array, noise_std: float) -> Array:
    """x_t = t * x1 + (1 - t) * noise_std * noise, with t of shape [B] or scalar."""
    t = _per_row(t, x1)
    return t * x1 + (1.0 - t) * noise_std * noise


def path_velocity(x1: Array, noise: Array, noise_std: float) -> Array:
    """Velocity of the straight path, d x_t / dt = x1 - noise_std * noise (exact form)."""
    return x1 - noise_std * noise


def target_velocity(x1: Array, x_t: Array, t: Array) -> Array:
    """Conditional target velocity u_t = (x1 - x_t) / (1 - t) = x1 - noise_std * noise.

    Defined for t < 1. `flow_matching_loss` uses the algebraically equal `path_velocity`,
    which does not amplify rounding error as t -> 1.
    """
    t = _per_row(t, x1)
    return (x1 - x_t) / (1.0 - t)


# ---------------------------------------------------------------------------------------
# Time sampling and loss
# ---------------------------------------------------------------------------------------
def sample_time(key: Array, shape: Sequence[int] = (), exp_base: float = 3.0,
                trunc: float = 1e-3, dtype: Any = jnp.float32) -> Array:
    """Training times with density proportional to exp_base^t on [0, 1 - trunc).

    Inverse CDF: t = log_b(1 + (b^(1 - trunc) - 1) u), u ~ U[0, 1). For b = 3 and
    trunc = 1e-3: E[t] ~ 0.589, P(t < 0.5) ~ 0.366. exp_base = 1 gives U[0, 1 - trunc).
    """
    if exp_base <= 0:
        raise ValueError(f"exp_base must be positive, got {exp_base}")
    if not 0.0 <= trunc < 1.0:
        raise ValueError(f"trunc must be in [0, 1), got {trunc}")
    u = jax.random.uniform(key, tuple(shape), dtype=dtype)
    t_max = 1.0 - trunc
    if exp_base == 1.0:
        t = t_max * u
    else:
        log_b = float(np.log(exp_base))
        scale = float(np.expm1(log_b * t_max))  # b^(1 - trunc) - 1
        t = jnp.log1p(scale * u) / log_b
    # float rounding must not reach the truncation point itself
    upper = jnp.nextafter(jnp.asarray(t_max, dtype=dtype), jnp.asarray(0.0, dtype=dtype))
    return jnp.clip(t, 0.0, upper)


def flow_matching_loss(velocity_fn: VelocityFn, key: Array, x1: Array, noise_std: float,
                       exp_base: float = 3.0, trunc: float = 1e-3, power: float = 2.0,
                       mask: Optional[Array] = None, target: str = "difference") -> Array:
    """EDFM flow-matching loss (spec section 7, steps 4-8).

    key is split into (time, noise); t ~ sample_time(exp_base, trunc) per row;
    x_t = t x1 + (1 - t) noise_std xi; the target velocity u = (x1 - x_t) / (1 - t) as the
    reference computes it (`target="difference"`), or its closed form x1 - noise_std xi
    (`"closed_form"`: equal in exact arithmetic; in float32 the difference's rounding is
    amplified by 1 / (1 - t), up to 1000x at t = 0.999);
    loss = masked mean over rows of sum over features of |velocity_fn(x_t, t) - u|^power.

    Args:
      velocity_fn: closure (x_t [B, ...], t [B]) -> v [B, ...] around the network.
      key: PRNG key for this loss (the "flow" key).
      x1: targets [B, ...] (e.g. centred teacher logits).
      mask: optional [B] boolean/float row weights (padded rows 0). The loss is
        sum(mask * row_loss) / sum(mask), and 0 when the mask is all zero.
    """
    t_key, noise_key = jax.random.split(key)
    batch = x1.shape[0]
    t = sample_time(t_key, (batch,), exp_base, trunc, dtype=x1.dtype)
    noise = jax.random.normal(noise_key, x1.shape, dtype=x1.dtype)
    x_t = sample_path(x1, noise, t, noise_std)
    if target == "closed_form":
        u = path_velocity(x1, noise, noise_std)
    elif target == "difference":
        u = (x1 - x_t) / (1.0 - t).reshape((batch,) + (1,) * (x1.ndim - 1))
    else:
        raise ValueError(f"target must be difference or closed_form, got {target!r}")
    diff = velocity_fn(x_t, t) - u
    per_elem = diff * diff if power == 2 else jnp.abs(diff) ** power
    per_row = per_elem.reshape(batch, -1).sum(axis=-1)
    if mask is None:
        return per_row.mean()
    w = jnp.asarray(mask, dtype=per_row.dtype).reshape(batch)
    total = w.sum()
    return jnp.where(total > 0, (w * per_row).sum() / jnp.where(total > 0, total, 1.0), 0.0)


# ---------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------
def exponential_time_grid(num_steps: int, base: float = 0.5) -> np.ndarray:
    """t_i = (1 - base^i) / (1 - base^S), i = 0..S: S + 1 points from 0 to 1.

    base < 1 packs the points towards t = 1; base = 1 is the uniform grid.
    S = 7, base = 0.5: [0, .50394, .75591, .88189, .94488, .97638, .99213, 1].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if base <= 0:
        raise ValueError(f"base must be positive, got {base}")
    if base == 1.0:
        return uniform_time_grid(num_steps)
    i = np.arange(num_steps + 1, dtype=np.float64)
    grid = (1.0 - base ** i) / (1.0 - base ** num_steps)
    grid[-1] = 1.0
    return grid


def uniform_time_grid(num_steps: int, t0: float = 0.0, t1: float = 1.0) -> np.ndarray:
    """S + 1 equally spaced points from t0 to t1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return np.linspace(t0, t1, num_steps + 1, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Fixed-grid solvers
# ---------------------------------------------------------------------------------------
def _intervals(grid: Array, dtype: Any) -> Tuple[Array, Array]:
    grid = jnp.asarray(grid, dtype=dtype)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"a time grid needs at least 2 points, got shape {grid.shape}")
    return grid[:-1], grid[1:]


def _euler_step(velocity_fn: VelocityFn, x: Array, t: Array, t_next: Array) -> Array:
    return x + (t_next - t) * velocity_fn(x, t)


def _heun_step(velocity_fn: VelocityFn, x: Array, t: Array, t_next: Array) -> Array:
    h = t_next - t
    d1 = velocity_fn(x, t)
    d2 = velocity_fn(x + h * d1, t_next)
    return x + 0.5 * h * (d1 + d2)


def _midpoint_step(velocity_fn: VelocityFn, x: Array, t: Array, t_next: Array) -> Array:
    h = t_next - t
    d1 = velocity_fn(x, t)
    return x + h * velocity_fn(x + 0.5 * h * d1, t + 0.5 * h)


def _scan_steps(step, velocity_fn: VelocityFn, x0: Array, t_from: Array, t_to: Array
                ) -> Array:
    def body(x, ts):
        return step(velocity_fn, x, ts[0], ts[1]), None

    x, _ = lax.scan(body, x0, (t_from, t_to))
    return x


def euler_solve(velocity_fn: VelocityFn, x0: Array, grid: Array) -> Array:
    """Explicit Euler over the grid (S = len(grid) - 1 evaluations)."""
    t_from, t_to = _intervals(grid, x0.dtype)
    return _scan_steps(_euler_step, velocity_fn, x0, t_from, t_to)


def midpoint_solve(velocity_fn: VelocityFn, x0: Array, grid: Array) -> Array:
    """Explicit midpoint (RK2) over the grid (2S evaluations)."""
    t_from, t_to = _intervals(grid, x0.dtype)
    return _scan_steps(_midpoint_step, velocity_fn, x0, t_from, t_to)


def heun_solve(velocity_fn: VelocityFn, x0: Array, grid: Array, final_euler: bool = True
               ) -> Array:
    """Heun (explicit trapezoid) over the grid.

    final_euler=True (the EDFM reference): Heun on steps 0..S-2 and Euler on the last
    step, 2(S-1)+1 evaluations, v never evaluated at the last grid point.
    final_euler=False: Heun on every step, 2S evaluations.
    """
    t_from, t_to = _intervals(grid, x0.dtype)
    if not final_euler:
        return _scan_steps(_heun_step, velocity_fn, x0, t_from, t_to)
    x = x0
    if t_from.shape[0] > 1:
        x = _scan_steps(_heun_step, velocity_fn, x, t_from[:-1], t_to[:-1])
    return _euler_step(velocity_fn, x, t_from[-1], t_to[-1])


# ---------------------------------------------------------------------------------------
# Adaptive embedded Runge-Kutta
# ---------------------------------------------------------------------------------------
class ButcherTableau(NamedTuple):
    """Explicit embedded RK pair; the last stage is FSAL (evaluated at t + h, x_new)."""
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]   # a[i] has i entries (stage i uses stages 0..i-1)
    b: Tuple[float, ...]               # solution weights (higher order, propagated)
    b_err: Tuple[float, ...]           # b - b_low: weights of the error estimate
    order: int                         # order of the lower-order (error) solution + 1


def _make_tableau(c, a, b, b_low, order) -> ButcherTableau:
    return ButcherTableau(tuple(c), tuple(tuple(r) for r in a), tuple(b),
                          tuple(x - y for x, y in zip(b, b_low)), order)


DOPRI5 = _make_tableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=((),
       (1 / 5,),
       (3 / 40, 9 / 40),
       (44 / 45, -56 / 15, 32 / 9),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
       (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100,
           1 / 40),
    order=5)

BOSH3 = _make_tableau(
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
    order=3)

TABLEAUS = {"dopri5": DOPRI5, "bosh3": BOSH3}


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def adaptive_solve(velocity_fn: VelocityFn, x0: Array, t0: float = 0.0, t1: float = 1.0,
                   rtol: float = 1e-5, atol: float = 1e-5, scheme: str = "dopri5",
                   first_step: Optional[float] = None, max_steps: int = 1000,
                   safety: float = 0.9, min_factor: float = 0.2, max_factor: float = 10.0
                   ) -> Tuple[Array, Array]:
    """Integrate dx/dt = velocity_fn(x, t) from t0 to t1 > t0 with error control.

    Embedded RK pair (`scheme`: "dopri5" = Dormand-Prince 5(4), "bosh3" =
    Bogacki-Shampine 3(2)), FSAL, local extrapolation. A step is accepted when the RMS
    over all elements of err / (atol + rtol * max(|x|, |x_new|)) is <= 1; the next step
    is h * clip(safety * err^(-1/order), min_factor, max_factor) (no growth right after a
    rejection). Without `first_step` the initial step follows Hairer, Norsett & Wanner
    (one extra evaluation). The last step is clipped to land exactly on t1, so the
    final stage evaluates v at t1.

    Returns (x at t1, number of velocity evaluations as an int32 scalar). If t1 is not
    reached within `max_steps` attempted steps, or the step size underflows, the
    returned state is all NaN so that the failure cannot go unnoticed.
    """
    if scheme not in TABLEAUS:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(TABLEAUS)}")
    if not t1 > t0:
        raise ValueError(f"adaptive_solve integrates forward: need t1 > t0, got {t0}, {t1}")
    tab = TABLEAUS[scheme]
    dtype = x0.dtype
    t0 = jnp.asarray(t0, dtype)
    t1 = jnp.asarray(t1, dtype)
    span = t1 - t0

    def scaled_norm(v, x_a, x_b):
        return _rms(v / (atol + rtol * jnp.maximum(jnp.abs(x_a), jnp.abs(x_b))))

    f0 = velocity_fn(x0, t0)
    nfe = jnp.asarray(1, jnp.int32)
    if first_step is None:
        d0 = scaled_norm(x0, x0, x0)
        d1 = scaled_norm(f0, x0, x0)
        h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), jnp.asarray(1e-6, dtype), 0.01 * d0 / d1)
        h0 = jnp.minimum(h0, span)
        f1 = velocity_fn(x0 + h0 * f0, t0 + h0)
        nfe = nfe + 1
        d2 = scaled_norm(f1 - f0, x0, x0) / h0
        dmax = jnp.maximum(d1, d2)
        h1 = jnp.where(dmax <= 1e-15, jnp.maximum(jnp.asarray(1e-6, dtype), h0 * 1e-3),
                       (0.01 / jnp.maximum(dmax, 1e-15)) ** (1.0 / tab.order))
        h = jnp.minimum(100 * h0, h1)
    else:
        h = jnp.asarray(first_step, dtype)
    h = jnp.clip(h, jnp.finfo(dtype).eps * 16, span)

    n_stages = len(tab.c)
    exponent = -1.0 / tab.order
    tiny = jnp.finfo(dtype).eps * 4 * jnp.maximum(jnp.abs(t1), 1.0)

    def attempt(t, h, x, k_first):
        ks = [k_first]
        for i in range(1, n_stages - 1):
            xi = x + h * sum(a * k for a, k in zip(tab.a[i], ks) if a != 0.0)
            ks.append(velocity_fn(xi, t + tab.c[i] * h))
        x_new = x + h * sum(b * k for b, k in zip(tab.b, ks) if b != 0.0)
        k_last = velocity_fn(x_new, t + h)       # FSAL stage, c = 1
        ks.append(k_last)
        err = h * sum(e * k for e, k in zip(tab.b_err, ks) if e != 0.0)
        return x_new, k_last, scaled_norm(err, x, x_new)

    def cond(state):
        t, h, _, _, _, steps, _, failed = state
        return (t < t1) & (steps < max_steps) & jnp.logical_not(failed)

    def body(state):
        t, h, x, k1, nfe, steps, prev_rejected, _ = state
        h = jnp.minimum(h, t1 - t)
        last = (t1 - t) - h <= tiny
        x_new, k_new, err = attempt(t, h, x, k1)
        ok = jnp.isfinite(err) & (err <= 1.0)
        factor = jnp.where(err > 0, safety * jnp.power(jnp.maximum(err, 1e-30), exponent),
                           max_factor)
        factor = jnp.clip(jnp.where(jnp.isfinite(factor), factor, min_factor),
                          min_factor, max_factor)
        factor = jnp.where(ok & prev_rejected, jnp.minimum(factor, 1.0), factor)
        t_acc = jnp.where(last, t1, t + h)
        t_out = jnp.where(ok, t_acc, t)
        x_out = jnp.where(ok, x_new, x)
        k_out = jnp.where(ok, k_new, k1)
        h_next = h * factor
        failed = h_next < tiny
        return (t_out, h_next, x_out, k_out, nfe + (n_stages - 1), steps + 1,
                jnp.logical_not(ok), failed)

    init = (t0, h, x0, f0, nfe, jnp.asarray(0, jnp.int32), jnp.asarray(False),
            jnp.asarray(False))
    t_end, _, x_end, _, nfe, _, _, _ = lax.while_loop(cond, body, init)
    x_end = jnp.where(t_end >= t1, x_end, jnp.full_like(x_end, jnp.nan))
    return x_end, nfe


# ---------------------------------------------------------------------------------------
# Dispatcher and sampler
# ---------------------------------------------------------------------------------------
def num_function_evals(method: str, num_steps: int) -> int:
    """Velocity evaluations of a fixed-grid method with `num_steps` steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if method == "heun_exp":
        return 2 * (num_steps - 1) + 1
    if method == "euler":
        return num_steps
    if method in ("heun", "midpoint"):
        return 2 * num_steps
    if method == "adaptive":
        raise ValueError("the adaptive solver's evaluation count is dynamic; "
                         "use solve(..., return_nfe=True)")
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def solve(velocity_fn: VelocityFn, x0: Array, method: str = "heun_exp",
          num_steps: int = 7, *, exp_base: float = 0.5, grid: Optional[Array] = None,
          rtol: float = 1e-5, atol: float = 1e-5, scheme: str = "dopri5",
          max_steps: int = 1000, return_nfe: bool = False):
    """Integrate from t = 0 (x0) to t = 1 with the named method.

    Fixed methods use `grid` when given (any increasing 1-D array from 0 to 1; then
    num_steps is len(grid) - 1), else the exponential grid with base `exp_base` for
    "heun_exp" and the uniform grid for "heun", "euler", "midpoint". "adaptive" uses
    rtol / atol / scheme / max_steps and ignores num_steps.

    Returns x1, or (x1, nfe) with return_nfe=True (nfe a Python int for fixed methods,
    an int32 scalar for "adaptive").
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "adaptive":
        x1, nfe = adaptive_solve(velocity_fn, x0, 0.0, 1.0, rtol=rtol, atol=atol,
                                 scheme=scheme, max_steps=max_steps)
        return (x1, nfe) if return_nfe else x1
    if grid is None:
        grid = (exponential_time_grid(num_steps, exp_base) if method == "heun_exp"
                else uniform_time_grid(num_steps))
    steps = int(np.shape(grid)[0]) - 1
    if method == "heun_exp":
        x1 = heun_solve(velocity_fn, x0, grid, final_euler=True)
    elif method == "heun":
        x1 = heun_solve(velocity_fn, x0, grid, final_euler=False)
    elif method == "euler":
        x1 = euler_solve(velocity_fn, x0, grid)
    else:
        x1 = midpoint_solve(velocity_fn, x0, grid)
    return (x1, num_function_evals(method, steps)) if return_nfe else x1


def sample(velocity_fn: VelocityFn, key: Array, shape: Sequence[int], noise_std: float,
           method: str = "heun_exp", num_steps: int = 7, dtype: Any = jnp.float32,
           **solve_kwargs):
    """Draw x0 = noise_std * xi, xi ~ N(0, I) of `shape`, and solve to t = 1.

    Extra keyword arguments go to `solve` (exp_base, grid, rtol, atol, return_nfe, ...).
    """
    x0 = noise_std * jax.random.normal(key, tuple(shape), dtype=dtype)
    return solve(velocity_fn, x0, method, num_steps, **solve_kwargs)
