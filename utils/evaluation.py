"""The one evaluator: member logits of any Predictor on a split, and the metrics of the ensemble.

evaluate.py runs it over the test, shift and OOD sets of a data set; every training script ends
with `test_table` (the same code on the test split, a compact table). The ensemble prediction is
the mean of the members' softmax (utils/metrics.py). Member-diversity metrics are undefined for a
one-member model: they are None (shown "—"), not 0.
"""
import time

import jax
import numpy as np

from data.stream import Stream
from utils import metrics
from utils.errors import UserError
from utils.predict import Runner
from utils.trainer import make_mesh

# Defined only for two or more members: a single member has no spread.
DIVERSITY_KEYS = ("amb", "var", "mi", "disagreement")


def check_classes(logits: np.ndarray, num_classes: int, name: str):
    if logits.ndim != 3 or logits.shape[-1] != num_classes:
        raise UserError(f"{name} predicts logits of shape {list(logits.shape[1:])} per input, "
                        f"but the data set has {num_classes} classes")


def ensemble_summary(logits, labels, reference_logits=None, *, w2: bool = False) -> dict:
    """metrics.summarize of member logits [N, M, K]; against a reference ensemble (the teacher)
    also KL(reference ‖ this) and top-1 agreement, and with `w2` the W2 between member sets."""
    if reference_logits is not None and w2:
        out = metrics.summarize(logits, labels, reference_logits)
    else:
        out = metrics.summarize(logits, labels)
        if reference_logits is not None:
            reference, probs = metrics.ensemble_probs(reference_logits), metrics.ensemble_probs(logits)
            out["kl_to_teacher"] = metrics.kl_to_teacher(reference, probs)
            out["agreement"] = metrics.agreement(reference, probs)
    if np.shape(logits)[1] == 1:
        out.update({key: None for key in DIVERSITY_KEYS})
    return out


def uncertainty_scores(logits) -> dict:
    """Per-input OOD scores: predictive entropy, and mutual information (None for one member)."""
    member_probs = metrics.softmax(logits)
    return {"entropy": metrics.predictive_entropy(member_probs.mean(axis=1)),
            "mi": metrics.mutual_information(member_probs) if np.shape(logits)[1] > 1 else None}


def ood_aurocs(in_scores: dict, out_scores: dict) -> dict:
    return {f"auroc_{name}": (None if in_scores[name] is None
                              else metrics.ood_auroc(in_scores[name], out_scores[name]))
            for name in in_scores}


def test_table(predictors, split, *, batch_size: int, key, mesh=None) -> dict:
    """{name: {acc, nll, ece, kl_to_teacher, time_s}} of each Predictor on a split; KL is to
    the first predictor's ensemble (the teacher), which is 0 on its own row."""
    mesh = make_mesh() if mesh is None else mesh
    rows, reference = {}, None
    for predictor in predictors:
        start = time.perf_counter()
        logits = Runner(predictor, mesh, batch_size)(split if isinstance(split, Stream) else split.images, key)
        reference = logits if reference is None else reference
        row = ensemble_summary(logits, split.labels, reference)
        rows[predictor.name] = {"acc": row["acc"], "nll": row["nll"], "ece": row["ece"],
                                "kl_to_teacher": row["kl_to_teacher"],
                                "time_s": round(time.perf_counter() - start, 2)}  # compile included
    return rows


def format_test_table(rows: dict, title: str) -> str:
    width = max(len(name) for name in rows) + 2
    lines = [title, f"{'model':<{width}}{'acc':>8}{'nll':>8}{'ece':>8}{'KL(T||S)':>10}{'time_s':>8}"]
    for name, r in rows.items():
        lines.append(f"{name:<{width}}{r['acc']:>8.4f}{r['nll']:>8.4f}{r['ece']:>8.4f}"
                     f"{r['kl_to_teacher']:>10.4f}{r['time_s']:>8.1f}")
    return "\n".join(lines)


def default_key(seed: int):
    """The key of a script's end-of-run test table (the same draws for every predictor)."""
    return jax.random.PRNGKey(seed + 7)
