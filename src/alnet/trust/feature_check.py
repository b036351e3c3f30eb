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
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:  # 10**400 or inf: Overflow
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
        except (KeyError, TypeError, ValueError, binascii.Error, OverflowError) as err:
            raise ValueError(f"unreadable feature gate ({type(err).__name__})") from None
        return cls.from_state(state)


def _shrinkage(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(mean, centred features, a, c) such that the shrunk covariance is a·XᵀX + c·I: scikit-learn's Ledoit & Wolf
    (2004) shrinkage s towards μ·I (μ the mean variance), a = (1 − s)/n, c = s·μ plus a floor of 1e-9·μ, so that
    features that never vary (a dead unit everywhere) cannot make it singular."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    n, d = centred.shape
    shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True)) if n > 1 else 1.0
    mu = float((centred * centred).sum()) / (n * d)
    return mean, centred, (1 - shrinkage) / n, shrinkage * mu + 1e-9 * max(mu, 1e-6)


def ledoit_wolf(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, shrunk covariance) of n×d features, float64: scikit-learn's Ledoit-Wolf estimate (with a floor on
    the diagonal), well conditioned even with fewer cells than features (n < d)."""
    mean, x, a, c = _shrinkage(features)
    return mean, a * x.T @ x + c * torch.eye(x.shape[1], dtype=x.dtype)


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """The Mahalanobis distance (not squared) of each row of n×d features."""
    diff = features.double() - mean.double()
    squared = ((diff @ precision.double()) * diff).sum(1)
    return squared.clamp(min=0).sqrt().float()


def _fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, precision: the inverse of the shrunk covariance a·XᵀX + c·I). With fewer cells than features (VGG16:
    4,096 features, a few hundred cells) through the Woodbury identity, (c·I + a·XᵀX)⁻¹ = (I − a·Xᵀ(c·I + a·XXᵀ)⁻¹X)/c,
    which inverts an n×n matrix instead of a d×d one: the same matrix, in a fraction of the time."""
    mean, x, a, c = _shrinkage(features)
    n, d = x.shape
    if n >= d:
        return mean, torch.linalg.inv(a * x.T @ x + c * torch.eye(d, dtype=x.dtype))
    precision = x.T @ torch.linalg.solve(c * torch.eye(n, dtype=x.dtype) + a * x @ x.T, x)
    precision.mul_(-a).diagonal().add_(1.0)  # in place: d×d float64 is 134 MB at VGG16's 4,096 features
    return mean, precision.div_(c)


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
        out[held] = _distances_to_fit(features[~held], features[held])
    return out


def _distances_to_fit(fitted_on: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`mahalanobis(features, *_fit(fitted_on))` without the d×d precision matrix when the fit has fewer cells than
    features: by Woodbury, δᵀPδ = (|δ|² − a·(Xδ)ᵀ(c·I + a·XXᵀ)⁻¹(Xδ))/c."""
    mean, x, a, c = _shrinkage(fitted_on)
    n, d = x.shape
    if n >= d:
        return mahalanobis(features, *_fit(fitted_on))
    diff = features.double() - mean
    projected = diff @ x.T
    inside = torch.linalg.solve(c * torch.eye(n, dtype=x.dtype) + a * x @ x.T, projected.T).T
    squared = ((diff * diff).sum(1) - a * (projected * inside).sum(1)) / c
    return squared.clamp(min=0).sqrt().float()


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
