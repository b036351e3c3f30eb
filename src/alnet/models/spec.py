"""The contract every model of the registry keeps, so that the rest of alnet asks a model instead of branching
on its name (as timm does it):

- `forward(x)` = `forward_head(forward_features(x))`: [0, 1] images N×3×H×W → two logits (HEM, ALL).
- `forward_features(x)`: what the backbone computes (maps for ALNet, penultimate vectors for a torchvision
  backbone); a frozen model's features can be computed once and the head trained on them.
- `forward_head(features, pre_logits=False)`: the classifier; `pre_logits=True` stops before the last layer
  and returns `num_features` values per image.
- `frozen`: the backbone is a fixed feature extractor (only the head trains).
- `feature_maps(x, layers)`: activations of named layers, convolutions after their ReLU (the paper's Fig. 5).

What does not depend on an instance lives in its `ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    # Builder argument → the RunConfig field it comes from: the settings this model takes from a run.
    settings: dict[str, str]
    gradcam_layer: str  # late enough to be class-specific, early enough to be sharp
    feature_layers: tuple[str, ...]  # the paper's Fig. 5 shows the first and the sixth layer
    # Normalisation applied inside the model to its [0, 1] input (None: the input is used as it is).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    frozen: bool = False  # a fixed feature extractor unless fine-tuned (the paper's baselines)
    pretrained: bool = False  # starts from ImageNet weights unless told otherwise
    description: str = ""
    hybrid: bool = False  # frozen features + a scikit-learn classifier, fitted rather than trained (hybrid.py)
    trained_backbones: tuple[str, ...] = ()  # hybrid backbones whose weights come from a trained checkpoint


class CellModel(nn.Module):
    """Base of every registered model: the shared parts of the contract above."""

    num_features: int

    @property
    def frozen(self) -> bool:
        return False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def feature_maps(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Activations (N×C×H×W) of the named modules for a batch, after ReLU."""
        modules = dict(self.named_modules())
        unknown = [name for name in layers if name not in modules]
        if unknown:
            raise ValueError(f"unknown layer(s) {', '.join(unknown)}; for example {', '.join(list(modules)[1:8])}")
        captured: dict[str, torch.Tensor] = {}
        hooks = [modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, torch.relu(out).detach()))
            for name in layers]
        try:
            self(x)
        finally:
            for hook in hooks:
                hook.remove()
        return captured


def penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) in one pass, by the model contract (the contract above)."""
    features = model.forward_features(x)
    return model.forward_head(features), model.forward_head(features, pre_logits=True).flatten(1)


class Penultimate(nn.Module):
    """`penultimate` as a module: what the exporters and the int8 model trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return penultimate(self.model, x)
