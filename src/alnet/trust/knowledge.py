"""What a checkpoint carries about trust, beyond its weights: the calibration (`calibration`) and the review
band (`review`), as plain containers under top-level keys, so the file stays loadable with
`torch.load(weights_only=True)`. Values read back are checked: a checkpoint is a file a user hands in.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CALIBRATION_KEY, REVIEW_KEY = "calibration", "review"


def add_to_checkpoint(path: Path | str, calibration: dict | None, review: dict | None) -> None:
    """Write `calibration` and `review` into a checkpoint, atomically (a new file renamed over the old one, so
    a reader never sees half a file and a crash leaves the old one whole). A calibration without a temperature
    (the paper protocol's "none", whose note stays in metrics.json) is stored as None: no calibration."""
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint[CALIBRATION_KEY] = calibration if calibration and calibration.get("temperature") is not None else None
    checkpoint[REVIEW_KEY] = review
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _number(value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise TypeError(f"{value!r} is not a number in [{low}, {high}]")
    return float(value)


def checked_calibration(value) -> dict | None:
    """The checkpoint's `calibration`, or None when it has none; TypeError when it is malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("calibration is not a mapping")
    if value.get("temperature") is None:
        return None  # stored as "not calibrated", with a note
    return {**value, "temperature": _number(value["temperature"], 1e-3, 1e3)}


def checked_review(value) -> dict | None:
    """The checkpoint's `review` band, or None; TypeError when it is malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("review is not a mapping")
    return {**value, "half_width": _number(value.get("half_width"), 0.0, 0.5)}
