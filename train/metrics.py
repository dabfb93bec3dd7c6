"""Top-1 accuracy overall and by training-set frequency: Many (>100 images), Medium (20-100), Few (<20)."""

from __future__ import annotations

import numpy as np

from .datasets import FEW_MAX, MANY_MIN

GROUPS = ("many", "medium", "few")


def class_groups(train_counts) -> np.ndarray:
    """[C] group index per class: 0 Many (> 100 training images), 1 Medium (20..100), 2 Few (< 20)."""
    counts = np.asarray(train_counts)
    return np.where(counts > MANY_MIN, 0, np.where(counts >= FEW_MAX, 1, 2))


def accuracy_report(correct, total, train_counts) -> dict:
    """From per-class correct and total counts on the evaluation set ([C] each):
    top1 over all samples, per-class accuracy, and the mean per-class accuracy of each group
    (NaN for an empty group; classes absent from the evaluation set are left out)."""
    correct = np.asarray(correct, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    per_class = np.divide(correct, total, out=np.full_like(correct, np.nan), where=total > 0)
    groups = class_groups(train_counts)
    out = {"top1": 100.0 * float(correct.sum()) / max(float(total.sum()), 1.0), "per_class": 100.0 * per_class}
    for g, name in enumerate(GROUPS):
        sel = (groups == g) & (total > 0)
        out[name] = 100.0 * float(per_class[sel].mean()) if sel.any() else float("nan")
    return out
