"""From test predictions to what a run reports (metrics.json's content). Pure functions, no files."""

from __future__ import annotations

import math

from .. import metrics as M
from ..config import RunConfig
from ..data.cnmc import Cell
from ..data.protocols import Split
from ..labels import is_all
from ..trust.screen import OK, REJECTED, count_reasons


def prediction_rows(split_name: str, cells: list[Cell], predictions: dict,
                    reasons: list[str | None] | None = None) -> list[dict]:
    """One predictions.csv row per tested image, from a module's `test_predictions`; `reasons`: the input
    gate's per image (None: accepted). A refused image keeps its row: status `rejected` and the reason."""
    reasons = reasons or [None] * len(predictions["index"])
    return [
        {"fold": split_name, "path": str(cells[i].path), "subject": cells[i].subject, "label": int(label),
         "probability_all": f"{p:.6f}", "predicted": int(is_all(p)), "status": REJECTED if reason else OK,
         "reason": reason or ""}
        for i, p, label, reason in zip(predictions["index"], predictions["prob_all"], predictions["label"], reasons)
    ]


def fold_metrics(rows: list[dict]) -> dict:
    """The metrics over every tested image (refused ones included, so that nothing drops out unseen), and
    what the input gate refused and why."""
    refused = [r["reason"] for r in rows if r.get("status") == REJECTED]
    return {**M.evaluate(*M.columns(rows)),
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


def summarize_run(config: RunConfig, splits: list[Split], predictions: dict[str, list[dict]], world_size: int):
    """metrics.json: per test fold, their mean ± std, and the preliminary test set apart."""
    folds = []
    prelim = None
    for split in splits:
        entry = {"fold": split.name, "note": split.note, **fold_metrics(predictions[split.name])}
        if split.name == "prelim":
            prelim = entry
        else:
            folds.append(entry)
    result = {"protocol": config.protocol, "model": config.model, "note": splits[0].note, "folds": folds,
              "summary": M.summarize(folds), "world_size": world_size}
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
