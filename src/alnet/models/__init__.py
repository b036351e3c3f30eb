"""One way in to every model: `create_model(name, **kwargs)` (a registry, as in timm)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from . import transfer
from .alnet import ALNet, alnet, probability_all
from .transfer import TransferNet, WeightsError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {"alnet": alnet}
_REGISTRY.update({name: transfer.builder(name) for name in transfer.BACKBONES})


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    _REGISTRY[name] = builder


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    try:
        builder = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(available_models())}") from None
    return builder(**kwargs)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ALNet", "TransferNet", "WeightsError", "create_model", "available_models", "register",
           "probability_all", "trainable_parameters"]
