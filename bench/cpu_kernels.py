"""(k) The kernels under GenDD's CPU gap (bench/gendd_cpu_profile.md): one 3x3 convolution of
each CIFAR ResNet stage and the diffusion head's dense layers, XLA:CPU against PyTorch (oneDNN).

    python bench/cpu_kernels.py [--batch 64] [--convs 32x16 16x32 8x64 32x64 16x128 8x256]
                                [--rows 1920] [--width 1024] [--repeats 15] [--warmup 2]

Convolutions (`HxC`: an H x H x C input, C output channels, stride 1, SAME, batch --batch; the
defaults are the stages of res110/res32, then of res32x4/res8x4): the forward, and the forward
with both gradients (input and kernel) for a given output gradient, what one layer costs in a
training step. Matmuls, at
the head's --rows and --width: the modulation layer's forward [rows, width] x [width, 3 width],
the MLP layer's [rows, width] x [width, width], and that layer's forward with both gradients.

Each kernel's three builds take turns, one call each per round with a 50 ms pause before each
(common.alternated), so that all see the same machine: XLA with the training step's options (utils.trainer.step_compiler_options),
XLA's defaults, and PyTorch (eager, NCHW as the reference runs it; torch is a dev dependency).
Reports milliseconds and GFLOP/s per build and XLA (step options) / PyTorch, and checks that the
builds compute the same values (max relative difference, float32).
"""
import argparse
import os
from typing import Callable, NamedTuple

import common
import jax
import jax.numpy as jnp
import numpy as np

from utils.trainer import step_compiler_options

CONVS = ["32x16", "16x32", "8x64", "32x64", "16x128", "8x256"]  # res110/res32, res32x4/res8x4 stages


class Kernel(NamedTuple):
    jax_fn: Callable
    inputs: tuple
    torch_fn: Callable  # returns a tuple of tensors, like jax_fn's outputs
    torch_inputs: tuple
    torch_layout: Callable  # PyTorch's outputs -> NumPy arrays laid out as JAX's
    flops: int


def conv_nhwc(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def with_gradients(fn):
    """fn's output and the gradients of all its inputs for the cotangent given last, as a
    training step's forward and backward pass of one layer compute them."""
    def run(*inputs_and_cotangent):
        *inputs, cotangent = inputs_and_cotangent
        out, vjp = jax.vjp(fn, *inputs)
        return (out, *vjp(cotangent))
    return run


def torch_with_gradients(fn):
    import torch

    def run(*inputs_and_cotangent):
        *inputs, cotangent = inputs_and_cotangent
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*inputs)
        return (out.detach(), *torch.autograd.grad(out, inputs, cotangent))
    return run


def conv_layout(values):
    """PyTorch's convolution outputs laid out as JAX's: activations NCHW -> NHWC, kernel OIHW -> HWIO."""
    values = [v.numpy() for v in values]
    return [v.transpose(0, 2, 3, 1) for v in values[:2]] + [v.transpose(2, 3, 1, 0) for v in values[2:]]


def kernels(args) -> dict:
    """{name: Kernel} at the sizes of `args`."""
    import torch

    rng = np.random.default_rng(0)
    uniform = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32)
    dense_layout = lambda values: [v.numpy() for v in values]
    out = {}
    for spec in args.convs:
        size, channels = map(int, spec.split("x"))
        x, kernel = uniform(args.batch, size, size, channels), uniform(3, 3, channels, channels)
        flops = 2 * args.batch * size * size * channels * channels * 9
        cotangent = uniform(*x.shape)
        nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
        torch_inputs = (nchw(x), torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv_torch = lambda x, k: torch.nn.functional.conv2d(x, k, padding=1)
        out[f"conv {spec} forward"] = Kernel(conv_nhwc, (x, kernel), lambda *a: (conv_torch(*a),), torch_inputs,
                                       conv_layout, flops)
        out[f"conv {spec} forward + gradients"] = Kernel(with_gradients(conv_nhwc), (x, kernel, cotangent),
                                                   torch_with_gradients(conv_torch),
                                                   (*torch_inputs, nchw(cotangent)), conv_layout, 3 * flops)
    rows, w = args.rows, args.width
    h = uniform(rows, w)
    torch_h = torch.from_numpy(h)
    dense_torch = lambda *a: (torch.matmul(*a),)
    for name, n in (("modulation", 3 * w), ("mlp", w)):
        kernel = uniform(w, n) / np.float32(np.sqrt(w))
        out[f"dense {rows}x{w}x{n} ({name}) forward"] = Kernel(jnp.matmul, (h, kernel), dense_torch,
                                                        (torch_h, torch.from_numpy(kernel)), dense_layout,
                                                        2 * rows * w * n)
    mlp_kernel, cotangent = uniform(w, w) / np.float32(np.sqrt(w)), uniform(rows, w)
    out[f"dense {rows}x{w}x{w} (mlp) forward + gradients"] = Kernel(
        with_gradients(jnp.matmul), (h, mlp_kernel, cotangent), torch_with_gradients(torch.matmul),
        (torch_h, torch.from_numpy(mlp_kernel), torch.from_numpy(cotangent)), dense_layout, 3 * 2 * rows * w * w)
    return out


def max_relative_difference(values, reference) -> float:
    """max over the outputs of max |a - b| / max |b|."""
    return max(float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))) for a, b in zip(values, reference))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--convs", nargs="+", default=CONVS, help="HxC: input size and channels")
    parser.add_argument("--rows", type=int, default=1920, help="the head's rows (M·B·K)")
    parser.add_argument("--width", type=int, default=1024, help="the head's width")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    for spec in args.convs:
        parts = spec.split("x")
        if not (len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts)):
            parser.error(f"--convs takes HxC (e.g. 32x16), got {spec!r}")
    import torch

    torch.set_num_threads(os.cpu_count())
    options = step_compiler_options()
    rows = {}
    for name, kernel in kernels(args).items():
        inputs, torch_fn, torch_inputs = jax.device_put(kernel.inputs), kernel.torch_fn, kernel.torch_inputs
        lowered = jax.jit(kernel.jax_fn).lower(*inputs)
        step_build, default_build = lowered.compile(compiler_options=options), lowered.compile()
        builds = {"xla_step_options": lambda: step_build(*inputs), "xla_defaults": lambda: default_build(*inputs),
                  "torch": lambda: torch_fn(*torch_inputs)}
        # the pause: the threads of the build before (PyTorch's OpenMP pool spins) go idle first
        seconds = common.alternated(builds, lambda build: build(), args.warmup, args.repeats, pause_s=0.05)
        row = {f"{build}_ms": 1e3 * s for build, s in seconds.items()}
        row.update({f"{build}_gflops": kernel.flops / s / 1e9 for build, s in seconds.items()})
        row["xla_over_torch"] = seconds["xla_step_options"] / seconds["torch"]
        row["max_relative_difference"] = max_relative_difference(
            jax.tree.leaves(step_build(*inputs)), kernel.torch_layout(torch_fn(*torch_inputs)))
        rows[name] = row
        print(f"{name:<44} XLA {row['xla_step_options_ms']:8.2f} ms (defaults {row['xla_defaults_ms']:8.2f})"
              f"  PyTorch {row['torch_ms']:8.2f} ms  XLA/PyTorch {row['xla_over_torch']:.2f}"
              f"  ({row['xla_step_options_gflops']:.0f} against {row['torch_gflops']:.0f} GFLOP/s)", flush=True)
    common.save("cpu_kernels", {"batch": args.batch, "rows": args.rows, "width": args.width,
                                "step_options": options, "torch": torch.__version__,
                                "repeats": args.repeats, "warmup": args.warmup, "kernels": rows}, args.out)
    return rows


if __name__ == "__main__":
    main()
