"""Shared by the benchmarks: the repository on sys.path, the device in words, JSON results,
and the training steps of the scripts built at the paper's sizes on generated data.

Timing and FLOPs come from utils/cost.py (measure_latency: warm-up, block_until_ready,
medians; xla_flops: XLA cost analysis), the same code evaluate.py reports with.

`build_step(name, args)` builds the real train step of a preset's config file: the registry
(utils/method.py) names the method that reads that YAML, and the step is one call of that
method's `build(config, dataset)` (the preset's YAML plus the size flags; a generated uint8 data
set), compiled by utils.trainer.make_train_step on make_mesh() over all devices, with state,
frozen arrays and the training set placed on the mesh as Trainer.fit places them. The teachers
are `--teacher_runs` generated SWAG runs exported as sgd_swag.py exports them, and EDFM's backbone
a generated KD export, so the method loads them exactly as it loads trained ones.
Results go to bench/results/<name>-<platform>.json (name = bench-preset[-bfloat16] for these
benches: result_name), or to `--out_dir` / $BENCH_RESULTS_DIR.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import sys
from typing import Any, Callable, Optional

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


def save(name: str, results: dict, out_dir: Optional[str] = None) -> str:
    results = {"benchmark": name, "device": device_description(), "jax": jax.__version__, **results}
    out_dir = out_dir or os.environ.get("BENCH_RESULTS_DIR") or os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    platform_tag = jax.devices()[0].platform
    path = os.path.join(out_dir, f"{name}-{platform_tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return path


def alternated(builds: dict, run, warmup: int, repeats: int, pause_s: float = 0.0) -> dict:
    """{name: median seconds} of `run(build)` for each build, the builds taking turns in every
    round, so that all of them see the same machine; `pause_s` before each turn."""
    import time

    import numpy as np

    times = {name: [] for name in builds}
    for i in range(warmup + repeats):
        for name, build in builds.items():
            time.sleep(pause_s)
            start = time.perf_counter()
            jax.block_until_ready(run(build))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


# ------------------------------------------------------------------------- shared arguments
# The paper's configurations: data set (pixel statistics, train size, classes) and the YAMLs
# of the scripts whose steps are built. --depth/--width/... override them for tiny runs.
PRESETS = {
    preset: {"data": data, "sgd_swag": f"config/teacher/{preset}_frnrelu_sgd_swag.yaml",
             **{method: f"config/distillation/{method}_{preset}_frnrelu.yaml"
                for method in ("kd", "endd", "fed", "hydra", "edfm")}}
    for preset, data in (("c10", "CIFAR10_x32"), ("c100", "CIFAR100_x32"))
}
# the steps a preset names (its config files above): the teachers' and every ensemble method's
METHODS = ("sgd_swag", "kd", "endd", "fed", "hydra", "edfm")


def add_run_args(parser: argparse.ArgumentParser):
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    parser.add_argument("--out_dir", default=None,
                        help="where the JSON goes (default $BENCH_RESULTS_DIR or bench/results)")


def add_model_args(parser: argparse.ArgumentParser, training: bool = True):
    """The preset and its size overrides; `training` adds the train-step-only flags."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="c10",
                        help="c10: ResNet-32x2, 10 classes; c100: ResNet-32x4, 100 classes")
    parser.add_argument("--depth", type=int, help="ResNet depth of every network (default: config)")
    parser.add_argument("--width", type=int, help="ResNet width of every network (default: config)")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--classes", type=int, help="classes (default: the preset's data set)")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--teacher_runs", type=int, default=10, help="generated MultiSWAG runs")
    if not training:
        parser.set_defaults(dtype="float32", num_teachers=None, num_images=None)
        return
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the scripts' `dtype` key: compute dtype of the ResNets")
    parser.add_argument("--num_teachers", type=int,
                        help="KD teacher members per step (default: the KD config's, 30)")
    parser.add_argument("--num_images", type=int,
                        help="generated uint8 training set on the devices (default: the "
                             "preset's train split, 40960)")


def preset_config(name: str, args, **keys):
    """The config of the preset's `name` step (its YAML and the size flags; `keys` are further
    --key value flags), parsed as its script parses it, and the Method that reads it."""
    from utils.method import config_reader

    path = os.path.join(ROOT, PRESETS[args.preset][name])
    reader = config_reader(path)
    fields = {f.name for f in dataclasses.fields(reader.method.config_class)}
    flags = {"optim_bs": args.batch, "dtype": args.dtype, "model_depth": args.depth,
             "model_width": args.width, "num_teachers": args.num_teachers,
             "num_classes": args.classes, **keys}
    argv = ["--config", path]
    for key, value in flags.items():
        if value is not None and key in fields:
            argv += [f"--{key}", str(value)]
    return reader.parse(argv), reader.method


def data_spec(args):
    from data.datasets import DATASETS

    spec = DATASETS[PRESETS[args.preset]["data"]]
    return spec, args.classes or spec.num_classes


def generated_dataset(args, num_images: int):
    """A Dataset of random uint8 images of the preset's data set (its name, pixel statistics
    and classes, `--size` pixels): what the scripts' build() reads."""
    import numpy as np

    from data.datasets import Dataset, Split

    spec, num_classes = data_spec(args)
    rng = np.random.default_rng(0)
    shape = (args.size, args.size, 3)

    def split(n):
        return Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                     (np.arange(n) % num_classes).astype(np.int32))

    return Dataset(spec.name, num_classes, shape, spec.pixel_mean, spec.pixel_std,
                   train=split(num_images), val=split(8), test=split(8), source="generated")


# ------------------------------------------------------------------------------ train steps
@dataclasses.dataclass
class StepBench:
    """One script's train step, ready to call as Trainer._run_epoch calls it:
    `state, metrics = step(state, *args)`, args = (frozen, images, labels, indices, mask)."""

    name: str
    step: Callable  # utils.trainer.make_train_step's jitted function (state donated)
    state: Any
    args: tuple
    config: Any
    mesh: Any
    batch_size: int


_INITS = {}  # repr(model) -> its initial variables: one init compile per architecture


def init_variables(model, image_shape) -> dict:
    """`jax.jit(model.init)(key, one image)` as the scripts call it, memoised per architecture
    (the values do not change the timings; the key is fixed)."""
    import numpy as np

    key = (repr(model), tuple(image_shape))
    if key not in _INITS:
        example = np.zeros((1, *image_shape), np.float32)
        _INITS[key] = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), example))
    return dict(_INITS[key])


def teacher_moments(model, num_runs: int, image_shape) -> dict:
    """Generated MultiSWAG moments as utils.teachers.load_teachers stacks them: R runs of one
    architecture ({"mean", "std": [R, ...] float32, "model_state": {}})."""
    import numpy as np

    params = init_variables(model, image_shape)["params"]
    runs = lambda scale: jax.tree.map(
        lambda p: np.stack([np.asarray(p) * scale * (1 + 0.01 * r) for r in range(num_runs)]), params)
    return {"mean": runs(1.0), "std": jax.tree.map(np.abs, runs(0.05)), "model_state": {}}


_EXPORTS = {}  # what was generated -> its directory, once per process


def generated_exports(args) -> dict:
    """Directories of generated exports: `teacher_dir` (R SWAG runs of the preset's teacher
    architecture, as sgd_swag.py exports them) and `pretrained_resnet` (a KD export of the
    EDFM preset's backbone); {key: directory}, for the configs that have those keys."""
    import atexit
    import shutil
    import tempfile

    import numpy as np

    from models.resnet import resnet_from_config, resnet_spec
    from utils.checkpoints import save_export, save_resnet

    key = (args.preset, args.depth, args.width, args.classes, args.size, args.teacher_runs)
    if key in _EXPORTS:
        return _EXPORTS[key]
    spec, num_classes = data_spec(args)
    image_shape = (args.size, args.size, 3)
    root = tempfile.mkdtemp(prefix="bench-exports-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the benchmark's scratch, not a result

    def network(name):
        config, _ = preset_config(name, args, dtype="float32")
        return resnet_from_config(config, num_classes, spec.pixel_mean, spec.pixel_std)

    teacher = network("sgd_swag")
    moments = teacher_moments(teacher, args.teacher_runs, image_shape)
    sidecar = {"kind": "swag_teacher", "model": resnet_spec(teacher), "num_classes": num_classes,
               "data_name": spec.name}
    for r in range(args.teacher_runs):
        mean = jax.tree.map(lambda x: x[r], moments["mean"])
        params2 = jax.tree.map(lambda m, s: np.square(m) + np.square(s[r]), mean, moments["std"])
        save_export(os.path.join(root, "teachers", f"run{r}", "model"),
                    {"mean": mean, "params2": params2}, sidecar)
    backbone = network("edfm")
    variables = init_variables(backbone, image_shape)
    params = variables.pop("params")
    save_resnet(os.path.join(root, "kd", "model"), backbone, params, variables, method="KD",
                data_name=spec.name)
    _EXPORTS[key] = {"teacher_dir": os.path.join(root, "teachers"),
                     "pretrained_resnet": os.path.join(root, "kd")}
    return _EXPORTS[key]


def build_step(name: str, args, mesh=None) -> StepBench:
    """The train step of the preset's `name` config (one of METHODS): one call of the
    build() of the method that reads it (the registry), as its script runs it."""
    import numpy as np

    from utils.trainer import device_step_inputs, make_mesh, make_train_step, put_replicated

    mesh = make_mesh() if mesh is None else mesh
    spec, _ = data_spec(args)
    config, method = preset_config(name, args, **generated_exports(args))
    if config.optim_bs % mesh.size:
        raise ValueError(f"batch {config.optim_bs} is not a multiple of the {mesh.size} devices")
    num_images = args.num_images or spec.num_train
    if num_images < config.optim_bs:
        raise ValueError(f"--num_images {num_images} is smaller than the batch {config.optim_bs}")
    dataset = generated_dataset(args, num_images)
    run = method.build(config, dataset)
    step = make_train_step(run.loss_fn, run.optimizer, config.seed, run.ema_decay, mesh)
    indices = np.random.default_rng(0).permutation(num_images)[:config.optim_bs]
    placed = device_step_inputs(run.frozen, dataset.train.images, dataset.train.labels, indices,
                                np.ones(config.optim_bs, bool), mesh)
    return StepBench(name, step, put_replicated(run.state, mesh), placed, config, mesh,
                     config.optim_bs)


def compile_step(bench: StepBench):
    """The step compiled ahead of time (donation kept): one compile for timing and memory."""
    return bench.step.lower(bench.state, *bench.args).compile()


def time_step(bench: StepBench, compiled, repeats: int, warmup: int) -> dict:
    """utils.cost.measure_latency of one training step; the donated state is threaded through
    the calls (and left in bench.state), so every call runs on a live state as in training."""
    from utils.cost import measure_latency

    def call():
        bench.state, metrics = compiled(bench.state, *bench.args)
        return bench.state, metrics

    return summary(measure_latency(call, repeats=repeats, warmup=warmup, jit=False))


def step_flops(bench: StepBench) -> dict:
    """FLOPs of one step from XLA's cost analysis (utils.cost.xla_flops: the lowered program's
    arithmetic at the global batch, every iteration of scans such as the teachers' lax.map on CPU
    and RandAugment's layers counted); per device, that over the devices of the data-parallel
    step."""
    from utils.cost import xla_flops

    count = xla_flops(bench.step, bench.state, *bench.args)
    return {"flops_per_step": count.flops, "flops_per_device_step": count.flops / bench.mesh.size,
            "flops_exact_loops": count.exact_loops}


def summary(timing: dict) -> dict:
    keys = ("median_s", "min_s", "max_s", "repeats", "warmup", "times_s")
    return {k: timing[k] for k in keys}


# ------------------------------------------------------------------------------- peak FLOP/s
# Dense peak FLOP/s per device by precision (vendor data sheets). Matched on device_kind,
# most specific name first; H200 has the H100 SXM's compute.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "tensorfloat32": 378e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "tensorfloat32": 494e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "tensorfloat32": 494e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "tensorfloat32": 156e12, "float32": 19.5e12}),
)


def precision_basis(dtype: str) -> str:
    """Which peak applies: bfloat16 compute; float32 runs its convolutions and matmuls in TF32
    on NVIDIA tensor cores under JAX's default matmul precision, unless that is set higher."""
    if dtype == "bfloat16":
        return "bfloat16"
    setting = getattr(jax.config, "jax_default_matmul_precision", None)
    setting = str(getattr(setting, "value", setting) or "default").lower()
    return "float32" if setting in ("highest", "float32", "f32_f32_f32") else "tensorfloat32"


def peak_flops(dtype: str, override: Optional[float] = None):
    """(peak FLOP/s of one device or None, where it comes from)."""
    if override:
        return float(override), "--peak_flops"
    device = jax.devices()[0]
    if device.platform != "cpu":
        basis = precision_basis(dtype)
        for name, peaks in PEAK_FLOPS:
            if name.lower() in device.device_kind.lower():
                return peaks[basis], f"{name} {basis} dense (table in bench/common.py)"
    return None, f"unknown for {getattr(device, 'device_kind', device.platform)}: pass --peak_flops"


# ----------------------------------------------------------------------------------- memory
MIB = 2.0 ** 20


def memory_analysis_mib(compiled) -> Optional[dict]:
    """XLA's buffer assignment of a compiled program, per device, in MiB (None if the backend
    gives none). `peak_estimate` = argument + output − alias (donated) + temp."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {name: getattr(stats, f"{name}_size_in_bytes") / MIB for name in fields}
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_memory_mib() -> Optional[dict]:
    """The allocator's counters of device 0 in MiB (accelerators; None on CPU)."""
    stats_fn = getattr(jax.devices()[0], "memory_stats", None)
    stats = stats_fn() if stats_fn else None
    if not stats:
        return None
    names = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {name.replace("_bytes", ""): stats[name] / MIB for name in names if name in stats}


def print_rows(title: str, rows: dict, columns: dict):
    """A small table: rows {name: {key: value}}, columns {key: format spec}."""
    print(title)
    print(f"{'':<12}" + "".join(f"{key:>22}" for key in columns))
    for name, row in rows.items():
        cells = []
        for key, fmt in columns.items():
            value = row.get(key)
            cells.append(f"{'-' if value is None else format(value, fmt):>22}")
        print(f"{name:<12}" + "".join(cells))


def result_name(name: str, args) -> str:
    """`name-<preset>[-bfloat16]`, so that runs at other settings do not overwrite each other."""
    return f"{name}-{args.preset}" + ("-bfloat16" if args.dtype == "bfloat16" else "")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or not math.isfinite(a) or not b else a / b
