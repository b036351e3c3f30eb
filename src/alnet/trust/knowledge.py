"""What a checkpoint carries about trust, beyond its weights: the calibration (`calibration`) and the review
band (`review`), as plain containers under top-level keys, so the file stays loadable with
`torch.load(weights_only=True)`. Values read back are checked: a checkpoint is a file a user hands in.
"""

from __future__ import annotations

import math

CALIBRATION_KEY, REVIEW_KEY = "calibration", "review"


def checkpoint_entries(calibration: dict | None, review: dict | None) -> dict:
    """The top-level checkpoint entries for `calibration` and `review`, for `checkpoint.add_to_checkpoint` to
    write (in the same rewrite as the input gate). A calibration without a temperature (the paper protocol's
    "none", whose note stays in metrics.json) is stored as None: no calibration."""
    stored = calibration if calibration and calibration.get("temperature") is not None else None
    return {CALIBRATION_KEY: stored, REVIEW_KEY: review}


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
