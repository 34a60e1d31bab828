"""Markdown reports shared by evaluate.py and aggregate.py: cell formats, tables, and the rule
that a report never overwrites an earlier one."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from utils.errors import UserError


def fmt(value, kind: str = "f4", scale: float = 1.0) -> str:
    """One table cell of value × scale: "pct" (a fraction as %), "int", "si" (1.2M), "ms"
    (seconds as ms), "f4" (four decimals) or any Python format spec (",.0f", ".1%"); a missing,
    non-numeric or non-finite value is a dash."""
    if (not isinstance(value, (int, float, np.number)) or isinstance(value, bool)
            or not np.isfinite(value)):
        return "—"
    value = value * scale
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "int":
        return str(int(value))
    if kind == "si":
        for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g}{unit}"
        return f"{value:.3g}"
    if kind == "ms":
        return f"{1e3 * value:.1f}"
    if kind == "f4":
        return f"{value:.4f}"
    return format(value, kind)


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def refuse_existing(save: Optional[str]):
    """prepare_run_dir's rule for a report folder, checked before the (long) work that fills it
    rather than after it: a folder that holds anything is left as it is."""
    if save and os.path.isdir(save) and os.listdir(save):
        what = "results.md" if os.path.exists(os.path.join(save, "results.md")) else "files"
        raise UserError(f"{save} already holds {what}; not overwriting it: choose another --save")
