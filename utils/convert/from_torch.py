"""PyTorch checkpoints of the zoo (RepDistiller/CRD's CIFAR networks; torchvision's ImageNet
ResNets/ResNeXts, GenDD's ImageNet MobileNetV1 and its BEiT-v2 teachers) -> the project's "resnet"
export.

    python -m utils.convert torch ckpt_epoch_240.pth runs/teachers/resnet110 --arch resnet110
    python -m utils.convert torch resnet50-19c8e357.pth runs/teachers/resnet50 --arch resnet50

Reads `{'model': state_dict, ...}` (CRD/RepDistiller's `torch.save`), `{'state_dict': ...}`,
`{'module': ...}` or a bare state dict, with or without DataParallel's `module.` prefix, tensors
saved on any device.
Every tensor is placed by name: the zoo's parameter names are the PyTorch keys with '.' -> '_'
(models/zoo/base.py; a nested Flax module, as BEiT's `blocks_0/attn/qkv`, counts as its path
joined by '_'), and the classifier (`fc`, `linear`, `classifier` or `classifier.0` by CNN, which
GenDD renames all `fc`; BEiT's `head`) is the zoo's `classifier`. Conv weights OIHW ->
HWIO, linear weights transposed, BatchNorm/LayerNorm weight/bias (and BatchNorm's
running_mean/running_var) -> scale/bias (and the batch_stats mean/var); a module's own tensors
(BEiT's `cls_token`, `attn.q_bias`, `attn.relative_position_bias_table`, `gamma_1`) keep their
layout. Buffers the network derives itself (`num_batches_tracked`, BEiT's
`relative_position_index`) are dropped. The conversion is refused, in one line, unless every
other tensor is used and every parameter of the network is filled with the right shape.

torch is needed only here, to unpickle the file, and is imported when a file is read.
"""
import argparse
import os
import re

import jax
import numpy as np
from flax import traverse_util

from utils.convert import file_sha256
from utils.errors import UserError

# PyTorch module names of the classifier, by architecture; all become the zoo's `classifier`.
CLASSIFIER_NAMES = ("fc", "linear", "classifier", "classifier.0", "head")
# Buffers in state dicts that the networks compute themselves: BatchNorm's step counter, BEiT's
# relative position index (fixed by its patch grid; models/zoo/beit.py).
DERIVED_BUFFERS = ("num_batches_tracked", "relative_position_index")
# PyTorch BatchNorm (or LayerNorm: weight and bias only) tensor -> (flax collection, leaf).
BATCH_NORM_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                     "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
DEFAULT_DATA_NAME = "CIFAR100_x32"  # RepDistiller's teachers are CIFAR-100 networks
# Data sets a converted network may name that data/ cannot load (yet): name -> (classes, image shape).
# The name is recorded in the sidecar; the zoo's ImageNet members default to it (default_data_name).
EXTERNAL_DATA = {"imagenet2012": (1000, (224, 224, 3))}


def add_command(subparsers):
    """The `torch` subcommand of `python -m utils.convert`."""
    from models.zoo import model_names

    parser = subparsers.add_parser(
        "torch", help="a PyTorch checkpoint (.pth) of a zoo network -> a resnet export",
        description="Convert a PyTorch state dict of a zoo network (RepDistiller/CRD's CIFAR zoo, the teachers "
                    "GenDD distills from; torchvision's ImageNet ResNets/ResNeXts; GenDD's ImageNet "
                    "MobileNetV1 and BEiT-v2 teachers) into the project's 'resnet' export, loadable as a "
                    "KD student, EDFM backbone (pretrained_resnet), GenDD teacher (teacher_dir) or by "
                    "evaluate.py. Needs torch to read the file.")
    parser.add_argument("src", metavar="SRC", help="the .pth file: {'model': state_dict, ...} or a state dict")
    parser.add_argument("dst", metavar="DST", help="the export directory to create (refused if it exists)")
    parser.add_argument("--arch", required=True, metavar="NAME",
                        help=f"the network; one of {', '.join(model_names())} (RepDistiller's names "
                             f"vgg8..vgg19 and MobileNetV2, and GenDD's MobileNetV1 and beitv2_*_1k, "
                             f"are accepted too)")
    parser.add_argument("--num_classes", type=int, default=None, metavar="N",
                        help="the classes (default: the classifier's output size in SRC)")
    parser.add_argument("--data_name", default=None, metavar="NAME",
                        help=f"the data set the network was trained on (default {DEFAULT_DATA_NAME} for the "
                             f"CIFAR zoo, {', '.join(EXTERNAL_DATA)} for the ImageNet networks)")
    parser.add_argument("--pixel_mean", type=float, nargs="+", default=None, metavar="M",
                        help="per-channel mean the network standardizes its [0, 1] input with "
                             "(default the network's: RepDistiller's CIFAR-100 0.5071 0.4867 0.4408 for "
                             "the CIFAR zoo, ImageNet's 0.485 0.456 0.406 for the ImageNet networks)")
    parser.add_argument("--pixel_std", type=float, nargs="+", default=None, metavar="S",
                        help="per-channel std (default the network's: 0.2675 0.2565 0.2761 for the CIFAR "
                             "zoo, 0.229 0.224 0.225 for the ImageNet networks)")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="unpickle arbitrary objects in SRC (runs code from the file: only for files "
                             "you trust); by default only tensors, containers and argparse Namespaces load")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace):
    convert_torch(args.src, args.dst, args.arch, num_classes=args.num_classes, data_name=args.data_name,
                  pixel_mean=args.pixel_mean, pixel_std=args.pixel_std, trust_pickle=args.trust_pickle)
    print(f"wrote {args.dst} ({args.arch} from {args.src})")


# ------------------------------------------------------------------------------ reading .pth
def load_torch_file(path: str, trust_pickle: bool = False):
    """The unpickled object of a torch.save file, tensors on the CPU."""
    try:
        import torch
    except ImportError:
        raise UserError("reading a PyTorch checkpoint needs torch: pip install torch") from None
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        # CRD's *_last.pth files also pickle the training options (an argparse Namespace).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; name the file and cause
        message = " ".join(str(error).split())
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe:
            raise UserError(f"{path} holds a pickled {unsafe.group(1)}, not only tensors and containers; "
                            f"if you trust the file (unpickling runs its code), pass --trust_pickle") from None
        detail = message.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()
        raise UserError(f"{path} is not a readable PyTorch checkpoint: {detail[:200]}") from None


def find_state_dict(checkpoint, path: str = "checkpoint") -> dict:
    """{key: numpy array} of the state dict in a loaded checkpoint: its 'model' (CRD/RepDistiller,
    unilm's BEiT), 'state_dict' or 'module' (unilm's other key) entry or the object itself;
    DataParallel's `module.` prefix removed."""
    def is_state_dict(obj):
        return isinstance(obj, dict) and obj and all(hasattr(v, "detach") for v in obj.values())

    state = None
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "module"):
            if is_state_dict(checkpoint.get(key)):
                state = checkpoint[key]
                break
        else:
            if is_state_dict(checkpoint):
                state = checkpoint
    if state is None:
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{path} holds no state dict (expected a dict of tensors, or one under 'model', "
                        f"'state_dict' or 'module'; found {found})")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: value.detach().cpu().float().numpy() if value.is_floating_point() else value.numpy()
            for key, value in state.items()}


# --------------------------------------------------------------------------- placing tensors
def _flax_place(torch_key: str) -> tuple[str, str]:
    """(flax module name, PyTorch tensor name) of a state-dict key."""
    module, _, tensor = torch_key.rpartition(".")
    if module in CLASSIFIER_NAMES:
        return "classifier", tensor
    return module.replace(".", "_"), tensor


def _torch_key(path: tuple, nested: bool) -> str:
    """The state-dict key that fills the flax variable at `path` (collection, modules..., leaf).
    A flat network's names have '_' only where PyTorch's have '.'; a nested one's (BEiT) modules
    are PyTorch's, a list's members named `<list>_<i>`."""
    modules, leaf = path[1:-1], path[-1]
    if modules == ("classifier",):
        return f"{' or '.join(CLASSIFIER_NAMES)}.{'weight' if leaf == 'kernel' else leaf}"
    tensor = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    if nested:
        modules = [re.sub(r"_(\d+)$", r".\1", name) for name in modules]
    else:
        modules = [name.replace("_", ".") for name in modules]
    return ".".join([*modules, tensor])


def _layout(value: np.ndarray) -> np.ndarray:
    """PyTorch weight layout -> flax: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def state_dict_to_variables(state: dict, like: dict, arch: str, source: str = "checkpoint") -> dict:
    """The flax variables {'params', 'batch_stats'} shaped as `like` (shapes or arrays) from a
    PyTorch state dict; UserError (one line) unless every tensor is used and every leaf filled."""
    like = jax.tree.map(np.shape, like)
    modules = {}  # flax module path joined by '_' -> {(collection, leaf): shape}, in the network's order
    paths = {}  # (collection, module, leaf) -> the variable's path (collection, modules..., leaf)
    for collection in sorted(like, key=lambda name: name != "params"):
        for path, shape in traverse_util.flatten_dict(like[collection]).items():
            module, leaf = "_".join(path[:-1]), path[-1]
            modules.setdefault(module, {})[(collection, leaf)] = shape
            paths[(collection, module, leaf)] = (collection, *path)
    nested = any(len(path) > 3 for path in paths.values())
    filled, filled_by, unused, problems = {}, {}, [], []
    for key, value in state.items():
        if key.rpartition(".")[2] in DERIVED_BUFFERS:
            continue
        module, tensor = _flax_place(key)
        leaves = modules.get(module)
        if leaves is None:
            unused.append(key)
            continue
        if ("params", "scale") in leaves:  # a BatchNorm or LayerNorm
            place = BATCH_NORM_LEAVES.get(tensor)
        elif tensor in ("weight", "bias") and ("params", "kernel") in leaves:  # a conv or linear layer
            place = ("params", "kernel" if tensor == "weight" else "bias")
            value = _layout(value)
        else:  # a tensor of the module itself (BEiT's cls_token, q_bias, gamma_1, ...), layout kept
            place = ("params", tensor)
        if place not in leaves:
            unused.append(key)
            continue
        target = (place[0], module, place[1])
        name = "/".join(paths[target][1:])
        expected = tuple(leaves[place])
        if value.shape != expected:
            problems.append(f"tensor {key} has shape {tuple(state[key].shape)}, but {arch}'s "
                            f"{name} needs {expected} in flax's layout")
            continue
        if target in filled:  # e.g. both `fc.weight` and `linear.weight`
            problems.append(f"tensors {filled_by[target]} and {key} both fill {name}")
            continue
        filled[target], filled_by[target] = value.astype(np.float32), key
    missing = [paths[(collection, module, leaf)] for module, leaves in modules.items()
               for (collection, leaf) in leaves if (collection, module, leaf) not in filled]
    counts = f"{len(problems)} shape mismatches, {len(unused)} unused tensors, {len(missing)} unfilled arrays"
    if problems:
        raise UserError(f"{source} does not fit --arch {arch}: {problems[0]} ({counts})")
    if unused:
        raise UserError(f"{source} does not fit --arch {arch}: tensor {unused[0]} has no place in it "
                        f"({counts})")
    if missing:
        raise UserError(f"{source} does not fit --arch {arch}: nothing in the file for "
                        f"{'/'.join(missing[0][1:])} (PyTorch's {_torch_key(missing[0], nested)}) ({counts})")
    return traverse_util.unflatten_dict({paths[target]: value for target, value in filled.items()})


def _classifier_classes(state: dict) -> int | None:
    for name in CLASSIFIER_NAMES:
        bias = state.get(f"{name}.bias")
        if bias is not None and bias.ndim == 1:
            return int(bias.shape[0])
    return None


def _data_shape(data_name: str) -> tuple[int, tuple]:
    """(classes, image shape (H, W, C)) of `data_name`: data/'s data sets and EXTERNAL_DATA."""
    from data.datasets import get_spec

    if data_name in EXTERNAL_DATA:
        return EXTERNAL_DATA[data_name]
    try:
        spec = get_spec(data_name)
    except UserError as error:
        raise UserError(f"{error}; or, for a converted network, {', '.join(EXTERNAL_DATA)}") from None
    return spec.num_classes, tuple(spec.image_shape)


def convert_torch(src: str, dst: str, arch: str, num_classes: int | None = None,
                  data_name: str | None = None, pixel_mean=None, pixel_std=None,
                  trust_pickle: bool = False) -> str:
    """Convert the PyTorch checkpoint `src` of zoo network `arch` into the export `dst`; returns dst.
    `data_name` defaults to the network's (`default_data_name`: ImageNet's for the ImageNet
    members), else DEFAULT_DATA_NAME."""
    from models.zoo import build_model, canonical_arch, variable_shapes
    from utils.checkpoints import resnet_export, save_export

    if os.path.lexists(dst):
        raise UserError(f"{dst} already exists; not overwriting it (give a new export directory)")
    try:
        arch = canonical_arch(arch)
    except ValueError as error:
        raise UserError(f"--arch: {error}") from None
    network = build_model(arch, 1)
    data_name = data_name or getattr(network, "default_data_name", DEFAULT_DATA_NAME)
    data_classes, image_shape = _data_shape(data_name)
    size = getattr(network, "input_size", None)  # a network that takes one input size only
    if size is not None and image_shape[:2] != (size, size):
        raise UserError(f"--arch {arch} takes {size}x{size} images only, but {data_name}'s are "
                        f"{image_shape[0]}x{image_shape[1]}")
    for name, stats in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        if stats is not None and len(stats) != image_shape[-1]:
            raise UserError(f"--{name} needs {image_shape[-1]} values for {data_name}, got {len(stats)}")
    checkpoint = load_torch_file(src, trust_pickle)
    state = find_state_dict(checkpoint, src)
    file_classes = _classifier_classes(state)
    num_classes = num_classes or file_classes
    if num_classes is None:
        raise UserError(f"{src}: no classifier bias ({', '.join(CLASSIFIER_NAMES)}) to read the classes "
                        f"from; pass --num_classes")
    if num_classes != data_classes:
        raise UserError(f"{src}: a {num_classes}-class network, but {data_name} has {data_classes} "
                        f"classes; pass the right --data_name")
    fields = {name: tuple(stats) for name, stats in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std))
              if stats is not None}
    model = build_model(arch, num_classes, **fields)
    variables = state_dict_to_variables(state, variable_shapes(model, image_shape), arch, src)
    model_state = {name: tree for name, tree in variables.items() if name != "params"}  # batch_stats, if any
    arrays, sidecar = resnet_export(model, variables["params"], model_state)
    source = {"file": os.path.abspath(src), "sha256": file_sha256(src), "format": "pytorch state dict",
              "converter": "python -m utils.convert torch"}
    if isinstance(checkpoint, dict):  # CRD/RepDistiller record these beside the weights
        for key in ("epoch", "accuracy", "best_acc"):
            value = checkpoint.get(key)
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, (int, float)):
                source[key] = value
    save_export(dst, arrays, {**sidecar, "data_name": data_name, "method": f"PyTorch {arch}", "source": source})
    return dst
