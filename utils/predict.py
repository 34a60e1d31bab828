"""One prediction interface for every trained model: member logits [N, M, K].

Each method's script defines `load_predictor(model_dir, **options) -> Predictor` next to its
training code (a method lives in its script); `load_predictor` here dispatches on the export's
sidecar kind. evaluate.py and Python users see only this interface:

    predictor = load_predictor("runs/edfm/x/model", num_members=32)
    logits = predict(predictor, images_u8, batch_size=500)   # NumPy [N, M, K]
"""
import dataclasses
import importlib
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from utils.checkpoints import read_sidecar
from utils.errors import UserError
from utils.trainer import jit_batch_fn, make_mesh, map_batches, put_replicated

# Which script knows how to predict with each kind of export.
PREDICTOR_SCRIPTS = {"swag_teacher": "sgd_swag", "resnet": "kd_and_endd", "proxy_endd": "kd_and_endd",
                     "fed": "fed", "edfm": "edfm", "gendd": "gendd"}


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


def load_predictor(model_dir: str, **options) -> Predictor:
    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir} does not exist")
    if not os.path.exists(os.path.join(model_dir, "sidecar.json")) and \
            os.path.exists(os.path.join(model_dir, "model", "sidecar.json")):
        model_dir = os.path.join(model_dir, "model")  # a run directory: use its export
    kind = read_sidecar(model_dir).get("kind")
    if kind not in PREDICTOR_SCRIPTS:
        raise UserError(f"{model_dir}: unknown model kind {kind!r}")
    try:
        script = importlib.import_module(PREDICTOR_SCRIPTS[kind])
    except ImportError as error:
        raise UserError(f"{model_dir}: cannot load {PREDICTOR_SCRIPTS[kind]}.py for kind {kind!r}: {error}") from None
    return script.load_predictor(model_dir, **options)


class Runner:
    """A predictor compiled once (per mesh and batch size) and run over any uint8 image set."""

    def __init__(self, predictor: Predictor, mesh=None, batch_size: int = 500):
        self.predictor = predictor
        self.mesh = make_mesh() if mesh is None else mesh
        self.batch_size = max(self.mesh.size, batch_size - batch_size % self.mesh.size)

        def fn(args, batch, key):
            images = batch["images"].astype(np.float32) / 255.0
            return predictor.member_logits(args, images, key)

        self.jitted = jit_batch_fn(fn, self.mesh)
        self.args = put_replicated(predictor.args, self.mesh)
        self.seconds = 0.0  # wall time spent predicting, for reports

    def __call__(self, images_u8: np.ndarray, key=None, desc=None) -> np.ndarray:
        start = time.perf_counter()
        key = jax.random.PRNGKey(0) if key is None else key
        out = map_batches(self.jitted, self.args, images_u8, np.zeros(len(images_u8), np.int32),
                          batch_size=self.batch_size, mesh=self.mesh, key=key, desc=desc)
        self.seconds += time.perf_counter() - start
        return np.asarray(out, np.float32)


def predict(predictor: Predictor, images_u8: np.ndarray, *, batch_size: int = 500, mesh=None,
            key=None) -> np.ndarray:
    """Member logits [N, M, K] over uint8 images, one compiled call per batch. To predict on
    several image sets, build one `Runner` and call it on each (it compiles once)."""
    return Runner(predictor, mesh, batch_size)(images_u8, key)
