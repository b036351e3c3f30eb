"""One way in to every model: `create_model(name, **kwargs)` (a registry, as in timm)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .alnet import ALNet, alnet, probability_all

_REGISTRY: dict[str, Callable[..., nn.Module]] = {"alnet": alnet}


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


__all__ = ["ALNet", "create_model", "available_models", "register", "probability_all"]
