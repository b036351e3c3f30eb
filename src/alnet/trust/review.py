""""Needs review": cells whose answer is too close to call (docs/design.md, "Calibrated probabilities, patients
and review").

A cell is flagged when its calibrated P(ALL) lies within `half_width` of the decision threshold, or, with
test-time augmentation, when its flipped variants do not all get the same call. A flagged cell keeps its label:
review says "look at this one", it does not withhold the answer. The half-width is chosen on validation data
so that a target share of cells (default 90 %) is answered without review.
"""

from __future__ import annotations

import numpy as np

from ..labels import THRESHOLD, Status, is_all

DEFAULT_COVERAGE = 0.9  # the share of validation cells answered without review


def margin(prob) -> np.ndarray:
    """Distance of each P(ALL) from the decision threshold: 0 is a coin toss, 0.5 is certainty."""
    return np.abs(np.asarray(prob, dtype=np.float64) - THRESHOLD)


def choose_half_width(prob_calibrated, target_coverage: float = DEFAULT_COVERAGE) -> float:
    """The largest half-width that still answers at least `target_coverage` of these cells.

    With the margins sorted, at most k = ⌊(1 − coverage)·n⌋ cells may be flagged; a cell is flagged when its
    margin is strictly below the half-width, so the (k+1)-th smallest margin is the band's edge."""
    if not 0 < target_coverage <= 1:
        raise ValueError(f"target coverage {target_coverage} is not in (0, 1]")
    margins = np.sort(margin(prob_calibrated))
    flagged = int(np.floor((1 - target_coverage) * len(margins) + 1e-9))
    if len(margins) == 0 or flagged == 0:
        return 0.0
    return float(margins[flagged])


def review_band(prob_calibrated, target_coverage: float = DEFAULT_COVERAGE, fitted_on: str = "") -> dict:
    """What the checkpoint stores under `review`: the band and how it was chosen."""
    half_width = choose_half_width(prob_calibrated, target_coverage)
    answered = float((margin(prob_calibrated) >= half_width).mean()) if len(prob_calibrated) else float("nan")
    return {"threshold": THRESHOLD, "half_width": half_width, "target_coverage": target_coverage,
            "validation_coverage": answered, "fitted_on": fitted_on}


def flagged(prob_calibrated, half_width: float | None, variants=None) -> np.ndarray:
    """True for each cell that needs review. `variants`: calibrated P(ALL) per test-time-augmentation
    variant (variants × cells), or None."""
    prob = np.asarray(prob_calibrated, dtype=np.float64)
    close = margin(prob) < half_width if half_width else np.zeros(len(prob), dtype=bool)
    return close | disagreeing(variants, len(prob))


def disagreeing(variants, cells: int) -> np.ndarray:
    """True where the test-time-augmentation variants do not all give the same call."""
    if variants is None:
        return np.zeros(cells, dtype=bool)
    calls = is_all(np.asarray(variants))
    return calls.any(axis=0) & ~calls.all(axis=0)


def statuses(prob_calibrated, half_width: float | None, variants=None) -> list[tuple[Status, str]]:
    """(status, reason) per cell: (OK, "") or (REVIEW, why in words); `alnet.pipeline` puts the input gate's
    REJECTED before them."""
    prob = np.asarray(prob_calibrated, dtype=np.float64)
    split = disagreeing(variants, len(prob))
    calls_all = None if variants is None else is_all(np.asarray(variants)).sum(axis=0)
    out = []
    for i, p in enumerate(prob):
        reasons = []
        if half_width and margin(p) < half_width:
            reasons.append(f"P(ALL) {p:.3f} is within {half_width:.3f} of the threshold {THRESHOLD}")
        if split[i]:
            reasons.append(f"test-time flips disagree ({int(calls_all[i])} of {len(variants)} call ALL)")
        out.append((Status.REVIEW, "; ".join(reasons)) if reasons else (Status.OK, ""))
    return out


def risk_coverage(labels, prob) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (share of cells answered) and risk (error rate among them) when cells are answered from the
    most confident down: the curve a review band moves along."""
    labels, prob = np.asarray(labels).astype(int), np.asarray(prob, dtype=np.float64)
    if len(labels) == 0:
        return np.array([]), np.array([])
    order = np.argsort(-margin(prob), kind="mergesort")
    wrong = (is_all(prob[order]) != (labels[order] == 1)).astype(float)
    answered = np.arange(1, len(labels) + 1)
    return answered / len(labels), np.cumsum(wrong) / answered


def review_entry(labels, prob_calibrated, band: dict | None) -> dict:
    """metrics.json's `review` for one test set: the band, the share of cells answered without review and the
    error rate among them, next to the error rate over every cell."""
    labels, prob = np.asarray(labels).astype(int), np.asarray(prob_calibrated, dtype=np.float64)
    wrong = is_all(prob) != (labels == 1)
    error_all = float(wrong.mean()) if len(labels) else float("nan")
    if not band:
        return {"half_width": None, "note": "no review band (no validation data to choose it on)",
                "coverage": 1.0 if len(labels) else float("nan"), "error_answered": error_all,
                "error_all": error_all}
    answered = ~flagged(prob, band["half_width"])
    return {"half_width": band["half_width"], "target_coverage": band.get("target_coverage"),
            "coverage": float(answered.mean()) if len(labels) else float("nan"),
            "error_answered": float(wrong[answered].mean()) if answered.any() else float("nan"),
            "error_all": error_all, "flagged": int((~answered).sum())}
