"""Everything derived from predictions. Pure functions over arrays; the positive class is ALL (label 1).

The metrics themselves come from torchmetrics' functional API; this module fixes their conventions: NaN (never
0) where a metric is undefined, ALL as the positive class, P(ALL) > 0.5 as the decision."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_confusion_matrix,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_roc,
    binary_specificity,
    multiclass_f1_score,
)

from .labels import THRESHOLD, label_of

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "weighted_f1", "auc")


def columns(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, P(ALL)) of prediction rows (predictions.csv's `label` and `probability_all`)."""
    return (np.array([label_of(r["label"]) for r in rows], dtype=int),
            np.array([float(r["probability_all"]) for r in rows], dtype=float))


def _labels(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values).astype(np.int64).reshape(-1))


def _scores(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1))


def confusion(labels, predicted) -> dict[str, int]:
    """tp, tn, fp, fn of 0/1 predictions (torchmetrics' binary confusion matrix: rows are labels HEM, ALL)."""
    (tn, fp), (fn, tp) = binary_confusion_matrix(_labels(predicted), _labels(labels)).tolist()
    return {"tp": tp, "tn": tn, "fp": fp, "fn": fn}


def _expand(c: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and 0/1 predictions that have the confusion matrix `c`."""
    labels = torch.tensor([1] * (c["tp"] + c["fn"]) + [0] * (c["tn"] + c["fp"]), dtype=torch.long)
    predicted = torch.tensor([1] * c["tp"] + [0] * c["fn"] + [0] * c["tn"] + [1] * c["fp"], dtype=torch.long)
    return labels, predicted


def _classification(labels: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    """The threshold metrics, from torchmetrics. A metric with nothing to measure is NaN, never 0 (which reads as
    a failure; torchmetrics says 0): precision when nothing is called ALL, recall and F1 without ALL images,
    specificity without HEM images, all of them without images."""
    nan = float("nan")
    if len(labels) == 0:
        return dict.fromkeys(("accuracy", "precision", "recall", "specificity", "f1", "weighted_f1"), nan)
    has_all, has_hem, called_all = bool((labels == 1).any()), bool((labels == 0).any()), bool(predicted.any())
    # Support-weighted over the classes present: an absent class weighs 0 and does not turn the mean NaN.
    return {
        "accuracy": float(binary_accuracy(predicted, labels)),
        "precision": float(binary_precision(predicted, labels)) if called_all else nan,
        "recall": float(binary_recall(predicted, labels)) if has_all else nan,
        "specificity": float(binary_specificity(predicted, labels)) if has_hem else nan,
        "f1": float(binary_f1_score(predicted, labels)) if has_all else nan,
        "weighted_f1": float(multiclass_f1_score(predicted, labels, num_classes=2, average="weighted")),
    }


def from_confusion(c: dict[str, int]) -> dict[str, float]:
    """Accuracy, precision, recall (sensitivity), specificity, F1 and support-weighted F1 of a confusion matrix.

    A metric whose denominator is empty (specificity without HEM images, precision when nothing is called ALL)
    is NaN; `summarize` leaves NaN folds out of the mean."""
    return _classification(*_expand(c))


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (torchmetrics; ties count one half). NaN when only one class is present."""
    labels, scores = _labels(labels), _scores(scores)
    if not (labels == 1).any() or not (labels == 0).any():
        return float("nan")
    return float(binary_auroc(scores, labels))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds, from the highest threshold down; the first point
    (0, 0) has threshold infinity. A class that is absent gives a rate of 0 throughout."""
    with warnings.catch_warnings():  # one class only: torchmetrics warns, and its rates are 0 as documented
        warnings.filterwarnings("ignore", message=".*(positive|negative) samples in targets.*")
        fpr, tpr, thresholds = binary_roc(_scores(scores), _labels(labels))
    thresholds = thresholds.double().numpy().copy()
    thresholds[0] = np.inf  # torchmetrics clamps the (0, 0) point's threshold to 1
    return fpr.double().numpy(), tpr.double().numpy(), thresholds


def evaluate(labels, prob_all, threshold: float = THRESHOLD) -> dict:
    """All metrics of one set of predictions: METRICS plus `confusion` and `images`."""
    labels = np.asarray(labels).astype(int)
    prob_all = np.asarray(prob_all, dtype=float)
    predicted = prob_all > threshold
    c = confusion(labels, predicted)
    result = _classification(_labels(labels), _labels(predicted))
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
