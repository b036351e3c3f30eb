"""The paper's transfer-learning baselines: ImageNet backbones from torchvision, frozen, with a new head.

As in the paper (Table 8), each backbone is a fixed feature extractor: its ImageNet weights stay as they are
and only a new two-output head is trained (`finetune=True` trains the backbone too). Inputs are normalised with
ImageNet's mean and std inside the model, so callers pass the same [0, 1] images as to ALNet.

Weights are found the torchvision way — `$TORCH_HOME/hub/checkpoints/<official file name>` — or passed as
`weights=FILE`. When neither exists, the official file is downloaded; without a network that stops with a
message naming the exact file and folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn

from .spec import CellModel, ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(Exception):
    """Pretrained weights could not be found or read; the message names the file and where it should go."""


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., nn.Module]
    weights: tvm.WeightsEnum  # the ImageNet weights the paper's Keras models correspond to (V1)
    features: int  # width of the penultimate layer, where the new head attaches
    classifier: str  # the attribute holding the ImageNet classifier, cut off at the penultimate layer
    build_kwargs: dict = field(default_factory=dict)
    # Keys of the official weights file that belong to parts not built here (GoogLeNet's auxiliary classifiers).
    unused_prefix: str | None = None
    # Build arguments that depend on whether ImageNet weights are loaded (torchvision's own convention).
    pretrained_kwargs: Callable[[bool], dict] = lambda pretrained: {}


BACKBONES = {
    "alexnet": Backbone(tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1, 4096, "classifier"),
    "vgg16": Backbone(tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1, 4096, "classifier"),
    "googlenet": Backbone(tvm.googlenet, tvm.GoogLeNet_Weights.IMAGENET1K_V1, 1024, "fc",
                          {"aux_logits": False, "init_weights": True}, unused_prefix="aux",
                          pretrained_kwargs=lambda pretrained: {"transform_input": pretrained}),
    "resnet50": Backbone(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, 2048, "fc"),
}


def weights_file(name: str) -> Path:
    """Where torchvision keeps the official weights of `name`: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(BACKBONES[name].weights.url)


def load_imagenet_weights(name: str, weights: str | Path | None = None) -> dict:
    """State dict of the ImageNet weights: from `weights`, else the torchvision cache, else a download."""
    path = Path(weights) if weights else weights_file(name)
    if weights and not path.is_file():
        raise WeightsError(f"{path}: no such weights file; pass the file of {name} "
                           f"({os.path.basename(BACKBONES[name].weights.url)}) with --weights")
    if not path.is_file():
        try:
            return BACKBONES[name].weights.get_state_dict(progress=True, check_hash=True)
        except Exception as err:  # offline, proxy, partial download …
            raise WeightsError(
                f"{path.name}: ImageNet weights of {name} not found and not downloadable ({type(err).__name__}); "
                f"put {BACKBONES[name].weights.url} at {path} (or pass --weights FILE, or --no-pretrained)"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: cannot read these weights ({type(err).__name__}); download "
                           f"{BACKBONES[name].weights.url} again") from None


class TransferNet(CellModel):
    """A torchvision backbone up to its penultimate layer (`backbone`) + a new two-output head (`head`)."""

    def __init__(self, name: str, pretrained: bool = True, weights: str | Path | None = None,
                 finetune: bool = False, num_classes: int = 2, dropout: float = 0.2, head: str = "sigmoid"):
        super().__init__()
        spec = BACKBONES[name]
        self.name, self.head_type, self.finetune, self.pretrained = name, head, finetune, pretrained
        network = spec.build(weights=None, **spec.build_kwargs, **spec.pretrained_kwargs(pretrained))
        if pretrained:
            state = load_imagenet_weights(name, weights)
            if spec.unused_prefix:
                state = {k: v for k, v in state.items() if not k.startswith(spec.unused_prefix)}
            network.load_state_dict(state)
        # Cut off the ImageNet classifier: the backbone ends at the penultimate features.
        classifier = getattr(network, spec.classifier)
        setattr(network, spec.classifier, classifier[:-1] if isinstance(classifier, nn.Sequential) else nn.Identity())
        self.backbone = network
        self.num_features = spec.features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(spec.features, num_classes))
        self.backbone.requires_grad_(finetune)

    @property
    def frozen(self) -> bool:
        return not self.finetune

    def train(self, mode: bool = True) -> "TransferNet":
        super().train(mode)
        if self.frozen:  # a frozen feature extractor keeps its BatchNorm statistics and no dropout
            self.backbone.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of [0, 1] images (ImageNet normalisation applied here)."""
        return self.backbone((x - self.mean) / self.std)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)


def _builder(name: str) -> Callable[..., TransferNet]:
    def build(pretrained: bool = True, weights=None, finetune: bool = False, dropout: float = 0.2,
              head: str = "sigmoid", num_classes: int = 2) -> TransferNet:
        return TransferNet(name, pretrained, weights, finetune, num_classes, dropout, head)

    build.__name__ = name
    return build


# Grad-CAM at the last convolutional stage of each backbone; feature maps of its first and sixth convolution.
_LAYERS = {
    "alexnet": ("backbone.features.10", ("backbone.features.0", "backbone.features.10")),
    "vgg16": ("backbone.features.28", ("backbone.features.0", "backbone.features.12")),
    "googlenet": ("backbone.inception5b", ("backbone.conv1.conv", "backbone.inception3a.branch2.1.conv")),
    "resnet50": ("backbone.layer4", ("backbone.conv1", "backbone.layer1.1.conv1")),
}
SPECS = [
    ModelSpec(
        name=name, build=_builder(name),
        settings={"dropout": "dropout", "head": "head", "pretrained": "pretrained", "weights": "weights",
                  "finetune": "finetune"},
        gradcam_layer=gradcam_layer, feature_layers=feature_layers, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        frozen=True, pretrained=True,
        description=f"{name}: ImageNet backbone (torchvision), frozen, with a new two-output head",
    )
    for name, (gradcam_layer, feature_layers) in _LAYERS.items()
]
