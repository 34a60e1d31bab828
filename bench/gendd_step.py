"""(i) GenDD's stage-2 step on CIFAR-100 (batch 64), whole and in parts, against PyTorch.

    python bench/gendd_step.py --pairs res110_res32 res32x4_res8x4 [--torch]

The step is gendd.py's, built by its `build` from config/distillation/gendd_c100_<pair>.yaml
(M = 30 rows per token, a 1024-wide, 3-block diffusion head) with a random teacher export of the
pair's architecture and generated CIFAR-100-shaped data, compiled by utils.trainer's step. Its
FLOPs are XLA's cost analysis. Its parts, each jitted alone on the same shapes and with the step's
compile options (utils.trainer.step_compiler_options): the teacher's forward (eval mode), the
student's forward (train mode) and forward + backward, and the diffusion head's training loss
(ε-MSE + VB over the B·K·M rows) forward + backward. MFU = the step's FLOPs / its median /
(--peak_flops or bench/common.py's peak of the device, float32: TF32 on NVIDIA GPUs).

Smaller runs (bench/accelerator_suite.sh's smoke): --teacher/--student replace the pair's
networks, --batch the recipe's 64, --head_width and --diffusion_batch_mul the YAML's head.

`--torch`: the same parts in PyTorch on this CPU (torch is a dev dependency): the CIFAR networks
of tests/models/repdistiller_torch.py (RepDistiller's definitions, written in this project) and
an MLP of the head's shapes (input, time and condition Linears, three adaLN blocks with
LayerNorm and SiLU, the final adaLN and output Linears) trained on a mean-square loss. That is
the reference's arithmetic, not its code; the sum of the parts estimates its step.

`--reference PATH`: the GenDD reference's own stage-2 step (its code, imported from a checkout at
PATH, in a process of its own: bench/gendd_reference_step.py --serve), the two steps of a pair
taking turns, one each per round, so that both see the same machine; `jax_step_over_reference`
is the ratio of their medians.

`--cpu_options`: the step as the trainer compiles it on the CPU (utils.trainer.CPU_STEP_OPTIONS:
XLA:CPU's YNNPACK library fusions limited to reductions and dots, so the convolutions go to
XLA's own kernels) and with XLA's defaults, timed alternately in the same process, and the
student's forward + backward the same way (bench/gendd_cpu_profile.md says why).

All timings: medians after warm-up (utils.cost.measure_latency, PyTorch's parts too).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import common
import gendd_reference_step  # the pairs and the checkout's check (it imports no JAX, no project)
import jax
import jax.numpy as jnp
import numpy as np

PAIRS = {pair: (teacher, student) for pair, (teacher, student, _) in gendd_reference_step.PAIRS.items()}
BATCH = 64  # the recipe's
HEAD_KEYS = ("head_width", "diffusion_batch_mul")  # config keys a smaller run may override


def head_flags(args) -> list:
    """--key value flags of the head's sizes given on the command line (the YAML's otherwise)."""
    given = {key: getattr(args, key) for key in HEAD_KEYS if getattr(args, key) is not None}
    return [flag for key, value in given.items() for flag in (f"--{key}", str(value))]


def networks(pair: str, args) -> tuple:
    """(teacher, student) architectures: the pair's, or --teacher/--student's."""
    teacher_arch, student_arch = PAIRS[pair]
    return args.teacher or teacher_arch, args.student or student_arch


def jax_parts(pair: str, args, reference=None) -> dict:
    """This project's step and its parts (the sizes and timing of `args`); `reference` (a
    ReferenceStep) takes turns with the step."""
    import gendd
    from data.datasets import Dataset, Split
    from models import diffusion as gd
    from models.zoo import build_model
    from utils.checkpoints import save_resnet
    from utils.config import parse_config
    from utils.cost import measure_latency, xla_flops
    from utils.trainer import (CPU_STEP_OPTIONS, device_step_inputs, init_variables, make_mesh, make_train_step,
                               put_replicated, step_compiler_options)

    teacher_arch, student_arch = networks(pair, args)
    batch, repeats, warmup, cpu_options = args.batch, args.repeats, args.warmup, args.cpu_options
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4 * batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 4 * batch).astype(np.int32)
    split = Split(images, labels)
    dataset = Dataset("CIFAR100_x32", 100, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, split, split, split)
    with tempfile.TemporaryDirectory() as root:
        teacher = build_model(teacher_arch, 100)
        params, model_state = init_variables(teacher, jax.random.PRNGKey(0), (32, 32, 3))
        save_resnet(os.path.join(root, "teacher"), teacher, params, model_state, data_name="CIFAR100_x32")
        config = parse_config(gendd.GenDDConfig, [
            "--config", os.path.join(common.ROOT, "config", "distillation", f"gendd_c100_{pair}.yaml"),
            "--teacher_dir", os.path.join(root, "teacher"), "--gendd_stage", "2", "--optim_bs", str(batch),
            "--model_arch", student_arch, *head_flags(args)])
        run = gendd.build(config, dataset)

    mesh = make_mesh()
    step = make_train_step(run.loss_fn, run.optimizer, 0, 0.0, mesh)
    state = put_replicated(run.state, mesh)
    inputs = device_step_inputs(run.frozen, images, labels, np.arange(batch), np.ones(batch, bool), mesh)
    compiled = step.lower(state, *inputs).compile()
    flops = xla_flops(step, state, *inputs).flops  # the whole batch's, all devices together

    def call(*a):  # the donated state threaded through, as in training
        nonlocal state
        state, metrics = compiled(state, *a)
        return metrics

    timing = lambda fn, *a: measure_latency(fn, *a, warmup=warmup, repeats=repeats, jit=False)["median_s"]
    # each part compiled as the trainer compiles the step (its CPU options: XLA's own convolutions
    # are faster in these forwards too), so that the parts are what the step runs
    part = lambda fn, *a: timing(jax.jit(fn, compiler_options=step_compiler_options()), *a)
    out = {"step_s": timing(call, *inputs), "step_flops": flops, "devices": mesh.size}
    if reference is not None:  # the pause: the other side's idle threads stop spinning first
        out["alternated_with_reference"] = common.alternated(
            {"step_s": lambda: call(*inputs), "reference_step_s": reference.step}, lambda build: build(),
            warmup, repeats, pause_s=0.2)
    if cpu_options:
        def train(build):  # the donated state threaded through
            nonlocal state
            state, metrics = build(state, *inputs)
            return metrics

        out["alternated_step_s"] = common.alternated(
            {"default": make_train_step(run.loss_fn, run.optimizer, 0, 0.0, mesh, xla_defaults=True)
             .lower(state, *inputs).compile(), "cpu_options": compiled},
            train, warmup, repeats)
        out["cpu_options"] = CPU_STEP_OPTIONS

    x = jnp.asarray(rng.uniform(size=(batch, 32, 32, 3)), jnp.float32)
    teacher_vars = run.frozen["teacher"]
    out["teacher_forward_s"] = part(lambda v, x: teacher.apply(v, x, return_features=True).pooled,
                                      teacher_vars, x)
    student = build_model(student_arch, 100)
    s_params, s_state = init_variables(student, jax.random.PRNGKey(1), (32, 32, 3))

    def student_loss(p, x):
        out, _ = student.apply({"params": p, **s_state}, x, train=True, return_features=True,
                               mutable=list(s_state))
        return jnp.sum(out.pooled ** 2)

    out["student_forward_s"] = part(student_loss, s_params, x)
    out["student_forward_backward_s"] = part(jax.grad(student_loss), s_params, x)
    if cpu_options:
        lowered = jax.jit(jax.grad(student_loss)).lower(s_params, x)
        out["alternated_student_forward_backward_s"] = common.alternated(
            {"default": lowered.compile(), "cpu_options": lowered.compile(compiler_options=CPU_STEP_OPTIONS)},
            lambda build: build(s_params, x), warmup, repeats)

    num_tokens = teacher_vars["params"]["classifier"]["kernel"].shape[0] // config.token_dim
    head = gendd.DiffusionMLP(token_dim=config.token_dim, num_tokens=num_tokens, width=config.head_width,
                              depth=config.head_depth, cond_drop_prob=config.cond_drop_prob,
                              num_timesteps=config.num_diffusion_steps)  # as gendd.build's
    head_params = run.state.params["head"]
    rows = config.diffusion_batch_mul * batch * num_tokens
    student_dim = int(s_params["classifier"]["kernel"].shape[0])
    x0 = jax.random.normal(jax.random.PRNGKey(3), (rows, config.token_dim))
    cond = jax.random.normal(jax.random.PRNGKey(4), (rows, student_dim))
    tokens = jnp.zeros((rows,), jnp.int32)
    diffusion = gd.make_cosine_diffusion(config.num_diffusion_steps)

    def head_loss(hp, x0, cond):
        model_fn = lambda xt, t: head.apply({"params": hp}, xt, t, cond, tokens, train=True,
                                            rngs={"dropout": jax.random.PRNGKey(5)})
        return gd.training_losses(diffusion, model_fn, jax.random.PRNGKey(6), x0)["loss"].mean()

    out.update(head_rows=rows, head_width=config.head_width, token_dim=config.token_dim, student_dim=student_dim)
    out["head_forward_backward_s"] = part(jax.grad(head_loss, argnums=(0, 2)), head_params, x0, cond)
    return out


def torch_parts(teacher_arch: str, student_arch: str, batch: int, rows: int, width: int, token_dim: int,
                student_dim: int, repeats: int, warmup: int) -> dict:
    import torch

    from tests.models import repdistiller_torch

    from utils.cost import measure_latency

    torch.set_num_threads(os.cpu_count())
    # PyTorch on the CPU computes eagerly: the call's return is the end of its work
    median = lambda fn: measure_latency(fn, warmup=warmup, repeats=repeats, jit=False)["median_s"]

    x = torch.rand(batch, 3, 32, 32)
    teacher = repdistiller_torch.build(teacher_arch, 100).eval()
    student = repdistiller_torch.build(student_arch, 100).train()

    def pooled_loss(net):
        out = net(x)
        return (out[0] if isinstance(out, tuple) else out).pow(2).sum()

    def student_backward():
        student.zero_grad()
        pooled_loss(student).backward()

    out = {"teacher_forward_s": median(lambda: torch.no_grad()(lambda: teacher(x))()),
           "student_forward_s": median(lambda: torch.no_grad()(lambda: pooled_loss(student))()),
           "student_forward_backward_s": median(student_backward)}

    linear = torch.nn.Linear
    layers = torch.nn.ModuleDict({
        "x": linear(token_dim, width), "t1": linear(256, width), "t2": linear(width, width),
        "c": linear(student_dim, width), "final_mod": linear(width, 2 * width), "out": linear(width, 2 * token_dim),
        **{f"mod{b}": linear(width, 3 * width) for b in range(3)},
        **{f"fc{b}a": linear(width, width) for b in range(3)}, **{f"fc{b}b": linear(width, width) for b in range(3)}})
    xin, tin, cin = torch.randn(rows, token_dim), torch.randn(rows, 256), torch.randn(rows, student_dim)
    silu, norm = torch.nn.functional.silu, torch.nn.functional.layer_norm

    def head_step():
        layers.zero_grad()
        h = layers["x"](xin)
        y = layers["t2"](silu(layers["t1"](tin))) + layers["c"](cin)
        for b in range(3):
            shift, scale, gate = layers[f"mod{b}"](silu(y)).chunk(3, -1)
            u = norm(h, (width,)) * (1 + scale) + shift
            h = h + gate * layers[f"fc{b}b"](silu(layers[f"fc{b}a"](u)))
        shift, scale = layers["final_mod"](silu(y)).chunk(2, -1)
        layers["out"](norm(h, (width,)) * (1 + scale) + shift).pow(2).mean().backward()

    out["head_forward_backward_s"] = median(head_step)
    out["step_estimate_s"] = out["teacher_forward_s"] + out["student_forward_backward_s"] + out[
        "head_forward_backward_s"]
    out["torch"] = torch.__version__
    return out


class ReferenceStep:
    """The reference's step of one pair in its own process (gendd_reference_step.py --serve):
    `step()` runs one and returns its seconds; `header` names its torch and commit."""

    def __init__(self, pair: str, reference: str):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gendd_reference_step.py")
        self.process = subprocess.Popen([sys.executable, script, "--reference", reference, "--pairs", pair,
                                         "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.header = json.loads(self._line())

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"error: the reference's step failed (exit {self.process.wait()}; its error is above)")
        return line

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return float(self._line())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    parser.add_argument("--torch", action="store_true", help="also the parts in PyTorch")
    parser.add_argument("--reference", metavar="PATH",
                        help="also the GenDD reference's own step, from its checkout at PATH")
    parser.add_argument("--cpu_options", action="store_true",
                        help="also the step built with CPU_OPTIONS, timed alternately with the default")
    sizes = parser.add_argument_group("smaller runs (the suite's smoke): the recipe's sizes unless given")
    sizes.add_argument("--batch", type=int, default=BATCH)
    sizes.add_argument("--teacher", help="the teacher's architecture instead of the pair's (e.g. resnet8)")
    sizes.add_argument("--student", help="the student's architecture instead of the pair's")
    sizes.add_argument("--head_width", type=int, help="the diffusion head's width (the YAML's: 1024)")
    sizes.add_argument("--diffusion_batch_mul", type=int, help="M, rows per token (the YAML's: 30)")
    parser.add_argument("--peak_flops", type=float, help="peak FLOP/s of one device (for MFU)")
    common.add_run_args(parser)
    args = parser.parse_args(argv)
    if args.reference:
        if args.batch != BATCH or args.teacher or args.student or head_flags(args):
            parser.error("--reference times the reference's recipe: drop the size flags")
        gendd_reference_step.reference_root(args.reference)  # a wrong path fails now, not after the JAX timings
    peak, peak_source = common.peak_flops("float32", args.peak_flops)

    results = {}
    for pair in args.pairs:
        reference = ReferenceStep(pair, args.reference) if args.reference else None
        row = {"jax": jax_parts(pair, args, reference)}
        j = row["jax"]
        j["teacher"], j["student"] = networks(pair, args)
        j["parts_sum_s"] = j["teacher_forward_s"] + j["student_forward_backward_s"] + j["head_forward_backward_s"]
        j["images_per_s"] = args.batch / j["step_s"]
        j["mfu"] = common.ratio(j["step_flops"] / j["step_s"], peak * j["devices"] if peak else None)
        print(f"{pair} JAX ({j['teacher']} -> {j['student']}, batch {args.batch}): step {j['step_s']:.3f} s "
              f"({j['images_per_s']:.1f} images/s, {j['step_flops'] / 1e9:.0f} GFLOP"
              + (f", MFU {j['mfu']:.1%}" if j["mfu"] is not None else "") + f"); teacher {j['teacher_forward_s']:.3f}, "
              f"student fwd {j['student_forward_s']:.3f} / fwd+bwd {j['student_forward_backward_s']:.3f}, head "
              f"fwd+bwd {j['head_forward_backward_s']:.3f} ({j['head_rows']} rows)")
        if args.cpu_options:
            for part in ("step", "student_forward_backward"):
                alt = j[f"alternated_{part}_s"]
                print(f"{pair} JAX {part}, alternated: XLA defaults {alt['default']:.3f} s, CPU_STEP_OPTIONS "
                      f"{alt['cpu_options']:.3f} s ({alt['default'] / alt['cpu_options']:.2f}x)")
        if reference is not None:
            reference.close()
            turns = j.pop("alternated_with_reference")
            row["reference"] = {"step_s": turns["reference_step_s"], **reference.header}
            row["jax_step_over_reference"] = turns["step_s"] / turns["reference_step_s"]
            print(f"{pair} taking turns with the reference's own step (PyTorch {reference.header['torch']}): "
                  f"this step {turns['step_s']:.3f} s, the reference's {turns['reference_step_s']:.3f} s "
                  f"({BATCH / turns['reference_step_s']:.1f} images/s): ratio {row['jax_step_over_reference']:.2f}")
            j["step_taking_turns_s"] = turns["step_s"]
        if args.torch:
            t = torch_parts(j["teacher"], j["student"], args.batch, j["head_rows"], j["head_width"], j["token_dim"],
                            j["student_dim"], args.repeats, args.warmup)
            row["torch"] = t
            row["jax_over_torch"] = {k: j[k] / t[k] for k in ("teacher_forward_s", "student_forward_s",
                                                               "student_forward_backward_s",
                                                               "head_forward_backward_s")}
            row["jax_step_over_torch_estimate"] = j["step_s"] / t["step_estimate_s"]
            print(f"{pair} PyTorch {t['torch']}: teacher {t['teacher_forward_s']:.3f}, student fwd "
                  f"{t['student_forward_s']:.3f} / fwd+bwd {t['student_forward_backward_s']:.3f}, head "
                  f"fwd+bwd {t['head_forward_backward_s']:.3f}; step estimate {t['step_estimate_s']:.3f} s "
                  f"({args.batch / t['step_estimate_s']:.1f} images/s)")
        results[pair] = row
    common.save("gendd_step", {"batch": args.batch, "config": vars(args), "peak_flops_per_device": peak,
                               "peak_source": peak_source, "pairs": results}, args.out_dir)


if __name__ == "__main__":
    main()
