"""What a split learns about trust after training, from its validation subjects only: the temperature and the
review band (docs/design.md, "Calibrated probabilities, patients and review"). Pure functions."""

from __future__ import annotations

import numpy as np

from .calibration import apply_temperature, fit_temperature, negative_log_likelihood
from .review import DEFAULT_COVERAGE, review_band

PAPER_NOTE = ("not calibrated: the paper protocol holds out no data that is never used for testing (its "
              "validation set is its test set), so its probabilities are the network's own")


def fit_on_validation(labels, prob_raw, subjects, target_coverage: float = DEFAULT_COVERAGE) -> dict:
    """{"calibration": …, "review": …} fitted on one split's validation cells."""
    labels, prob_raw = np.asarray(labels).astype(int), np.asarray(prob_raw, dtype=float)
    where = f"validation subjects: {len(labels)} cells of {len(set(subjects))} subjects"
    temperature = fit_temperature(prob_raw, labels)
    calibrated = apply_temperature(prob_raw, temperature)
    calibration = {"method": "temperature", "temperature": temperature, "fitted_on": where,
                   "validation_nll_before": negative_log_likelihood(labels, prob_raw),
                   "validation_nll_after": negative_log_likelihood(labels, calibrated)}
    return {"calibration": calibration, "review": review_band(calibrated, target_coverage, where)}


def not_fitted(note: str = PAPER_NOTE) -> dict:
    """What a split without validation data stores: no temperature, no review band, and why."""
    return {"calibration": {"method": "none", "temperature": None, "note": note}, "review": None}
