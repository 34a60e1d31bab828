"""`python -m utils.convert edfm-ref`: the EDFM reference's (Park-Jong-Geon/EDFM) MultiSWAG teacher
pickles and KD checkpoints become this project's exports computing what the reference's network
computes; pickles are read without trusting their globals; the reference's own YAMLs parse.

The reference network is rebuilt here as the reference defines it (models/resnet.py's FlaxResNet
with giung2's FilterResponseNorm and Swish, or its BN-ReLU style: flax auto-named layers in call
order, convs with biases, 'SAME' padding, pixel mean (0.49, 0.48, 0.44) and std 0.2, input
image/255). A flax module (ReferenceResNet) only creates the reference-format parameter tree, with
random weights and non-trivial FRN/BatchNorm parameters; the expected logits come from an
independent float64 NumPy forward (numpy_reference_logits) that reads that tree by the reference's
layer names and computes convolutions and TF/flax 'SAME' padding itself. The reference's files are
written as the reference's code writes them: teacher pickles (protocol 4) whose leaves are jax
0.4.x Arrays (unpickling calls `jax._src.array._reconstruct_array` with numpy 1.x's reconstruct
arguments and a `named_shape`) under a flax FrozenDict, or plain numpy arrays; KD checkpoints as
flax msgpack."""
import functools
import os
import pickle
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from flax.core.frozen_dict import FrozenDict

from utils.checkpoints import load_resnet
from utils.config import parse_config
from utils.convert.__main__ import main
from utils.errors import UserError
from utils.teachers import load_teachers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Exact copies of Park-Jong-Geon/EDFM@1e5d4cd config/{teacher,distillation}/*.yaml.
REFERENCE_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edfm_ref_yaml")
REF_MEAN, REF_STD = (0.49, 0.48, 0.44), (0.2, 0.2, 0.2)
FRN_LEAVES = {"gamma": "scale", "beta": "bias", "tau": "threshold"}


# ------------------------------------------------------------------ the reference's network
class FilterResponseNorm(nn.Module):
    """giung2's FRN; the class name gives the reference's auto-names FilterResponseNorm_i."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (channels,))
        beta = self.param("beta", nn.initializers.zeros, (channels,))
        tau = self.param("tau", nn.initializers.zeros, (channels,))
        nu2 = jnp.mean(jnp.square(x), axis=(1, 2), keepdims=True)
        return jnp.maximum(gamma * (x * jax.lax.rsqrt(nu2 + self.epsilon)) + beta, tau)


class ReferenceResNet(nn.Module):
    """The reference's FlaxResNet: FRN-Swish (convs with bias) or BN-ReLU (convs without). Used
    only for the shapes and auto-names of its parameter tree; no expected logit comes from it."""

    depth: int
    width: int
    num_classes: int
    planes: int = 16
    style: str = "FRN-Swish"

    @nn.compact
    def __call__(self, x):
        bn = self.style == "BN-ReLU"
        conv = functools.partial(nn.Conv, use_bias=not bn, padding="SAME")
        norm = (functools.partial(nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=1e-5)
                if bn else FilterResponseNorm)
        act = nn.relu if bn else nn.swish
        y = (x - jnp.asarray(REF_MEAN)) / jnp.asarray(REF_STD)
        y = act(norm()(conv(self.planes, (3, 3))(y)))
        for stage in range(3):
            features = self.planes * 2**stage * self.width
            for block in range((self.depth - 2) // 6):
                stride = (2, 2) if stage > 0 and block == 0 else (1, 1)
                residual = y
                y = act(norm()(conv(features, (3, 3), strides=stride)(y)))
                y = norm()(conv(features, (3, 3))(y))
                if residual.shape != y.shape:
                    residual = norm()(conv(features, (1, 1), strides=stride)(residual))
                y = act(y + residual)
        return nn.Dense(self.num_classes)(jnp.mean(y, axis=(1, 2)))


# -------------------------------------------------- an independent NumPy forward of that network
def same_padding(size: int, kernel: int, stride: int):
    """TF/flax 'SAME': out = ceil(in / stride), pad_total = max((out − 1)·stride + k − in, 0),
    before = total // 2, after = the rest (a stride-2 3×3 conv on 32 px pads (0, 1))."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


def numpy_conv(x, kernel, bias, stride):
    """NHWC ⊛ HWIO in float64: a sum over the kernel's taps of strided slices of the padded input."""
    (kh, kw), n = kernel.shape[:2], x.shape[0]
    out_h, pad_h = same_padding(x.shape[1], kh, stride)
    out_w, pad_w = same_padding(x.shape[2], kw, stride)
    x = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    y = np.zeros((n, out_h, out_w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            taps = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            y += np.einsum("nhwc,cd->nhwd", taps, kernel[i, j])
    return y if bias is None else y + bias


def numpy_reference_logits(params, images_u8, depth=8, batch_stats=None):
    """The reference's FlaxResNet in NumPy (float64) on uint8 NHWC images, reading its parameter
    tree by the reference's own names: FRN-Swish (`Conv_i/{kernel,bias}`,
    `FilterResponseNorm_i/{gamma,beta,tau}`), or BN-ReLU when batch_stats is given (bias-free convs,
    `BatchNorm_i/{scale,bias}` and `{mean,var}`, ε 1e-5 as flax's BatchNorm), then `Dense_0`.
    Layer indices are counted as flax auto-names them, in the order the reference's __call__ calls
    the layers: stem conv/norm; per block conv1/norm1, conv2/norm2, and then, if the residual's
    shape differs, the projection conv/norm; channel counts come from the kernels read."""
    tree = {layer: {leaf: np.asarray(value, np.float64) for leaf, value in leaves.items()}
            for layer, leaves in params.items()}
    stats = None if batch_stats is None else {
        layer: {leaf: np.asarray(value, np.float64) for leaf, value in leaves.items()}
        for layer, leaves in batch_stats.items()}
    used = {"Conv": 0, "Norm": 0}

    def conv(x, size, stride=1):
        layer = tree[f"Conv_{used['Conv']}"]
        used["Conv"] += 1
        assert layer["kernel"].shape[:3] == (size, size, x.shape[-1]), layer["kernel"].shape
        assert ("bias" in layer) == (stats is None)  # FRN-Swish convs have biases, BN-ReLU's none
        return numpy_conv(x, layer["kernel"], layer.get("bias"), stride)

    def norm(x):
        index = used["Norm"]
        used["Norm"] += 1
        if stats is not None:
            layer, moments = tree[f"BatchNorm_{index}"], stats[f"BatchNorm_{index}"]
            return ((x - moments["mean"]) / np.sqrt(moments["var"] + 1e-5) * layer["scale"]
                    + layer["bias"])
        layer = tree[f"FilterResponseNorm_{index}"]
        nu2 = np.mean(np.square(x), axis=(1, 2), keepdims=True)
        return np.maximum(layer["gamma"] * x / np.sqrt(nu2 + 1e-6) + layer["beta"], layer["tau"])

    def act(x):
        return np.maximum(x, 0.0) if stats is not None else x / (1.0 + np.exp(-x))

    x = np.asarray(images_u8, np.float64) / 255.0
    y = (x - np.asarray(REF_MEAN)) / np.asarray(REF_STD)
    y = act(norm(conv(y, 3)))
    for stage in range(3):
        for block in range((depth - 2) // 6):
            stride = 2 if stage > 0 and block == 0 else 1
            residual = y
            y = act(norm(conv(y, 3, stride)))
            y = norm(conv(y, 3))
            if residual.shape != y.shape:
                residual = norm(conv(residual, 1, stride))
            y = act(y + residual)
    convs = sum(layer.startswith("Conv_") for layer in tree)
    assert used["Conv"] == used["Norm"] == convs == len(tree) - convs - 1, (used, sorted(tree))
    dense = tree["Dense_0"]
    return np.mean(y, axis=(1, 2)) @ dense["kernel"] + dense["bias"]


def assert_logits_match(logits, expected):
    """The converted export's float32 logits against the float64 NumPy forward, ~1e-4 relative."""
    scale = np.abs(expected).max()
    assert scale > 0.5  # a network whose logits say something
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)


def random_variables(model, seed):
    """Random weights, and FRN/BatchNorm parameters and statistics far from their init (ones
    and zeros would hide a swapped or dropped array)."""
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        offsets = {"gamma": 1.0, "scale": 1.0, "tau": -0.3, "var": 1.0}
        spread = {"var": 0.5}.get(name, 0.3 if name in offsets or name == "beta" else 0.1)
        value = offsets.get(name, 0.0) + spread * rng.normal(size=shape)
        return np.abs(value) if name == "var" else value

    return jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32), variables)


def our_names(width: int) -> dict:
    """The reference's layer names -> this project's, for a depth-8 net, written out by hand: a
    projection conv comes right after its block's second conv; stage 1 has one only if widened."""
    pairs = [("stem_conv", "stem_norm")]
    for stage in range(3):
        block = f"stage{stage}_block0"
        pairs += [(f"{block}_conv1", f"{block}_norm1"), (f"{block}_conv2", f"{block}_norm2")]
        if stage > 0 or width != 1:
            pairs.append((f"{block}_proj_conv", f"{block}_proj_norm"))
    names = {"Dense_0": "classifier"}
    for index, (conv, norm) in enumerate(pairs):
        names.update({f"Conv_{index}": conv, f"FilterResponseNorm_{index}": norm, f"BatchNorm_{index}": norm})
    return names


def renamed(tree, width):
    names = our_names(width)
    return {names[layer]: {FRN_LEAVES.get(leaf, leaf) if layer.startswith("Filter") else leaf: value
                           for leaf, value in leaves.items()} for layer, leaves in tree.items()}


IMAGES_U8 = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
IMAGES = (IMAGES_U8 / 255.0).astype(np.float32)  # what this project's models take, as the reference


# ---------------------------------------------------------------- the reference's files
def _jax04_reconstruct(fun, args, arr_state, aval_state):
    """Stands in for jax 0.4's jax._src.array._reconstruct_array when pickling (never called)."""
    raise AssertionError("only its name is pickled")


class Jax04Array:
    """Pickles as jax 0.4.x pickles a jax Array: _reconstruct_array(numpy's reconstruct, its
    arguments, the array state, {'weak_type', 'named_shape'})."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def __reduce__(self):
        rebuild, args, state = self.value.__reduce__()
        return _jax04_reconstruct, (rebuild, args, state, {"weak_type": False, "named_shape": {}})


# Globals written under the names jax 0.4.3 and numpy 1.26 (the reference's environment) used.
_GLOBAL_NAMES = {id(_jax04_reconstruct): ("jax._src.array", "_reconstruct_array"),
                 id(np.ndarray.__reduce__(np.zeros(1))[0]): ("numpy.core.multiarray", "_reconstruct"),
                 id(np.int32(0).__reduce__()[0]): ("numpy.core.multiarray", "scalar")}


class ReferencePickler(pickle._Pickler):
    """The pure-Python pickler, writing the globals above under their old names."""

    def save_global(self, obj, name=None):
        names = _GLOBAL_NAMES.get(id(obj))
        if names is None:
            return super().save_global(obj, name)
        for part in names:
            self.save(part)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[types.FunctionType] = save_global


def write_jax04_pickle(path, swag_state):
    frozen = lambda tree: FrozenDict(jax.tree.map(Jax04Array, tree))
    state = {"mean": frozen(swag_state["mean"]), "params2": frozen(swag_state["params2"]),
             "step": Jax04Array(np.int32(0)), "n": Jax04Array(np.int32(32000)),
             "train_step": Jax04Array(np.int32(160000)), "swa_batch_stats": None}
    with open(path, "wb") as f:
        ReferencePickler(f, protocol=4).dump({"swag_state": state})


def swag_moments(params, seed):
    """(mean, params2) with params2 = mean² + var, var ≥ 0 except a few entries pushed below
    mean² (float noise in the reference's running moments), which the loader clamps."""
    rng = np.random.default_rng(seed)

    def second_moment(mean):
        value = np.square(mean) + np.square(0.02 * rng.normal(size=mean.shape)).astype(np.float32)
        value.reshape(-1)[:2] = np.square(mean).reshape(-1)[:2] - 1e-4
        return value.astype(np.float32)

    return params, jax.tree.map(second_moment, params)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two runs of the reference's R8x2 FRN-Swish CIFAR-10 teacher: 2.pickle written as the
    reference's files are (jax 0.4 Arrays under a FrozenDict), 5.pickle with plain numpy leaves."""
    model = ReferenceResNet(depth=8, width=2, num_classes=10)
    src = tmp_path_factory.mktemp("edfm_ref") / "c10"
    src.mkdir()
    runs = {}
    for seed in (2, 5):
        mean, params2 = swag_moments(random_variables(model, seed)["params"], seed)
        if seed == 2:
            write_jax04_pickle(src / "2.pickle", {"mean": mean, "params2": params2})
        else:
            with open(src / "5.pickle", "wb") as f:
                pickle.dump({"swag_state": {"mean": mean, "params2": params2, "step": np.int32(0),
                                            "n": np.int32(800), "train_step": np.int32(9000),
                                            "swa_batch_stats": None}}, f, protocol=4)
        runs[str(seed)] = {"mean": mean, "params2": params2,
                           "logits": numpy_reference_logits(mean, IMAGES_U8)}
    return {"src": str(src), "runs": runs}


def convert_fails(capsys, *argv) -> str:
    """Run the CLI expecting bad input: exit 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(["edfm-ref", *map(str, argv)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -------------------------------------------------------------------------------- teachers
def test_reference_teacher_pickles_become_a_teacher_folder(teachers, tmp_path):
    with open(os.path.join(teachers["src"], "2.pickle"), "rb") as f:
        data = f.read()
    for name in (b"jax._src.array", b"_reconstruct_array", b"numpy.core.multiarray", b"named_shape",
                 b"flax.core.frozen_dict"):
        assert name in data  # written as the reference's files are
    with pytest.raises(TypeError, match="named_shape"):
        pickle.loads(data)  # the trap: current jax's _reconstruct_array rejects named_shape

    dst = tmp_path / "teachers"
    main(["edfm-ref", "teacher", teachers["src"], str(dst)])
    assert sorted(os.listdir(dst)) == ["2", "5"]
    ensemble = load_teachers(str(dst), data_name="CIFAR10_x32")
    assert [os.path.basename(os.path.dirname(run)) for run in ensemble.runs] == ["2", "5"]
    sidecar = ensemble.sidecars[0]
    assert sidecar["kind"] == "swag_teacher" and sidecar["data_name"] == "CIFAR10_x32"
    assert sidecar["seed"] == 2 and sidecar["num_snapshots"] == 32000
    assert sidecar["source"]["train_step"] == 160000 and len(sidecar["source"]["sha256"]) == 64
    assert ensemble.sidecars[1]["num_snapshots"] == 800
    spec = sidecar["model"]
    assert (spec["depth"], spec["width"], spec["planes"], spec["num_classes"]) == (8, 2, 16, 10)
    assert (spec["norm"], spec["activation"], spec["conv_bias"]) == ("frn", "swish", True)
    assert spec["pixel_mean"] == list(REF_MEAN) and spec["pixel_std"] == list(REF_STD)

    apply = jax.jit(ensemble.model.apply)
    for index, run in enumerate(("2", "5")):
        reference = teachers["runs"][run]
        take = lambda tree: jax.tree.map(lambda leaf: np.asarray(leaf[index]), tree)
        mean, std = take(ensemble.moments["mean"]), take(ensemble.moments["std"])
        expected_mean = renamed(reference["mean"], width=2)
        jax.tree.map(np.testing.assert_array_equal, mean, expected_mean)
        variance = jax.tree.map(lambda m, s: s - np.square(m), reference["mean"], reference["params2"])
        expected_std = renamed(jax.tree.map(lambda v: np.sqrt(np.maximum(v, 1e-30)), variance), width=2)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=0), std, expected_std)
        assert np.asarray(std["stem_conv"]["kernel"]).reshape(-1)[0] == np.float32(1e-15)  # clamped
        assert_logits_match(np.asarray(apply({"params": mean}, IMAGES)), reference["logits"])


def test_a_pickle_naming_another_global_is_refused_and_nothing_written(teachers, tmp_path, capsys):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    src = tmp_path / "src"
    src.mkdir()
    with open(os.path.join(teachers["src"], "2.pickle"), "rb") as f:
        (src / "2.pickle").write_bytes(f.read())  # converted first, then removed again
    with open(src / "7.pickle", "wb") as f:
        pickle.dump({"swag_state": {"mean": Exploit(), "params2": {}}}, f, protocol=4)
    err = convert_fails(capsys, "teacher", src, tmp_path / "out" / "c10")
    assert "7.pickle: refused to unpickle the global posix.system" in err
    assert not os.path.exists(tmp_path / "ran") and not os.path.exists(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_bad_teacher_input_is_one_line(teachers, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    assert "already exists" in convert_fails(capsys, "teacher", teachers["src"], dst)
    truncated = tmp_path / "bad" / "3.pickle"
    truncated.parent.mkdir()
    with open(os.path.join(teachers["src"], "5.pickle"), "rb") as f:
        truncated.write_bytes(f.read()[:5000])
    assert "is not a readable pickle" in convert_fails(capsys, "teacher", truncated.parent, tmp_path / "x")
    with open(truncated, "wb") as f:
        pickle.dump({"mean": 1}, f)
    assert "not a reference MultiSWAG teacher" in convert_fails(capsys, "teacher", truncated, tmp_path / "x")
    assert "100 classes" in convert_fails(capsys, "teacher", teachers["src"], tmp_path / "x",
                                          "--data_name", "CIFAR100_x32")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_numpy_pickles_load_in_every_protocol(protocol, tmp_path):
    from utils.convert.safe_pickle import load_pickle

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "run.pickle"
    path.write_bytes(pickle.dumps({"a": array, "f": np.asfortranarray(array), "n": np.int32(7)}, protocol))
    loaded = load_pickle(str(path))
    np.testing.assert_array_equal(loaded["a"], array)
    np.testing.assert_array_equal(loaded["f"], array)
    assert loaded["n"] == 7


@pytest.mark.parametrize("payload, refused", [
    (pickle.dumps({"a": np.array([1, "x"], dtype=object)}, 4), "a numpy array of dtype object"),
    (pickle.dumps({"a": np.zeros(2, dtype=[("x", "f4")])}, 4), "a numpy array of dtype |V4"),
    (b"cbuiltins\neval\n(S'1+1'\ntR.", "the global builtins.eval"),
    (pickle.dumps(types.SimpleNamespace(a=1), 4), "the global types.SimpleNamespace")])
def test_anything_else_is_refused(payload, refused, tmp_path):
    from utils.convert.safe_pickle import load_pickle

    path = tmp_path / "run.pickle"
    path.write_bytes(payload)
    with pytest.raises(UserError, match=f"refused to unpickle {re.escape(refused)};"):
        load_pickle(str(path))


# ------------------------------------------------------------------------------ KD students
@pytest.mark.parametrize("style", ["FRN-Swish", "BN-ReLU"])
def test_reference_kd_checkpoints_become_resnet_exports(style, tmp_path, capsys):
    from edfm import load_backbone
    from utils.predict import load_predictor

    model = ReferenceResNet(depth=8, width=1, num_classes=100, style=style)
    variables = random_variables(model, 3)
    batch_stats = variables.get("batch_stats")
    expected = numpy_reference_logits(variables["params"], IMAGES_U8, batch_stats=batch_stats)
    config = {"data_name": "CIFAR100_x32", "seed": 2025, "baseline_method": "KD", "model_blocks": None,
              "first_conv": None}
    nested = {"model": {"params": variables["params"], "batch_stats": batch_stats, "image_stats": None,
                        "opt_state": {"0": {"trace": variables["params"]}}, "step": np.int32(9)},
              "config": config, "best_acc": np.float32(0.71)}
    top = {"params": variables["params"], "batch_stats": batch_stats, "image_stats": None, "config": config,
           "best_acc": 0.71}
    (tmp_path / "kd" / "checkpoint_9").mkdir(parents=True)  # the orbax-era layout, given as the folder
    (tmp_path / "kd" / "checkpoint_9" / "checkpoint").write_bytes(serialization.msgpack_serialize(nested))
    (tmp_path / "checkpoint").write_bytes(serialization.msgpack_serialize(top))  # the released layout

    exports = []
    for src in (tmp_path / "kd", tmp_path / "checkpoint"):
        dst = tmp_path / f"export_{src.name}"
        main(["edfm-ref", "kd", str(src), str(dst)])
        out, variables_ours, sidecar = load_resnet(str(dst))
        assert sidecar["kind"] == "resnet" and sidecar["data_name"] == "CIFAR100_x32"
        assert sidecar["source"]["best_acc"] == pytest.approx(0.71) and sidecar["seed"] == 2025
        norm, activation = {"FRN-Swish": ("frn", "swish"), "BN-ReLU": ("bn", "relu")}[style]
        assert (out.depth, out.width, out.norm, out.activation) == (8, 1, norm, activation)
        assert out.conv_bias == (style == "FRN-Swish")
        jax.tree.map(np.testing.assert_array_equal, variables_ours["params"],
                     renamed(variables["params"], width=1))
        exports.append((out, variables_ours, dst))
    out, variables_ours, dst = exports[0]
    if style == "BN-ReLU":
        jax.tree.map(np.testing.assert_array_equal, variables_ours["batch_stats"],
                     renamed(batch_stats, width=1))
    assert_logits_match(np.asarray(jax.jit(out.apply)(variables_ours, IMAGES)), expected)
    load_backbone(str(dst), "CIFAR100_x32", 100)  # EDFM's pretrained_resnet
    assert load_predictor(str(dst)).kind == "resnet"  # a KD student in evaluate.py

    assert "already exists" in convert_fails(capsys, "kd", tmp_path / "checkpoint", dst)
    (tmp_path / "empty").mkdir()
    assert "holds no KD checkpoint" in convert_fails(capsys, "kd", tmp_path / "empty", tmp_path / "x")
    (tmp_path / "junk").write_bytes(pickle.dumps({"swag_state": {}}, protocol=4))  # a teacher pickle
    assert "not a flax msgpack checkpoint" in convert_fails(capsys, "kd", tmp_path / "junk", tmp_path / "x")
    broken = dict(top, params={k: v for k, v in variables["params"].items() if k != "Dense_0"})
    (tmp_path / "broken").write_bytes(serialization.msgpack_serialize(broken))
    assert "not a reference FlaxResNet" in convert_fails(capsys, "kd", tmp_path / "broken", tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------- the reference's YAMLs
YAMLS = sorted(os.path.relpath(os.path.join(folder, name), REFERENCE_YAML)
               for folder, _, names in os.walk(REFERENCE_YAML) for name in names)


@pytest.mark.parametrize("relative", YAMLS)
def test_reference_yamls_parse_unchanged(relative):
    """Each through the config class of the script that reads the same-named YAML here."""
    from utils.method import config_reader

    assert len(YAMLS) == 10
    reader = config_reader(os.path.join(ROOT, "config", relative))
    config = reader.parse(["--config", os.path.join(REFERENCE_YAML, relative)])
    assert config.data_name in ("CIFAR10_x32", "CIFAR100_x32") and config.model_depth == 32
    assert config.model_blocks is None and config.first_conv is None and config.first_pool is None
    assert config.model_nobias is False  # the EDFM YAMLs' null
    assert {"model_blocks", "first_conv", "first_pool"} <= set(type(config).UNUSED)


def test_reference_model_keys_that_change_the_network_are_refused():
    from kd_and_endd import DistillConfig

    config = parse_config(DistillConfig, ["--model_depth", "32", "--model_blocks", "5,5,5"])
    assert config.model_blocks == "5,5,5"
    for key, value in (("model_blocks", "3,4,5"), ("first_conv", "7,2,3"), ("first_pool", "3,2,1")):
        with pytest.raises(UserError, match=f"^{key} .*set it to null$"):
            parse_config(DistillConfig, [f"--{key}", value])
