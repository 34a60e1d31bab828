"""The EDFM reference's checkpoints (github.com/Park-Jong-Geon/EDFM) -> the project's exports.

    python -m utils.convert edfm-ref teacher checkpoints_teacher/c10 runs/teachers/c10_ref
    python -m utils.convert edfm-ref kd checkpoints_teacher/kd/c10/checkpoint runs/kd/c10_ref

`teacher`: a folder of the reference's MultiSWAG pickles, one `<seed>.pickle` per run, each
{'swag_state': {'mean', 'params2', 'step', 'n', ...}} over its FlaxResNet's parameters, becomes
one teacher folder of runs, DST/<seed>/model/ each, written as sgd_swag.py exports a diagonal
SWAG run (kind swag_teacher: `mean` and the non-centred second moment `params2`), so
`teacher_dir: DST` works in every script. `kd`: the reference's KD student, a
flax.training.checkpoints msgpack file (`checkpoint`, or `checkpoint_<step>[/checkpoint]` in a
folder) holding `params` at the top level or under `model`, becomes a "resnet" export: EDFM's
`pretrained_resnet`, a KD student for evaluate.py, a one-network teacher.

The reference's layers carry flax's auto-names, numbered in call order: `Conv_i` (with biases,
HWIO kernels), `FilterResponseNorm_i` {gamma, beta, tau} (`BatchNorm_i` in its BN-ReLU style),
`Dense_0`; a block's projection shortcut conv is numbered right after the block's second conv.
The architecture (depth, width, planes, classes, conv biases, norm) is read off the tree's
shapes, and every array is placed under this project's ResNet names (models/resnet.py computes
what the reference computes: 'SAME' padding, FRN with ε 1e-6 and its TLU, Swish, the input
standardized with the reference's pixel mean (0.49, 0.48, 0.44) and std 0.2). Every array must
find its place and every parameter be filled with its shape, or the conversion stops in one line.

Pickles run code while they load, so the teacher files are read by utils/convert/safe_pickle.py,
which resolves only the globals these files need; anything else is refused in one line, before
anything is written.
"""
import argparse
import os
import re
import shutil

import numpy as np

from utils.convert import file_sha256
from utils.convert.safe_pickle import load_pickle
from utils.errors import UserError, first_line

PIXEL_MEAN = (0.49, 0.48, 0.44)  # the reference standardizes every data set with these (spec §1)
PIXEL_STD = (0.2, 0.2, 0.2)
DATA_BY_CLASSES = {10: "CIFAR10_x32", 100: "CIFAR100_x32"}
PICKLE_SUFFIXES = (".pickle", ".pkl")
REFERENCE = "Park-Jong-Geon/EDFM"
# The reference's norm layer -> (this project's norm, activation, {reference leaf: this project's}).
# Its two model styles: FRN-Swish (the released teachers and students) and BN-ReLU.
NORMS = {"FilterResponseNorm": ("frn", "swish", {"gamma": "scale", "beta": "bias", "tau": "threshold"}),
         "BatchNorm": ("bn", "relu", {"scale": "scale", "bias": "bias"})}
_LAYER = re.compile(r"(Conv|FilterResponseNorm|BatchNorm|Dense)_(\d+)")


def add_command(subparsers):
    """The `edfm-ref` subcommand of `python -m utils.convert`, with `teacher` and `kd`."""
    parser = subparsers.add_parser(
        "edfm-ref", help="the EDFM reference's MultiSWAG teacher pickles or KD checkpoint -> exports",
        description="Convert checkpoints of the EDFM reference implementation (Park-Jong-Geon/EDFM): its "
                    "MultiSWAG teacher pickles into a teacher folder of runs (teacher_dir), or its KD "
                    "student checkpoint into a 'resnet' export (pretrained_resnet, a KD student).")
    commands = parser.add_subparsers(dest="edfm_ref_command", required=True, metavar="WHAT")
    teacher = commands.add_parser(
        "teacher", help="a folder of <seed>.pickle MultiSWAG runs -> a teacher folder of runs",
        description="Convert the reference's teacher pickles (one <seed>.pickle per run, {'swag_state': "
                    "{'mean', 'params2', ...}}) into DST_DIR/<seed>/model/, each a diagonal SWAG run as "
                    "sgd_swag.py exports it, so that teacher_dir: DST_DIR works in every script. Only "
                    "dicts, flax FrozenDicts, numpy arrays and jax 0.4 arrays are unpickled.")
    teacher.add_argument("src", metavar="SRC_DIR",
                         help="the folder of <seed>.pickle files (or one pickle file: a one-run folder)")
    teacher.add_argument("dst", metavar="DST_DIR", help="the teacher folder to create (refused if it exists)")
    _data_name_option(teacher)
    teacher.set_defaults(run=run_teacher)
    kd = commands.add_parser(
        "kd", help="a KD student checkpoint (flax msgpack) -> a resnet export",
        description="Convert the reference's KD student checkpoint (flax.training.checkpoints msgpack: the "
                    "file `checkpoint`, or a folder holding it or checkpoint_<step>[/checkpoint]) into a "
                    "'resnet' export: EDFM's pretrained_resnet, a KD student in evaluate.py.")
    kd.add_argument("src", metavar="SRC", help="the checkpoint file, or the folder holding it")
    kd.add_argument("dst", metavar="DST", help="the export directory to create (refused if it exists)")
    _data_name_option(kd, " or the checkpoint's own config")
    kd.set_defaults(run=run_kd)


def _data_name_option(parser, also: str = ""):
    parser.add_argument("--data_name", default=None, metavar="NAME",
                        help=f"the data set the network was trained on (default: from the classes{also}: "
                             f"10 -> CIFAR10_x32, 100 -> CIFAR100_x32)")


def run_teacher(args: argparse.Namespace):
    runs = convert_teachers(args.src, args.dst, data_name=args.data_name)
    print(f"wrote {args.dst}: {len(runs)} teacher run{'s' * (len(runs) != 1)} ({', '.join(runs)}) from {args.src}")


def run_kd(args: argparse.Namespace):
    source = convert_kd(args.src, args.dst, data_name=args.data_name)
    print(f"wrote {args.dst} (the KD student of {source})")


# ---------------------------------------------------------------- the reference's parameter tree
def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(str, list(obj)[:8]))}{' ...' if len(obj) > 8 else ''}"
    if isinstance(obj, np.ndarray):
        return f"a {obj.dtype} array {list(obj.shape)}"
    return f"a {type(obj).__name__}"


def _param_tree(tree, what: str, source: str) -> dict:
    """{layer: {leaf: float32 array}} of a reference parameter tree ({'params': tree} accepted)."""
    if isinstance(tree, dict) and list(tree) == ["params"]:
        tree = tree["params"]
    if not isinstance(tree, dict) or not tree or not all(isinstance(v, dict) for v in tree.values()):
        raise UserError(f"{source}: {what} is not a flax parameter tree (layer -> arrays): {_describe(tree)}")
    arrays = {}
    for layer, leaves in tree.items():
        for leaf, value in leaves.items():
            if isinstance(value, str) and value.startswith("PLACEHOLDER://"):
                raise UserError(f"{source}: {what}/{layer}/{leaf} is stored outside this file (orbax's "
                                f"tensorstore layout); give the single-file msgpack checkpoint")
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise UserError(f"{source}: {what}/{layer}/{leaf} is {_describe(value)}, not a float array")
            arrays.setdefault(layer, {})[leaf] = np.asarray(value, np.float32)
    return arrays


class Layout:
    """How a reference FlaxResNet tree maps onto this project's ResNet: the network's fields and
    {reference layer name: this project's module name}."""

    def __init__(self, tree: dict, source: str):
        self.source = source
        layers = {}
        for name in tree:
            match = _LAYER.fullmatch(name)
            if not match:
                raise UserError(f"{source}: layer {name} is not one of the reference FlaxResNet's "
                                f"(Conv_i, FilterResponseNorm_i or BatchNorm_i, Dense_0)")
            layers.setdefault(match.group(1), []).append(int(match.group(2)))
        norms = [kind for kind in NORMS if kind in layers]
        if "Conv" not in layers or len(norms) != 1 or layers.get("Dense") != [0]:
            raise UserError(f"{source}: not a reference FlaxResNet: it needs Conv_i, one kind of norm "
                            f"(FilterResponseNorm_i or BatchNorm_i) and Dense_0; its layers are "
                            f"{', '.join(sorted(layers))}")
        self.norm_kind = norms[0]
        num_convs = len(layers["Conv"])
        for kind in ("Conv", self.norm_kind):
            if sorted(layers[kind]) != list(range(num_convs)):
                raise UserError(f"{source}: expected {kind}_0 .. {kind}_{num_convs - 1} (one norm after "
                                f"each conv), found {kind}_{sorted(layers[kind])}")
        stem = self._kernel(tree, "Conv_0", 4)
        if stem.shape[:2] != (3, 3) or num_convs < 2:
            raise UserError(f"{source}: Conv_0 has a {list(stem.shape)} kernel: not the CIFAR 3x3 stem "
                            f"(a first_conv stem), which this project's ResNet does not build")
        planes = stem.shape[3]
        first = self._kernel(tree, "Conv_1", 4).shape[3]
        if first % planes:
            raise UserError(f"{source}: stage 1 has {first} channels, not a whole multiple of the stem's "
                            f"{planes} (a fractional model_width)")
        width = first // planes
        projections = 2 + (width != 1)  # stages 2 and 3 always, stage 1 when widened
        blocks, rest = divmod(num_convs - 1 - projections, 6)
        if rest or blocks < 1:
            raise UserError(f"{source}: {num_convs} convolutions do not make a CIFAR ResNet of three equal "
                            f"stages (model_blocks other than (depth - 2)/6 per stage are not supported)")
        norm, activation, self.norm_leaves = NORMS[self.norm_kind]
        self.fields = {"num_classes": int(self._kernel(tree, "Dense_0", 2).shape[1]),
                       "depth": 6 * blocks + 2, "width": int(width), "planes": int(planes),
                       "norm": norm, "activation": activation, "conv_bias": "bias" in tree["Conv_0"],
                       "pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD}
        # This project's modules in the reference's call order: conv, its norm; a block's
        # projection (conv, norm) right after its second pair.
        pairs, channels = [("stem_conv", "stem_norm")], planes
        for stage in range(3):
            features = planes * 2**stage * width
            for block in range(blocks):
                name, stride = f"stage{stage}_block{block}", 2 if stage > 0 and block == 0 else 1
                pairs += [(f"{name}_conv1", f"{name}_norm1"), (f"{name}_conv2", f"{name}_norm2")]
                if channels != features or stride != 1:
                    pairs.append((f"{name}_proj_conv", f"{name}_proj_norm"))
                channels = features
        assert len(pairs) == num_convs
        self.modules = {"Dense_0": "classifier"}
        for index, (conv, norm_name) in enumerate(pairs):
            self.modules[f"Conv_{index}"] = conv
            self.modules[f"{self.norm_kind}_{index}"] = norm_name
        self.reference_names = {ours: theirs for theirs, ours in self.modules.items()}

    def _kernel(self, tree, layer: str, ndim: int):
        kernel = tree[layer].get("kernel")
        if not isinstance(kernel, np.ndarray) or kernel.ndim != ndim:
            raise UserError(f"{self.source}: {layer} has no {ndim}-d kernel: {_describe(kernel)}")
        return kernel

    def model(self):
        from models.resnet import ResNet

        return ResNet(**self.fields)

    def rename(self, tree: dict, what: str) -> dict:
        """`tree` (reference layer names) under this project's module and leaf names."""
        renamed = {}
        for layer, leaves in tree.items():
            if layer not in self.modules:
                raise UserError(f"{self.source}: {what} has a layer {layer} that its parameters do not have")
            leaf_names = self.norm_leaves if layer.startswith(self.norm_kind) else {}
            for leaf, value in leaves.items():
                renamed.setdefault(self.modules[layer], {})[leaf_names.get(leaf, leaf)] = value
        return renamed

    def check(self, model, variables: dict, image_shape, what: str):
        """Every array of `variables` where `model` has one, of its shape, and nothing left over."""
        import jax
        import jax.numpy as jnp

        expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)))
        shapes = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
                               for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        expected, found = shapes(expected), shapes(variables)
        for name in sorted(set(expected) | set(found)):
            if expected.get(name) != found.get(name):
                collection, module, leaf = name.split("/", 2)
                theirs = f"{self.reference_names.get(module, module)}/{leaf}"
                raise UserError(f"{self.source}: {what} does not fit the ResNet-{model.depth}x{model.width} its "
                                f"shapes describe: {collection} {module}/{leaf} (the reference's {theirs}) is "
                                f"{found.get(name, 'missing')} in the file, {expected.get(name, 'absent')} in "
                                f"the network")


def _data_spec(data_name, num_classes: int, stem_channels: int, source: str):
    """The registry entry of the data set the network was trained on (named, or by its classes)."""
    from data.datasets import get_spec

    data_name = data_name or DATA_BY_CLASSES.get(num_classes)
    if data_name is None:
        raise UserError(f"{source}: a {num_classes}-class network; give the data set it was trained on "
                        f"(--data_name)")
    spec = get_spec(data_name)
    if spec.num_classes != num_classes:
        raise UserError(f"{source}: a {num_classes}-class network, but {data_name} has {spec.num_classes} "
                        f"classes; pass the right --data_name")
    if spec.image_shape[-1] != stem_channels:
        raise UserError(f"{source}: the network reads {stem_channels}-channel images, {data_name} has "
                        f"{spec.image_shape[-1]}")
    return spec


def _counter(value):
    """An int of a scalar counter (jax/numpy scalar or 0-d array), else None."""
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1 and value.dtype.kind in "iu":
        return int(value.reshape(()))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refuse_existing(dst: str):
    if os.path.lexists(dst):
        raise UserError(f"{dst} already exists; not overwriting it (give a new directory)")


# ------------------------------------------------------------------------------- teachers
def teacher_files(src: str) -> list[str]:
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise UserError(f"{src}: no such file or directory")
    files = sorted(os.path.join(src, name) for name in os.listdir(src) if name.endswith(PICKLE_SUFFIXES))
    if not files:
        raise UserError(f"{src} holds no teacher pickle (<seed>.pickle, as the reference's checkpoints_teacher/c10)")
    return files


def read_teacher(path: str) -> dict:
    """The `swag_state` dict of a reference teacher pickle (its fields read by name)."""
    checkpoint = load_pickle(path)
    state = checkpoint.get("swag_state") if isinstance(checkpoint, dict) else None
    if state is None and isinstance(checkpoint, dict) and {"mean", "params2"} <= set(checkpoint):
        state = checkpoint  # the SWAG state itself
    if not isinstance(state, dict) or not {"mean", "params2"} <= set(state):
        found = _describe(state if isinstance(state, dict) else checkpoint)
        raise UserError(f"{path} is not a reference MultiSWAG teacher: expected {{'swag_state': {{'mean', "
                        f"'params2', ...}}}} (diagonal SWAG moments), found {found}")
    return state


def convert_teacher_run(path: str, data_name=None):
    """(model, arrays {'mean', 'params2'}, sidecar) of one reference teacher pickle."""
    from models.resnet import resnet_spec
    from utils.teachers import TEACHER_KIND

    state = read_teacher(path)
    mean = _param_tree(state["mean"], "swag_state/mean", path)
    params2 = _param_tree(state["params2"], "swag_state/params2", path)
    layout = Layout(mean, path)
    if layout.fields["norm"] != "frn":
        raise UserError(f"{path}: a BatchNorm teacher; its SWAG samples need recomputed batch statistics, "
                        f"which a swag_teacher export does not carry (FRN teachers only)")
    mirror = lambda tree: {(layer, leaf): value.shape for layer, leaves in tree.items()
                           for leaf, value in leaves.items()}
    if mirror(params2) != mirror(mean):
        differ = sorted(set(mirror(params2).items()) ^ set(mirror(mean).items()))[0][0]
        raise UserError(f"{path}: swag_state/params2 does not mirror swag_state/mean (at {'/'.join(differ)})")
    model = layout.model()
    spec = _data_spec(data_name, model.num_classes, int(mean["Conv_0"]["kernel"].shape[2]), path)
    arrays = {"mean": layout.rename(mean, "swag_state/mean"), "params2": layout.rename(params2, "swag_state/params2")}
    for key in ("mean", "params2"):
        layout.check(model, {"params": arrays[key]}, spec.image_shape, f"swag_state/{key}")
    counters = {key: _counter(state.get(key)) for key in ("step", "n", "train_step")}
    run = os.path.splitext(os.path.basename(path))[0]
    sidecar = {"kind": TEACHER_KIND, "model": resnet_spec(model), "num_classes": model.num_classes,
               "data_name": spec.name, "trained_by": f"{REFERENCE} sgd_swag.py (converted)",
               "method": "MultiSWAG run (EDFM reference)",
               "source": {"file": os.path.abspath(path), "sha256": file_sha256(path),
                          "format": "EDFM reference teacher pickle",
                          "converter": "python -m utils.convert edfm-ref teacher",
                          **{key: value for key, value in counters.items() if value is not None}}}
    if counters["n"] is not None:
        sidecar["num_snapshots"] = counters["n"]
    if run.isdigit():
        sidecar["seed"] = int(run)
    return model, arrays, sidecar


def _missing_ancestor(path: str):
    """The outermost directory above `path` that does not exist yet (None if its parent exists)."""
    missing, parent = None, os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing, parent = parent, os.path.dirname(parent)
    return missing


def convert_teachers(src: str, dst: str, data_name=None) -> list[str]:
    """Convert every teacher pickle of `src` into the teacher folder `dst` (one run per pickle,
    named as the file); returns the run names. Written into a temporary folder renamed into
    place once every run is converted: a refused file leaves nothing behind."""
    from utils.checkpoints import save_export

    _refuse_existing(dst)
    files = teacher_files(src)
    runs = [os.path.splitext(os.path.basename(path))[0] for path in files]
    if len(set(runs)) != len(runs):
        twice = sorted(run for run in runs if runs.count(run) > 1)[0]
        raise UserError(f"{src}: two pickles are run {twice} (e.g. {twice}.pickle and {twice}.pkl)")
    missing = _missing_ancestor(dst)
    partial = f"{os.path.abspath(dst)}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        first = None
        for path, run in zip(files, runs):
            model, arrays, sidecar = convert_teacher_run(path, data_name)
            if first is not None and sidecar["model"] != first[1]["model"]:
                raise UserError(f"{path} is another architecture than {first[0]}: the runs of one teacher "
                                f"folder share theirs")
            first = first or (path, sidecar)
            save_export(os.path.join(partial, run, "model"), arrays, sidecar)
        os.replace(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if missing is not None:
            shutil.rmtree(missing, ignore_errors=True)  # only the empty folders made above dst
        raise
    return runs


# ------------------------------------------------------------------------------ KD student
def kd_checkpoint_file(src: str) -> str:
    """The msgpack file `src` names: itself, its `checkpoint`, or its newest checkpoint_<step>
    (a file, or a folder holding `checkpoint`)."""
    if os.path.isfile(src):
        return src
    if not os.path.isdir(src):
        raise UserError(f"{src}: no such file or directory")
    if os.path.isfile(os.path.join(src, "checkpoint")):
        return os.path.join(src, "checkpoint")
    steps = {}
    for name in os.listdir(src):
        match = re.fullmatch(r"checkpoint_(\d+)", name)
        path = os.path.join(src, name)
        path = path if os.path.isfile(path) else os.path.join(path, "checkpoint")
        if match and os.path.isfile(path):
            steps[int(match.group(1))] = path
    if not steps:
        raise UserError(f"{src} holds no KD checkpoint: expected a file `checkpoint` or checkpoint_<step> "
                        f"(a file, or a folder holding `checkpoint`)")
    return steps[max(steps)]


def read_msgpack(path: str) -> dict:
    from flax import serialization

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or first_line(error)}") from None
    try:
        restored = serialization.msgpack_restore(data)
    except Exception as error:  # msgpack raises many types for a file that is not msgpack
        raise UserError(f"{path} is not a flax msgpack checkpoint: {first_line(error)}") from None
    if not isinstance(restored, dict):
        raise UserError(f"{path} is not a flax checkpoint: it holds {_describe(restored)}, not a dict")
    return restored


def convert_kd(src: str, dst: str, data_name=None) -> str:
    """Convert the reference's KD checkpoint `src` into the "resnet" export `dst`; returns the
    file read."""
    from utils.checkpoints import resnet_export, save_export

    _refuse_existing(dst)
    path = kd_checkpoint_file(src)
    checkpoint = read_msgpack(path)
    model_entry = checkpoint.get("model")
    holder = model_entry if isinstance(model_entry, dict) and "params" in model_entry else checkpoint
    if "params" not in holder:
        raise UserError(f"{path} is not a reference KD checkpoint: no `params` at its top level or under "
                        f"`model` ({_describe(checkpoint)})")
    params = _param_tree(holder["params"], "params", path)
    layout = Layout(params, path)
    model = layout.model()
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    saved_data = config.get("data_name") if isinstance(config.get("data_name"), str) else None
    spec = _data_spec(data_name or saved_data, model.num_classes, int(params["Conv_0"]["kernel"].shape[2]), path)
    variables = {"params": layout.rename(params, "params")}
    batch_stats = holder.get("batch_stats") or None
    if layout.fields["norm"] == "bn":
        if batch_stats is None:
            raise UserError(f"{path}: a BatchNorm network without its batch_stats")
        variables["batch_stats"] = layout.rename(_param_tree(batch_stats, "batch_stats", path), "batch_stats")
    elif batch_stats is not None:
        raise UserError(f"{path}: an FRN network with batch_stats ({_describe(batch_stats)}), which it does not use")
    layout.check(model, variables, spec.image_shape, "the checkpoint")
    arrays, sidecar = resnet_export(model, variables["params"],
                                    {key: value for key, value in variables.items() if key != "params"})
    source = {"file": os.path.abspath(path), "sha256": file_sha256(path),
              "format": "EDFM reference KD checkpoint (flax msgpack)", "converter": "python -m utils.convert edfm-ref kd"}
    best_acc = checkpoint.get("best_acc")
    if isinstance(best_acc, (np.ndarray, np.generic, float, int)) and np.size(best_acc) == 1:
        source["best_acc"] = float(np.asarray(best_acc).reshape(()))
    for key in ("baseline_method", "seed", "optim_ne"):
        if isinstance(config.get(key), (str, int, float)) and not isinstance(config.get(key), bool):
            source[key] = config[key]
    info = {"data_name": spec.name, "method": f"KD ResNet-{model.depth}x{model.width} (EDFM reference)",
            "trained_by": f"{REFERENCE} kd_and_endd.py (converted)", "source": source}
    if isinstance(config.get("seed"), int):
        info["seed"] = config["seed"]
    save_export(dst, arrays, {**sidecar, **info})
    return path
