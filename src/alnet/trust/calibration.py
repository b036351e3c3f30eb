"""Temperature scaling of P(ALL), and the scores that say how well probabilities are calibrated
(docs/design.md, "Calibrated probabilities, patients and review").

The network's P(ALL) `p` becomes σ(logit(p) / T). One parameter, fitted by minimising the negative
log-likelihood on the validation subjects of a split (never on its test subjects). Dividing the logit by a
positive number keeps every ranking (AUC is unchanged) and keeps 0.5 where it is (every call is unchanged);
only how sure the answer sounds changes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6  # P(ALL) is clipped to [EPS, 1 - EPS] before its logit: a saturated output stays finite
ECE_BINS = 15  # equal-width bins, as in the literature on C-NMC calibration
# 1/T is kept within these bounds: validation cells that the model separates perfectly would drive T to 0
# (every answer 0 or 1), which no test set deserves.
INVERSE_TEMPERATURE_RANGE = (0.05, 20.0)


def logit_torch(prob: torch.Tensor) -> torch.Tensor:
    """logit(p) with p clipped to [EPS, 1 - EPS]; written with log and clamp so that it exports to ONNX."""
    p = prob.clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log1p(-p)


def apply_temperature_torch(prob: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """Calibrated P(ALL) of raw P(ALL) values (a tensor; used inside the exported graph too); `None` (no
    calibration) returns them unchanged."""
    return prob if temperature is None else torch.sigmoid(logit_torch(prob) / temperature)


def apply_temperature(prob, temperature: float | None) -> np.ndarray:
    """Calibrated P(ALL) of raw P(ALL) values; `None` (no calibration) returns them unchanged."""
    prob = torch.from_numpy(np.asarray(prob, dtype=np.float64))
    return apply_temperature_torch(prob, None if temperature is None else float(temperature)).numpy()


def negative_log_likelihood(labels, prob) -> float:
    """Mean binary cross-entropy of P(ALL) against the labels (P(ALL) clipped to [EPS, 1 - EPS])."""
    p = torch.as_tensor(np.asarray(prob, dtype=np.float64)).clamp(EPS, 1 - EPS)
    return float(F.binary_cross_entropy(p, torch.as_tensor(np.asarray(labels, dtype=np.float64))))


UNBOUNDED_NOTE = ("every validation cell was called right, so these cells put no limit on how sure P(ALL) may be: "
                  "the network's own probabilities are kept")


def every_call_right(prob_raw, labels) -> bool:
    """Whether no cell is on the wrong side of 0.5 (a cell at exactly 0.5 costs log 2 at any T). Then the NLL of
    σ(logit(p) / T) falls without end as T → 0: the data say only "sharper is better", not how sharp."""
    labels, prob_raw = np.asarray(labels), np.asarray(prob_raw, dtype=np.float64)
    margin = np.where(labels == 1, prob_raw - 0.5, 0.5 - prob_raw)  # NaN is never right
    return len(labels) > 0 and bool(np.all(margin >= 0)) and bool(np.any(margin > 0))


def fit_temperature(prob_raw, labels) -> float:
    """The temperature T that minimises the NLL of σ(logit(p) / T) on (prob_raw, labels).

    The NLL is convex in 1/T (a one-coefficient logistic regression on the logit), so L-BFGS finds the
    minimum and clamping it to INVERSE_TEMPERATURE_RANGE gives the minimum within that range. T = 1 (no
    change) is kept whenever the fit does not lower the NLL as `negative_log_likelihood` reports it, so
    calibration never worsens it on these data; where every call is right, since there the minimum is at
    T → 0 (`every_call_right`) and a small split's few validation cells would make every later answer nearly 0
    or 1, however wrong; and where a probability is not a number. Labels must be 0 (HEM) or 1 (ALL)."""
    prob_raw, labels = np.asarray(prob_raw, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if prob_raw.shape != labels.shape or prob_raw.ndim != 1:
        raise ValueError(f"{prob_raw.shape} probabilities for {labels.shape} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (HEM) or 1 (ALL)")
    if len(labels) == 0 or labels.min() == labels.max() or not np.isfinite(prob_raw).all():
        return 1.0  # one class only (nothing to calibrate against) or a network that gave no number
    if every_call_right(prob_raw, labels):
        return 1.0
    z = logit_torch(torch.as_tensor(prob_raw))
    y = torch.as_tensor(labels)
    inverse = torch.ones((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([inverse], lr=1.0, max_iter=200, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z * inverse, y)
        loss.backward()
        return loss

    optimiser.step(closure)
    low, high = INVERSE_TEMPERATURE_RANGE
    fitted = float(inverse.detach().clamp(low, high))
    if not np.isfinite(fitted):
        return 1.0
    lowered = (negative_log_likelihood(labels, apply_temperature(prob_raw, 1.0 / fitted))
               < negative_log_likelihood(labels, prob_raw))
    return 1.0 / fitted if lowered else 1.0


def calibration_scores(labels, prob) -> dict[str, float]:
    """ECE (15 equal-width bins, L1), Brier score and NLL of P(ALL); NaN for an empty set."""
    # Imported here: inference uses this module's temperature functions and never needs torchmetrics.
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.classification import binary_calibration_error

    labels = np.asarray(labels)
    if len(labels) == 0:
        return {"ece": float("nan"), "brier": float("nan"), "nll": float("nan")}
    p = torch.as_tensor(np.asarray(prob, dtype=np.float64)).float()
    y = torch.as_tensor(labels.astype(np.int64))
    return {
        "ece": float(binary_calibration_error(p, y, n_bins=ECE_BINS, norm="l1")),
        "brier": float(mean_squared_error(p, y.float())),
        "nll": negative_log_likelihood(labels, prob),
    }


def reliability(labels, prob, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of P(ALL): mean P(ALL), share of ALL cells, and cells (empty bins left out), for the
    reliability diagram."""
    labels, prob = np.asarray(labels, dtype=float), np.asarray(prob, dtype=float)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    used = counts > 0
    mean_p = np.bincount(which, weights=prob, minlength=bins)[used] / counts[used]
    share = np.bincount(which, weights=labels, minlength=bins)[used] / counts[used]
    return mean_p, share, counts[used]


def calibration_entry(labels, prob_raw, calibration: dict | None) -> dict:
    """metrics.json's `calibration` for one test set: the fitted parameters and the scores before and after,
    or, without a calibration, the raw scores and why there is none."""
    before = calibration_scores(labels, prob_raw)
    if not calibration or calibration.get("temperature") is None:
        note = (calibration or {}).get("note", "not calibrated: no calibration recorded for this model")
        return {"method": "none", "note": note, "before": before, "after": None}
    temperature = float(calibration["temperature"])
    return {**calibration, "before": before,
            "after": calibration_scores(labels, apply_temperature(prob_raw, temperature))}
