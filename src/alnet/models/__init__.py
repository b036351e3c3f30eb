"""One way in to every model: `create_model(name, **kwargs)`, a registry of `ModelSpec`s (as in timm).

Each model module declares its specs (`alnet.SPECS`, `transfer.SPECS`); every model keeps the contract of
`spec.py`, so callers ask the model or its spec instead of branching on its name.
"""

from __future__ import annotations

from torch import nn

from . import alnet, hybrid, transfer
from .alnet import ALNet
from .head import HEADS, probability_all
from .hybrid import ClassifierError, HybridNet, split_model_list
from .spec import CellModel, ModelSpec, Penultimate, penultimate
from .transfer import TransferNet, WeightsError

_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (*alnet.SPECS, *transfer.SPECS)}


def available_models() -> list[str]:
    """The registered models; hybrids (`resnet50+svm`, `alexnet,vgg16+pca+rf`, …) are built from these."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    name = name.lower().strip()
    if hybrid.is_hybrid_name(name):
        return hybrid.spec_for(name, _REGISTRY)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(available_models())}, or a hybrid "
                         "such as resnet50+svm") from None


def is_model(name: str) -> bool:
    try:
        model_spec(name)
        return True
    except ValueError:
        return False


def create_model(name: str, **kwargs) -> CellModel:
    return model_spec(name).build(**kwargs)


def create_model_from(config, **overrides) -> CellModel:
    """The model a run configuration describes (`config.model` with the settings its spec takes from the run).
    `overrides` replace settings the model takes and are ignored by models that do not take them (e.g.
    `pretrained=False` to build a baseline without reading ImageNet weights, before loading a checkpoint)."""
    spec = model_spec(config.model)
    kwargs = {argument: getattr(config, field) for argument, field in spec.settings.items()}
    kwargs.update({k: v for k, v in overrides.items() if k in spec.settings})
    return spec.build(**kwargs)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ALNet", "CellModel", "ClassifierError", "HEADS", "HybridNet", "ModelSpec", "Penultimate", "TransferNet",
           "WeightsError", "penultimate",
           "available_models", "create_model", "create_model_from", "is_model", "model_spec", "probability_all",
           "split_model_list", "trainable_parameters"]
