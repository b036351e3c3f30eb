"""metrics.json's trust entries for one test set (`calibration`, `subject_level`, `intervals`, `review`) and
their mean ± sample std over folds. Pure functions over prediction rows."""

from __future__ import annotations

import numpy as np

from .. import metrics as M
from .calibration import calibration_entry
from .review import review_entry
from .subjects import image_intervals, subject_level

NOT_RECORDED = "not calibrated: no calibration recorded for this model"


def raw_probabilities(rows: list[dict]) -> np.ndarray:
    """The network's own P(ALL) of prediction rows (rows written before calibration existed hold only
    `probability_all`, which then is the raw one)."""
    return np.array([float(r.get("probability_raw") or r["probability_all"]) for r in rows], dtype=float)


def test_set_entry(rows: list[dict], trust: dict | None, seed: int = 0) -> dict:
    labels, calibrated = M.columns(rows)
    subjects = [r["subject"] for r in rows]
    trust = trust or {"calibration": {"method": "none", "temperature": None, "note": NOT_RECORDED}}
    return {
        "calibration": calibration_entry(labels, raw_probabilities(rows), trust.get("calibration")),
        "intervals": image_intervals(subjects, labels, calibrated, seed),
        "subject_level": subject_level(subjects, labels, calibrated, seed),
        "review": review_entry(labels, calibrated, trust.get("review")),
    }


def _mean_std(values) -> dict:
    values = np.array([np.nan if v is None else v for v in values], dtype=float)
    values = values[~np.isnan(values)]
    return {"mean": float(values.mean()) if len(values) else float("nan"),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def summarize(folds: list[dict]) -> dict:
    """Mean ± sample std over test folds of the calibration scores (before and after), the subject-level AUC
    and accuracy and the review coverage and error; folds where a value is undefined are left out."""
    if not folds or "calibration" not in folds[0]:
        return {}
    calibration = {}
    for when in ("before", "after"):
        for score in ("ece", "brier", "nll"):
            calibration[f"{score}_{when}"] = _mean_std([(f["calibration"][when] or {}).get(score) for f in folds])
    calibration["temperature"] = _mean_std([f["calibration"].get("temperature") for f in folds])
    return {
        "calibration": calibration,
        "subject_level": {k: _mean_std([f["subject_level"][k] for f in folds]) for k in ("auc", "accuracy")},
        "review": {k: _mean_std([f["review"][k] for f in folds]) for k in ("coverage", "error_answered")},
    }
