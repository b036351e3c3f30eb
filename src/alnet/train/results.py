"""From test predictions to what a run reports (metrics.json's content). Pure functions, no files."""

from __future__ import annotations

import math

from .. import metrics as M
from ..config import RunConfig
from ..data.cnmc import Cell
from ..data.protocols import Split
from ..labels import is_all
from ..trust import entries as trust_report
from ..trust.calibration import apply_temperature
from ..trust.review import statuses
from ..trust.screen import REJECTED, count_reasons


def prediction_rows(split_name: str, cells: list[Cell], predictions: dict, trust: dict | None = None,
                    reasons: list[str | None] | None = None) -> list[dict]:
    """One predictions.csv row per tested image, from a module's `test_predictions`: `probability_all`
    calibrated with the split's temperature (when it has one), `probability_raw` the network's own, and the
    `status`: `rejected` with the input gate's reason (`reasons`, None: accepted) before `review` from the
    split's band (`trust`: what `trust.fitting` fitted). A refused image keeps its row, so nothing drops out."""
    trust = trust or {}
    reasons = reasons or [None] * len(predictions["index"])
    temperature = (trust.get("calibration") or {}).get("temperature")
    calibrated = apply_temperature(predictions["prob_all"], temperature)
    flags = statuses(calibrated, (trust.get("review") or {}).get("half_width"))
    flags = [(REJECTED, gate) if gate else flag for gate, flag in zip(reasons, flags)]
    return [
        {"fold": split_name, "path": str(cells[i].path), "subject": cells[i].subject, "label": int(label),
         "probability_all": f"{p:.6f}", "predicted": int(is_all(p)), "probability_raw": f"{raw:.6f}",
         "status": status, "reason": reason}
        for i, p, raw, label, (status, reason)
        in zip(predictions["index"], calibrated, predictions["prob_all"], predictions["label"], flags)
    ]


def fold_metrics(rows: list[dict], trust: dict | None = None, seed: int = 0) -> dict:
    """The metrics over every tested image (refused ones included, so that nothing drops out unseen), the
    trust entries (calibration, intervals, subject level, review) and what the input gate refused and why."""
    refused = [r["reason"] for r in rows if r.get("status") == REJECTED]
    return {**M.evaluate(*M.columns(rows)), **trust_report.test_set_entry(rows, trust, seed),
            "input_gate": {"images": len(rows), "rejected": len(refused), "reasons": count_reasons(refused)}}


def json_safe(value):
    """NaN and infinities (e.g. AUC of a one-class test set) become null, as JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def summarize_run(config: RunConfig, splits: list[Split], predictions: dict[str, list[dict]], world_size: int,
                  trust: dict[str, dict] | None = None):
    """metrics.json: per test fold, their mean ± std, and the preliminary test set apart. `trust`: per split,
    its calibration and review band (calibration, subject-level view and review entries come with them)."""
    folds = []
    prelim = None
    for split in splits:
        entry = {"fold": split.name, "note": split.note,
                 **fold_metrics(predictions[split.name], (trust or {}).get(split.name), config.seed)}
        if split.name == "prelim":
            prelim = entry
        else:
            folds.append(entry)
    result = {"protocol": config.protocol, "model": config.model, "note": splits[0].note, "folds": folds,
              "summary": {**M.summarize(folds), **trust_report.summarize(folds)}, "world_size": world_size}
    if prelim is not None:
        result["prelim"] = prelim
    return json_safe(result)


def subject_rows(predictions: dict[str, list[dict]]) -> list[dict]:
    """subjects.csv: per test set and subject, images, mean P(ALL), share called ALL, accuracy."""
    rows = []
    for fold, fold_rows in predictions.items():
        labels, probs = M.columns(fold_rows)
        for row in M.per_subject([r["subject"] for r in fold_rows], labels, probs):
            rows.append({"fold": fold, **row})
    return rows
