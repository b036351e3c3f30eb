"""Everything derived from predictions. Pure functions over arrays; the positive class is ALL (label 1)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .labels import THRESHOLD

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "weighted_f1", "auc")


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0: a metric with nothing to measure is undefined, never 0 (which reads as a failure)."""
    return a / b if b else float("nan")


def columns(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, P(ALL)) of prediction rows (predictions.csv's `label` and `probability_all`)."""
    return (np.array([int(r["label"]) for r in rows], dtype=int),
            np.array([float(r["probability_all"]) for r in rows], dtype=float))


def confusion(labels, predicted) -> dict[str, int]:
    labels, predicted = np.asarray(labels).astype(int), np.asarray(predicted).astype(int)
    return {
        "tp": int(((labels == 1) & (predicted == 1)).sum()),
        "tn": int(((labels == 0) & (predicted == 0)).sum()),
        "fp": int(((labels == 0) & (predicted == 1)).sum()),
        "fn": int(((labels == 1) & (predicted == 0)).sum()),
    }


def _f1(hits: int, false_alarms: int, misses: int) -> float:
    """F1 of one class, NaN when the test set has none of it; 2·hits / (2·hits + false alarms + misses) is the
    harmonic mean of precision and recall, and stays defined when nothing is predicted as that class."""
    return _ratio(2 * hits, 2 * hits + false_alarms + misses) if hits + misses else float("nan")


def from_confusion(c: dict[str, int]) -> dict[str, float]:
    """Accuracy, precision, recall (sensitivity), specificity, F1 and support-weighted F1 of a confusion matrix.

    A metric whose denominator is empty (specificity without HEM images, precision when nothing is called ALL)
    is NaN; `summarize` leaves NaN folds out of the mean."""
    tp, tn, fp, fn = c["tp"], c["tn"], c["fp"], c["fn"]
    n_all, n_hem = tp + fn, tn + fp
    f1, f1_hem = _f1(tp, fp, fn), _f1(tn, fn, fp)  # F1 of HEM as the positive class, for the weighted F1
    # Support-weighted over the classes present: an absent class weighs 0 and must not turn the mean NaN.
    present = [(f, n) for f, n in ((f1, n_all), (f1_hem, n_hem)) if n]
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, n_all),
        "specificity": _ratio(tn, n_hem),
        "f1": f1,
        "weighted_f1": _ratio(sum(f * n for f, n in present), sum(n for _, n in present)),
    }


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann–Whitney U; ties count one half). NaN when only one class is present."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds, from the highest threshold down."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / max(labels.sum(), 1)]
    fpr = np.r_[0.0, fps / max((1 - labels).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def evaluate(labels, prob_all, threshold: float = THRESHOLD) -> dict:
    """All metrics of one set of predictions: METRICS plus `confusion` and `images`."""
    labels = np.asarray(labels).astype(int)
    prob_all = np.asarray(prob_all, dtype=float)
    c = confusion(labels, prob_all > threshold)
    result = from_confusion(c)
    result["auc"] = roc_auc(labels, prob_all)
    result["confusion"] = c
    result["images"] = int(len(labels))
    return result


def summarize(per_fold: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single fold) of each metric over the folds where it
    is defined: a NaN fold (say, specificity of a fold without HEM images) is left out, not counted as 0."""
    summary = {}
    for name in METRICS:
        values = np.array([m[name] for m in per_fold], dtype=float)
        values = values[~np.isnan(values)]
        summary[name] = {
            "mean": float(values.mean()) if len(values) else float("nan"),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        }
    return summary


def per_subject(subjects, labels, prob_all, threshold: float = THRESHOLD) -> list[dict]:
    """One row per subject: images, label, mean P(ALL), share of images called ALL, image accuracy."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, subject in enumerate(subjects):
        groups[subject].append(i)
    labels, prob_all = np.asarray(labels).astype(int), np.asarray(prob_all, dtype=float)
    rows = []
    for subject, idx in sorted(groups.items()):
        called_all = prob_all[idx] > threshold
        label = int(labels[idx[0]])
        rows.append({
            "subject": subject,
            "label": label,
            "images": len(idx),
            "mean_probability_all": float(prob_all[idx].mean()),
            "fraction_called_all": float(called_all.mean()),
            "accuracy": float((called_all == (labels[idx] == 1)).mean()),
        })
    return rows
