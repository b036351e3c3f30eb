"""The feature-space check: how far an image's penultimate features lie from the training cells' (Mahalanobis
distance to a Gaussian with a Ledoit-Wolf shrunk covariance), and the threshold beyond which it is refused.

Pure functions on tensors; what is stored in a checkpoint is `FeatureGate.to_state()`: plain containers and
tensors, loadable with `torch.load(weights_only=True)` (docs/design.md, "The input gate").
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

QUANTILE = 0.99  # of the held-out distances of in-distribution cells
# The quantile of a few dozen held-out cells is a noisy estimate, and a new patient's cells (another stain, another
# day) lie further than held-out cells of the training patients: the threshold is this multiple of it (on the
# distance, not its square). Models trained on 9-32 real cells put unseen subjects' cells at up to 2.2 × the
# quantile (docs/design.md, "The input gate"); non-cell pictures the image check lets through lie further.
MARGIN = 2.5
CROSS_FOLDS = 5  # held-out distances without validation cells: the training cells, 5-fold cross-fitted
MAX_DIMENSIONS = 8192  # penultimate features per image (ALNet 128, VGG16 4096): a larger claim is not ours
MIN_CELLS = 4  # fewer training cells than this give no covariance worth the name: no feature check


@dataclass(frozen=True)
class FeatureGate:
    mean: torch.Tensor  # (d,)
    precision: torch.Tensor  # (d, d): the inverse of the shrunk covariance
    threshold: float  # refuse when the distance is above it
    quantile: float
    margin: float
    reference: float  # the quantile itself, before the margin
    held_out: str  # where the held-out distances came from
    cells: int  # training cells it was fitted on

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        return mahalanobis(features, self.mean, self.precision)

    def reason(self, distance: float) -> str | None:
        if math.isfinite(distance) and distance <= self.threshold:
            return None
        return (f"unlike the cells the model was trained on: its features lie {distance:.1f} from theirs (limit "
                f"{self.threshold:.1f}, {self.margin:g} × the {self.quantile:.0%} quantile of held-out cells)")

    def to_state(self) -> dict:
        return {"mean": self.mean.float().contiguous(), "precision": self.precision.float().contiguous(),
                "threshold": float(self.threshold), "quantile": float(self.quantile), "margin": float(self.margin),
                "reference": float(self.reference), "held_out": self.held_out, "cells": int(self.cells)}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureGate":
        """From a model file, which may be hostile: a ValueError unless the shapes and numbers are sane."""
        try:
            mean, precision = state["mean"], state["precision"]
            if not (isinstance(mean, torch.Tensor) and isinstance(precision, torch.Tensor)):
                raise TypeError("mean and precision must be tensors")
            d = mean.numel()
            if mean.shape != (d,) or precision.shape != (d, d) or not 0 < d <= MAX_DIMENSIONS:
                raise ValueError(f"shapes {tuple(mean.shape)} and {tuple(precision.shape)} do not match")
            gate = cls(mean.float(), precision.float(), float(state["threshold"]), float(state["quantile"]),
                       float(state["margin"]), float(state["reference"]), str(state["held_out"])[:200],
                       int(state["cells"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"unreadable feature gate ({type(err).__name__}: {err})") from None
        if not (math.isfinite(gate.threshold) and gate.threshold > 0 and torch.isfinite(gate.mean).all()
                and torch.isfinite(gate.precision).all()):
            raise ValueError("feature gate with a non-finite or non-positive threshold")
        return gate

    def to_json(self) -> str:
        """For a model file's metadata (ONNX): the numbers as JSON, the tensors as base64 float32 little-endian."""
        state = self.to_state()
        for key in ("mean", "precision"):
            state[key] = base64.b64encode(state[key].numpy().astype("<f4").tobytes()).decode()
        return json.dumps({**state, "dimensions": int(self.mean.numel())})

    @classmethod
    def from_json(cls, text: str) -> "FeatureGate":
        """From a model file's metadata, which may be hostile: sizes are checked before anything is decoded."""
        try:
            state = json.loads(text)
            d = int(state["dimensions"])
            if not 0 < d <= MAX_DIMENSIONS:
                raise ValueError(f"{d} feature dimensions")
            arrays = {}
            for key, count in (("mean", d), ("precision", d * d)):
                encoded = state[key]
                if not isinstance(encoded, str) or len(encoded) != 4 * -(-4 * count // 3):
                    raise ValueError(f"{key} is not {count} base64 float32 values")
                arrays[key] = torch.from_numpy(
                    np.frombuffer(base64.b64decode(encoded, validate=True), dtype="<f4").astype(np.float32))
            state = {**state, "mean": arrays["mean"], "precision": arrays["precision"].reshape(d, d)}
        except (KeyError, TypeError, ValueError, binascii.Error) as err:
            raise ValueError(f"unreadable feature gate ({type(err).__name__})") from None
        return cls.from_state(state)


def ledoit_wolf(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, shrunk covariance) of n×d features: Ledoit & Wolf (2004), the shrinkage scikit-learn computes,
    towards a multiple of the identity. Well conditioned even with fewer cells than features (n < d)."""
    x = features.double()
    n, d = x.shape
    mean = x.mean(0)
    x = x - mean
    cov = x.T @ x / n
    mu = torch.trace(cov) / d
    x2 = x * x
    beta_ = (x2.T @ x2).sum()
    delta_ = (cov * cov).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * torch.trace(cov) + d * mu**2) / d
    beta = torch.minimum(beta, delta)
    shrinkage = 0.0 if float(delta) == 0 else float(beta / delta)
    # A floor under the scale: features that never vary (a dead unit everywhere) must not make it singular.
    mu = torch.clamp(mu, min=1e-6)
    shrunk = (1 - shrinkage) * cov + shrinkage * mu * torch.eye(d, dtype=x.dtype)
    return mean, shrunk + 1e-9 * mu * torch.eye(d, dtype=x.dtype)


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """The Mahalanobis distance (not squared) of each row of n×d features."""
    diff = features.double() - mean.double()
    squared = ((diff @ precision.double()) * diff).sum(1)
    return squared.clamp(min=0).sqrt().float()


def _fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, cov = ledoit_wolf(features)
    return mean, torch.linalg.inv(cov)


def _cross_fitted(features: torch.Tensor, groups: list[str] | None, folds: int, seed: int) -> torch.Tensor:
    """Each training cell's distance to a Gaussian fitted on the other folds: held out from the fit, though
    not from the network (it saw them all). Folds are made of whole subjects where `groups` names them, so a
    held-out cell is a new patient's, as a new cell will be."""
    n = len(features)
    generator = torch.Generator().manual_seed(seed)
    if groups is not None and len(set(groups)) >= 2:
        names = sorted(set(groups))
        shuffled = [names[i] for i in torch.randperm(len(names), generator=generator)]
        fold_of = {name: i % folds for i, name in enumerate(shuffled)}
        assignment = torch.tensor([fold_of[g] for g in groups])
    else:
        assignment = torch.empty(n, dtype=torch.long)
        assignment[torch.randperm(n, generator=generator)] = torch.arange(n) % folds
    out = torch.empty(n)
    for k in assignment.unique():
        held = assignment == k
        mean, precision = _fit(features[~held])
        out[held] = mahalanobis(features[held], mean, precision)
    return out


def fit_feature_gate(train: torch.Tensor, val: torch.Tensor | None = None, groups: list[str] | None = None,
                     quantile: float = QUANTILE, margin: float = MARGIN, seed: int = 0) -> FeatureGate | None:
    """The feature gate of a model from its training cells' features (n×d), its threshold from held-out cells:
    `val` (validation subjects) when there are some, else the training cells cross-fitted, by subject where
    `groups` gives each cell's. None when there are too few training cells to fit a covariance."""
    train = train.float().flatten(1)
    if len(train) < MIN_CELLS:
        return None
    mean, precision = _fit(train)
    # The training cells, each scored by a fit without its fold, are held-out distances too: pooled with the
    # validation cells' they make the quantile less noisy, and alone they are the fallback without validation.
    held = _cross_fitted(train, groups, CROSS_FOLDS, seed)
    by = "by subject" if groups is not None and len(set(groups)) >= 2 else "by cell"
    source = f"{len(train)} training cells, {CROSS_FOLDS}-fold cross-fitted {by}"
    if val is not None and len(val) > 0:
        held = torch.cat([held, mahalanobis(val.float().flatten(1), mean, precision)])
        source += f", and {len(val)} validation cells"
    reference = float(torch.quantile(held.double(), quantile))
    return FeatureGate(mean.float(), precision.float(), margin * reference, quantile, margin, reference, source,
                       len(train))


def penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) in one pass, by the model contract (models/spec.py)."""
    features = model.forward_features(x)
    return model.forward_head(features), model.forward_head(features, pre_logits=True).flatten(1)


class Penultimate(nn.Module):
    """`penultimate` as a module: what the exporters and the int8 model trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return penultimate(self.model, x)
