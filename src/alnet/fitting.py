"""The end of a split's training, in one stage (docs/design.md, "Calibrated probabilities, patients and review",
"The input gate", "int8 inference"). Called by `alnet train` for a CNN and a hybrid alike; `alnet quantize`
calls its int8 step.

1. **calibration and review band**, from the split's validation subjects only (subject protocol; a hybrid's
   exported graph has no temperature step, and the paper protocol validates on its test part, so neither is
   calibrated, and the note says why);
2. **the input gate's feature check**, fitted on the split's training cells, its threshold from held-out cells;
3. **the int8 form's calibration** (models that can fold their BatchNorm: ALNet), on up to 256 training cells;
4. `store`: all of it into the chosen checkpoint, in one atomic rewrite.

`Fitted.pipeline` then answers the split's test cells exactly as `alnet predict` will answer with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import add_to_checkpoint
from .config import RunConfig
from .data.cnmc import Cell
from .data.protocols import Split
from .device import Precision
from .int8 import Int8Error, calibrate, calibration_images, supports_int8
from .models import model_spec
from .pipeline import Pipeline, cache_batches, torch_network
from .schema import CALIBRATION_KEY, INPUT_GATE_KEY, INT8_KEY, REVIEW_KEY
from .trust.calibration import (
    UNBOUNDED_NOTE,
    apply_temperature,
    every_call_right,
    fit_temperature,
    negative_log_likelihood,
)
from .trust.feature_check import FeatureGate
from .trust.image_check import ImageCheck
from .trust.input_gate import InputGate, fit_gate
from .trust.review import DEFAULT_COVERAGE, review_band

PAPER_NOTE = ("not calibrated: the paper protocol holds out no data that is never used for testing (its "
              "validation set is its test set), so its probabilities are the network's own")
HYBRID_NOTE = ("not calibrated: a hybrid's exported graph has no calibration step, so its probabilities are the "
               "classifier's own")
DIVERGED_NOTE = ("not calibrated: the network's P(ALL) on validation cells is not a number (NaN or infinite), as "
                 "after training diverged")


@dataclass
class Fitted:
    """What a split learned after training, beyond its weights."""

    calibration: dict  # {"method": "temperature", "temperature": T, …} or {"method": "none", …, "note": why}
    review: dict | None  # the review band, or None
    feature_gate: FeatureGate | None
    int8: dict | None = None

    @property
    def trust(self) -> dict:
        """folds/<fold>/trust.json, and what metrics.json's calibration and review entries start from."""
        return {"calibration": self.calibration, "review": self.review}

    @property
    def temperature_calibration(self) -> dict | None:
        """The calibration as a checkpoint stores it and a pipeline applies it: None without a temperature (the
        note of "none" stays in metrics.json and trust.json)."""
        return self.calibration if self.calibration.get("temperature") is not None else None

    def store(self, checkpoint: Path | str) -> None:
        """Into the chosen checkpoint, in one atomic rewrite (`checkpoint.add_to_checkpoint`)."""
        entries = {CALIBRATION_KEY: self.temperature_calibration, REVIEW_KEY: self.review}
        if self.feature_gate is not None:
            entries[INPUT_GATE_KEY] = {"features": self.feature_gate.to_state()}
        if self.int8 is not None:
            entries[INT8_KEY] = self.int8
        add_to_checkpoint(checkpoint, entries)

    def pipeline(self, model: nn.Module, config: RunConfig, runs_as: Precision, source: Path) -> Pipeline:
        """The pipeline that answers this split's test cells, as `alnet predict` will with the checkpoint."""
        return Pipeline(torch_network(model, runs_as, config.head), config.model, config.preprocessing, Path(source),
                        self.temperature_calibration, self.review, InputGate(ImageCheck(), self.feature_gate))


def fit_on_validation(labels, prob_raw, subjects, target_coverage: float = DEFAULT_COVERAGE) -> dict:
    """{"calibration": …, "review": …} fitted on one split's validation cells (raw P(ALL) and true labels)."""
    labels, prob_raw = np.asarray(labels).astype(int), np.asarray(prob_raw, dtype=float)
    if not np.isfinite(prob_raw).all():
        return not_fitted(DIVERGED_NOTE)
    where = f"validation subjects: {len(labels)} cells of {len(set(subjects))} subjects"
    temperature = fit_temperature(prob_raw, labels)
    calibrated = apply_temperature(prob_raw, temperature)
    calibration = {"method": "temperature", "temperature": temperature, "fitted_on": where,
                   "validation_nll_before": negative_log_likelihood(labels, prob_raw),
                   "validation_nll_after": negative_log_likelihood(labels, calibrated),
                   **({"note": UNBOUNDED_NOTE} if every_call_right(prob_raw, labels) else {})}
    return {"calibration": calibration, "review": review_band(calibrated, target_coverage, where)}


def not_fitted(note: str = PAPER_NOTE) -> dict:
    """What a split without validation data to calibrate on stores: no temperature, no review band, and why."""
    return {"calibration": {"method": "none", "temperature": None, "note": note}, "review": None}


def fit_after_training(model: nn.Module, images: torch.Tensor, cells: list[Cell], split: Split, config: RunConfig,
                       runs_as: Precision, cached: torch.Tensor | None = None, int8: bool = True) -> Fitted:
    """Steps 1–3 for a trained `model` (the chosen weights) of `split`, over the uint8 cache `images`.
    `cached`: a frozen backbone's features of every row, used for the feature check instead of the images;
    `int8`: calibrate the int8 form (one process of several does it)."""
    if model_spec(config.model).hybrid:
        trust = not_fitted(HYBRID_NOTE)
    elif config.protocol == "subject" and len(split.val) > 0:
        network = torch_network(model, runs_as, config.head)
        raw = np.concatenate([network(batch).probability_raw for batch in cache_batches(images, split.val)])
        trust = fit_on_validation([cells[i].label for i in split.val], raw, [cells[i].subject for i in split.val])
    else:
        trust = not_fitted()
    # The gate's threshold comes from validation cells only where they are not the test cells (the paper protocol
    # validates on its test part): otherwise from the training cells, cross-fitted by subject.
    feature_gate = fit_gate(model, images, split.train, np.setdiff1d(split.val, split.test),
                            [cells[i].subject for i in split.train], seed=config.seed, cached=cached,
                            autocast=runs_as.autocast)
    # The int8 form learns its activation ranges from training cells, as they come into the model. A network its
    # int8 form cannot follow gets none: `--int8` then says so, and `alnet quantize` says why.
    int8_entry = None
    if int8 and supports_int8(model) and len(split.train):
        try:
            int8_entry = calibrate(model, calibration_images(images, split.train, seed=config.seed))
        except Int8Error:
            int8_entry = None
    return Fitted(trust["calibration"], trust["review"], feature_gate, int8_entry)
