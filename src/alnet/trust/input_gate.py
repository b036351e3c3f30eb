"""The input gate as a whole: the image check, then the feature-space check, for batches of images; and the
features a trained network gives them (docs/design.md, "The input gate").

A refused image gets a reason and no label. Reasons start with their kind ("blank: …", "unlike the cells the
model was trained on: …"), which `reason_kind` returns, so that summaries can count them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.transforms import to_float
from ..models import penultimate
from .feature_check import FeatureGate, fit_feature_gate
from .image_check import ImageCheck, image_reason


@dataclass(frozen=True)
class InputGate:
    image: ImageCheck | None = field(default_factory=ImageCheck)  # None: no image check
    features: FeatureGate | None = None  # None: the model carries no feature gate (or it is turned off)

    def image_reasons(self, images: np.ndarray) -> list[str | None]:
        if self.image is None:
            return [None] * len(images)
        return [image_reason(pixels, self.image) for pixels in images]

    def feature_reasons(self, features: torch.Tensor | np.ndarray | None) -> list[str | None]:
        if self.features is None or features is None:
            return [None] * (0 if features is None else len(features))
        distances = self.features.distances(torch.as_tensor(np.asarray(features)).float())
        return [self.features.reason(float(d)) for d in distances]


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def count_reasons(reasons: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason_kind(reason)] = counts.get(reason_kind(reason), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


@torch.no_grad()
def network_features(model: nn.Module, images: torch.Tensor, rows: np.ndarray, batch_size: int = 64,
                     cached: torch.Tensor | None = None,
                     autocast: Callable[[str], contextlib.AbstractContextManager] = lambda device_type:
                     contextlib.nullcontext()) -> torch.Tensor:
    """Penultimate features (len(rows)×d, float32, CPU) of `rows` of the uint8 N×H×W×3 `images`, in eval mode.
    `cached`: backbone features already computed for every row (a frozen backbone), used instead of images."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            index = torch.from_numpy(np.asarray(rows[start:start + batch_size], dtype=np.int64))
            with autocast(device.type):
                if cached is not None:
                    features = model.forward_head(cached[index].to(device), pre_logits=True).flatten(1)
                else:
                    _, features = penultimate(model, to_float(images[index].to(device)))
            out.append(features.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 0))


def fit_gate(model: nn.Module, images: torch.Tensor, train: np.ndarray, val: np.ndarray,
             subjects: list[str] | None = None, seed: int = 0, cached: torch.Tensor | None = None,
             **kwargs) -> FeatureGate | None:
    """The feature gate of a trained network: fitted on its training cells, threshold from `val` (validation
    cells) or, without any, from the training cells cross-fitted by subject (`subjects`: one per training row)."""
    train_features = network_features(model, images, train, cached=cached, **kwargs)
    val_features = network_features(model, images, val, cached=cached, **kwargs) if len(val) else None
    return fit_feature_gate(train_features, val_features, subjects, seed=seed)
