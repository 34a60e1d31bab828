"""Figures of evaluate.py: pure functions from arrays and dicts to PNG files (matplotlib, Agg).

    reliability_diagrams(path, {"KD": (confidence [N], correct [N]), ...})
    diversity_vs_accuracy(path, {"KD": {"acc": .., "mi": .., "var": .., "shift": [{...}, ...]}})
    sweep_plot(path, {"EDFM heun_exp": {"x": [...], "acc": [...], ...}}, xlabel="members")

Each function writes one PNG at `path` (its folder must exist) and returns the path. Nothing
is shown on screen and no global matplotlib state is left behind.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120
_COLORS = plt.get_cmap("tab10").colors

# metric key -> axis label of sweep and diversity plots
LABELS = {
    "acc": "accuracy",
    "nll": "NLL",
    "ece": "ECE",
    "brier": "Brier",
    "kl_to_teacher": "KL(teacher ‖ student)",
    "agreement": "agreement with teacher",
    "mi": "mutual information (nats)",
    "var": "Brier variance",
    "amb": "ambiguity (AMB)",
    "disagreement": "member disagreement",
    "w2": "W2 to teacher",
}


def _color(i: int):
    return _COLORS[i % len(_COLORS)]


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, max_cols: int = 4):
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    return rows, cols


def reliability_bins(confidence, correct, num_bins: int = 15):
    """Per bin (b_i, b_{i+1}] of confidence: (count, mean confidence, accuracy); the binning of
    utils.metrics.ece (values <= 0 go to the first bin, > 1 to the last)."""
    conf = np.asarray(confidence, np.float64).ravel()
    corr = np.asarray(correct, np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct differ in shape: {conf.shape} vs {corr.shape}")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(idx, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=num_bins) / count
        accuracy = np.bincount(idx, weights=corr, minlength=num_bins) / count
    return edges, count, mean_conf, accuracy


def reliability_diagrams(path: str, methods: dict, num_bins: int = 15, title: str | None = None) -> str:
    """One reliability panel per method: accuracy per confidence bin (bars), the gap to the
    bin's mean confidence (hatched), the diagonal, and ECE in the panel title.

    methods: name -> (confidence [N] = max_k p, correct [N] in {0, 1}).
    """
    if not methods:
        raise ValueError("reliability_diagrams needs at least one method")
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for i, (name, (conf, corr)) in enumerate(methods.items()):
        ax = axes[i // cols][i % cols]
        edges, count, mean_conf, acc = reliability_bins(conf, corr, num_bins)
        n = max(count.sum(), 1.0)
        filled = count > 0
        ece = float(np.sum(count[filled] * np.abs(acc[filled] - mean_conf[filled])) / n)
        width = edges[1] - edges[0]
        centers = edges[:-1] + width / 2
        ax.bar(centers[filled], acc[filled], width=width, color=_color(i), edgecolor="black",
               linewidth=0.5, label="accuracy")
        gap_bottom = np.minimum(acc, mean_conf)[filled]
        ax.bar(centers[filled], np.abs(acc - mean_conf)[filled], bottom=gap_bottom, width=width,
               color="none", edgecolor="red", hatch="//", linewidth=0.5, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"{name}\nECE {100 * ece:.2f}%", fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7, loc="upper left")
    for j in range(len(methods), rows * cols):
        axes[j // cols][j % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def diversity_vs_accuracy(path: str, methods: dict, diversity_keys=("mi", "var"),
                          title: str | None = None) -> str:
    """Diversity against accuracy, one panel per diversity metric, one colour per method.

    methods: name -> {"acc": float, "<key>": float, ..., "shift": [{"acc":..., "<key>":...}]}.
    The test-set point is a large marker with the method's name; the optional "shift" points
    (one per shift set) are small markers of the same colour, showing how diversity and accuracy
    move together under distribution shift.
    """
    if not methods:
        raise ValueError("diversity_vs_accuracy needs at least one method")
    keys = list(diversity_keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.0), squeeze=False)
    for k, key in enumerate(keys):
        ax = axes[0][k]
        for i, (name, values) in enumerate(methods.items()):
            shift = [s for s in values.get("shift", []) if key in s and "acc" in s]
            if shift:
                ax.scatter([s[key] for s in shift], [s["acc"] for s in shift], s=12,
                           color=_color(i), alpha=0.45, marker="o", linewidths=0)
            if key in values and "acc" in values:
                ax.scatter([values[key]], [values["acc"]], s=70, color=_color(i),
                           edgecolors="black", marker="D", label=name, zorder=3)
        ax.set_xlabel(LABELS.get(key, key))
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "diversity vs accuracy (◆ test set, • shift sets)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def sweep_file_name(student: str, sweep_name: str) -> str:
    """The PNG name of a student's sweep (e.g. "edfm_heun_exp_steps.png")."""
    return f"{student}_{sweep_name}".lower().replace(" ", "_") + ".png"


def wide_range(xs) -> bool:
    """Whether swept values span enough (16x, all positive) to read better on a log2 axis."""
    return len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 16


def sweep_plot(path: str, curves: dict, xlabel: str, metrics=("acc", "nll", "kl_to_teacher"),
               reference: dict | None = None, logx: bool = False, title: str | None = None) -> str:
    """Quality against a swept quantity (members, function evaluations), one panel per metric.

    curves: label -> {"x": [...], metric: [...] for metric in metrics}; an optional
    `<metric>_std: [...]` shades mean ± std (a band over seeds).
    reference: optional {"label": str, metric: float} drawn as a horizontal dashed line
    (e.g. the teacher ensemble).
    """
    if not curves:
        raise ValueError("sweep_plot needs at least one curve")
    metrics = list(metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.5), squeeze=False)
    for k, metric in enumerate(metrics):
        ax = axes[0][k]
        for i, (label, curve) in enumerate(curves.items()):
            if metric not in curve:
                continue
            x, y = np.asarray(curve["x"], np.float64), np.asarray(curve[metric], np.float64)
            order = np.argsort(x)
            ax.plot(x[order], y[order], marker="o", color=_color(i), label=label)
            if f"{metric}_std" in curve:
                std = np.asarray(curve[f"{metric}_std"], np.float64)[order]
                ax.fill_between(x[order], y[order] - std, y[order] + std, color=_color(i), alpha=0.2,
                                linewidth=0)
        if reference and reference.get(metric) is not None and np.isfinite(reference[metric]):
            ax.axhline(reference[metric], color="gray", linestyle="--", linewidth=1,
                       label=reference.get("label", "reference"))
        if logx:
            ax.set_xscale("log", base=2)
            xs = sorted({float(v) for c in curves.values() for v in c["x"]})
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{v:g}" for v in xs])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

