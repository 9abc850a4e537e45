"""Classification and regression metrics used by the paper's GLUE evaluation.

Computed with scikit-learn / scipy (never a hub-downloaded metric script):

- accuracy        = mean(pred == label)
- f1              = binary F1 of the positive class (label 1): 2·TP / (2·TP + FP + FN)
- macro_f1        = unweighted mean of per-class F1
- matthews        = Matthews correlation (CoLA):
                    (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) (multi-class: sklearn's R_K)
- pearson         = Pearson r between predictions and gold scores (STS-B)
- spearman        = Spearman ρ between predictions and gold scores (STS-B)

All values are plain floats in [−1, 1] or [0, 1] (not percentages).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS

# The paper's metric(s) per GLUE task (MNLI: matched accuracy, scored on validation_matched).
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}


def _arrays(preds: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions have shape {p.shape} but labels have shape {y.shape}")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, y


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = _arrays(preds, labels)
    return float(np.mean(p == y))


def f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Binary F1 of class 1 (GLUE's MRPC/QQP convention); 0.0 when there is no TP/FP/FN."""
    from sklearn.metrics import f1_score

    p, y = _arrays(preds, labels)
    return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def macro_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    from sklearn.metrics import f1_score

    p, y = _arrays(preds, labels)
    return float(f1_score(y, p, average="macro", zero_division=0.0))


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation; 0.0 when a marginal is constant (sklearn's convention)."""
    from sklearn.metrics import matthews_corrcoef

    p, y = _arrays(preds, labels)
    return float(matthews_corrcoef(y, p))


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson r; NaN if either vector is constant (undefined)."""
    from scipy.stats import pearsonr

    p, y = _arrays(preds, labels)
    if np.all(p == p.flat[0]) or np.all(y == y.flat[0]):
        return float("nan")
    return float(pearsonr(p.astype(np.float64), y.astype(np.float64))[0])


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman ρ (Pearson r of average ranks); NaN if either vector is constant."""
    from scipy.stats import spearmanr

    p, y = _arrays(preds, labels)
    if np.all(p == p.flat[0]) or np.all(y == y.flat[0]):
        return float("nan")
    return float(spearmanr(p.astype(np.float64), y.astype(np.float64))[0])


METRIC_FNS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews": matthews,
    "pearson": pearson, "spearman": spearman,
}


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ValueError("no metrics requested")
    for n in names:
        if n not in METRIC_FNS:
            raise ValueError(f"unknown metric {n!r}; choose from {METRICS}")
    return names


def compute_metrics(names: Sequence[str], preds: Sequence, labels: Sequence) -> dict[str, float]:
    """``{name: value}`` for each requested metric."""
    return {n: METRIC_FNS[n](preds, labels) for n in check_metrics(names)}
