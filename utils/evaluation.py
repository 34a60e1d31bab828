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


def ensemble_summary(logits, labels, reference_logits=None, *, w2: bool = False,
                     eps: float = 0.0) -> dict:
    """metrics.summarize of member logits [N, M, K] (`eps` inside the logs of the NLLs);
    against a reference ensemble (the teacher) also KL(reference ‖ this) and top-1 agreement,
    and with `w2` the W2 between member sets."""
    if reference_logits is not None and w2:
        out = metrics.summarize(logits, labels, reference_logits, eps=eps)
    else:
        out = metrics.summarize(logits, labels, eps=eps)
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


def test_table(predictors, split, *, batch_size: int, key, mesh=None, shot_groups=None) -> dict:
    """{name: {acc, top5 (more than 5 classes), nll, ece, kl_to_teacher, time_s}} of each
    Predictor on a split (on-device or streamed); KL is to the first predictor's ensemble (the
    teacher), 0 on its own row. `shot_groups` (train counts, many, few): also many-, medium- and
    few-shot accuracy (metrics.shot_accuracies)."""
    mesh = make_mesh() if mesh is None else mesh
    rows, reference = {}, None
    inputs = split if isinstance(split, Stream) else split.images
    labels = np.asarray(split.labels)
    for predictor in predictors:
        start = time.perf_counter()
        logits = Runner(predictor, mesh, batch_size)(inputs, key)
        reference = logits if reference is None else reference
        row = ensemble_summary(logits, labels, reference)
        probs = metrics.ensemble_probs(logits)
        rows[predictor.name] = {"acc": row["acc"], "nll": row["nll"], "ece": row["ece"],
                                "kl_to_teacher": row["kl_to_teacher"]}
        if probs.shape[-1] > 5:
            rows[predictor.name]["top5"] = metrics.top_k_accuracy(probs, labels, 5)
        if shot_groups is not None:
            rows[predictor.name].update(metrics.shot_accuracies(probs, labels, *shot_groups))
        rows[predictor.name]["time_s"] = round(time.perf_counter() - start, 2)  # compile included
    return rows


_COLUMNS = (("acc", "acc", 8), ("top5", "top5", 8), ("nll", "nll", 8), ("ece", "ece", 8),
            ("kl_to_teacher", "KL(T||S)", 10), ("many_acc", "many", 8), ("medium_acc", "medium", 8),
            ("few_acc", "few", 8), ("time_s", "time_s", 8))


def format_test_table(rows: dict, title: str) -> str:
    """The rows as text, with the columns the rows have ("—" for a group without a class)."""
    width = max(len(name) for name in rows) + 2
    columns = [c for c in _COLUMNS if any(c[0] in r for r in rows.values())]
    lines = [title, f"{'model':<{width}}" + "".join(f"{label:>{w}}" for _, label, w in columns)]
    for name, r in rows.items():
        cells = [f"{'—':>{w}}" if r.get(key) is None else
                 f"{r[key]:>{w}.1f}" if key == "time_s" else f"{r[key]:>{w}.4f}"
                 for key, _, w in columns]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def default_key(seed: int):
    """The key of a script's end-of-run test table (the same draws for every predictor)."""
    return jax.random.PRNGKey(seed + 7)
