"""One prediction interface for every trained model: member logits [N, M, K].

Each method's script defines `load_predictor(model_dir, **options) -> Predictor` next to its
training code (a method lives in its script); `load_predictor` here dispatches on the export's
sidecar kind through the method registry (utils/method.py). evaluate.py and Python users see
only this interface:

    predictor = load_predictor("runs/edfm/x/model", num_members=32)
    logits = predict(predictor, images_u8, batch_size=500)   # NumPy [N, M, K]
    students = ensemble_predictor("KD x3", [load_predictor(d) for d in kd_runs])  # members pooled
"""
import dataclasses
import inspect
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from data.augment import eval_images
from data.stream import Stream
from utils.checkpoints import find_export, read_sidecar
from utils.errors import UserError
from utils.method import method_for_kind
from utils.trainer import jit_batch_fn, make_mesh, map_batches, map_stream, put_replicated


@dataclasses.dataclass
class Predictor:
    name: str  # for tables: "Teacher (4x3)", "KD", "EDFM (32)", ...
    kind: str
    member_logits: Callable  # (args, images float32 [B,H,W,C] in [0,1], key) -> logits [B, M, K]
    args: Any  # the arrays member_logits reads (parameters), passed, not captured
    num_members: int
    num_params: int  # parameters used at prediction time
    sidecar: dict


def count_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def export_method(model_dir: str, what: str = "model"):
    """(export directory, the registered Method that predicts with it) of a path to an export
    or to a run directory."""
    model_dir = find_export(model_dir, what)
    return model_dir, method_for_kind(read_sidecar(model_dir).get("kind"))


def check_options(model_dir: str, options: dict, what: str = "model"):
    """The Method that predicts with the export; one clear line when its load_predictor does
    not take these options."""
    model_dir, method = export_method(model_dir, what)
    loader = method.load_predictor
    try:
        inspect.signature(loader).bind(model_dir, **options)
    except TypeError:
        valid = [n for n in list(inspect.signature(loader).parameters)[1:] if n != "kwargs"]
        raise UserError(f"{what}: {method.script} load_predictor does not take options "
                        f"{sorted(options)}; it takes {', '.join(valid)}") from None
    return method


def load_predictor(model_dir: str, **options) -> Predictor:
    model_dir, method = export_method(model_dir)
    return method.load_predictor(model_dir, **options)


def resnet_predictor(model, variables, sidecar, name: str = "ResNet") -> Predictor:
    """A plain zoo network with its own classifier as a one-member Predictor."""
    def member_logits(variables, images, key):
        return model.apply(variables, images)[:, None, :]

    return Predictor(name=name, kind="resnet", member_logits=member_logits, args=variables,
                     num_members=1, num_params=count_params(variables["params"]), sidecar=sidecar)


def ensemble_predictor(name: str, predictors: list) -> Predictor:
    """Several predictors as one whose members are all of theirs, pooled (a deep ensemble of
    students, e.g. three KD seeds): one compiled call, each part with its own key."""
    if not predictors:
        raise UserError(f"ensemble {name} needs at least one member")

    def member_logits(args, images, key):
        keys = jax.random.split(key, len(predictors))
        return jnp.concatenate([p.member_logits(a, images, k)
                                for p, a, k in zip(predictors, args, keys)], axis=1)

    return Predictor(name=name, kind=predictors[0].kind, member_logits=member_logits,
                     args=tuple(p.args for p in predictors),
                     num_members=sum(p.num_members for p in predictors),
                     num_params=sum(p.num_params for p in predictors),
                     sidecar={**predictors[0].sidecar,
                              "ensemble_of": [p.sidecar.get("seed") for p in predictors]})


class Runner:
    """A predictor compiled once (per mesh and batch size) and run over any uint8 image set."""

    def __init__(self, predictor: Predictor, mesh=None, batch_size: int = 500):
        self.predictor = predictor
        self.mesh = make_mesh() if mesh is None else mesh
        self.batch_size = max(self.mesh.size, batch_size - batch_size % self.mesh.size)

        def fn(args, batch, key):
            return predictor.member_logits(args, eval_images(batch["images"]), key)

        self.jitted = jit_batch_fn(fn, self.mesh)
        self.args = put_replicated(predictor.args, self.mesh)
        self.seconds = 0.0  # wall time spent predicting, for reports

    def __call__(self, images_u8, key=None, desc=None) -> np.ndarray:
        """Member logits [N, M, K] of uint8 images [N, H, W, C], or of a Stream's images."""
        start = time.perf_counter()
        key = jax.random.PRNGKey(0) if key is None else key
        if isinstance(images_u8, Stream):
            out = map_stream(self.jitted, self.args, images_u8, mesh=self.mesh, key=key, desc=desc)
        else:
            out = map_batches(self.jitted, self.args, images_u8, np.zeros(len(images_u8), np.int32),
                              batch_size=self.batch_size, mesh=self.mesh, key=key, desc=desc)
        self.seconds += time.perf_counter() - start
        return np.asarray(out, np.float32)


def predict(predictor: Predictor, images_u8: np.ndarray, *, batch_size: int = 500, mesh=None,
            key=None) -> np.ndarray:
    """Member logits [N, M, K] over uint8 images, one compiled call per batch. To predict on
    several image sets, build one `Runner` and call it on each (it compiles once)."""
    return Runner(predictor, mesh, batch_size)(images_u8, key)
