"""From test predictions to what a run reports (metrics.json's content). Pure functions, no files."""

from __future__ import annotations

import math
from pathlib import Path

from .. import metrics as M
from ..config import RunConfig
from ..data.cnmc import Cell
from ..data.protocols import Split
from ..labels import NAMES, Status
from ..pipeline import Answer
from ..trust import test_set as trust_report
from ..trust.input_gate import count_reasons


def prediction_rows(split_name: str, cells: list[Cell], rows, answers: list[Answer], model: str,
                    checkpoint: Path | str) -> list[dict]:
    """predictions.csv rows (`alnet.schema.PREDICTIONS`) of a test set: one per tested cell, refused ones
    included with their P(ALL) and call, so that nothing drops out of the metrics unseen."""
    return [{"fold": split_name, "path": str(cells[i].path), "subject": cells[i].subject,
             "label": NAMES[cells[i].label], "predicted": answer.predicted,
             "probability_all": f"{answer.probability_all:.6f}", "probability_raw": f"{answer.probability_raw:.6f}",
             "status": answer.status.value, "reason": answer.reason, "model": model, "checkpoint": str(checkpoint),
             "note": ""}
            for i, answer in zip(rows, answers)]


def fold_metrics(rows: list[dict], trust: dict | None = None, seed: int = 0) -> dict:
    """The metrics over every tested image (refused ones included, so that nothing drops out unseen), the
    trust entries (calibration, intervals, subject level, review) and what the input gate refused and why."""
    refused = [r["reason"] for r in rows if r.get("status") == Status.REJECTED]
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
