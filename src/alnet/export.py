"""`alnet export`: a checkpoint → an ONNX model that outputs P(ALL), with its preprocessing in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .engine import load_module
from .models import probability_all

PREPROCESSING = ("RGB image; centre crop to a square of `crop` × the short side; resize to size×size (Pillow "
                 "bilinear, reducing_gap 1.0); float32 N×3×H×W in [0, 1] (value / 255). Model-specific "
                 "normalisation (ImageNet for baselines) happens inside the graph.")


class ProbabilityOfAll(nn.Module):
    """A classifier whose single output is P(ALL) per image, as `alnet predict` reports it."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probability_all(self.model(x), self.head)


def export_onnx(checkpoint: Path | str, out: Path | str, opset: int = 17) -> Path:
    import onnx

    module = load_module(checkpoint)
    config = module.config
    wrapper = ProbabilityOfAll(module.model.float().eval(), config.head).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, config.image_size, config.image_size)
    torch.onnx.export(wrapper, (example,), str(out), dynamo=False, opset_version=opset, input_names=["image"],
                      output_names=["probability_all"],
                      dynamic_axes={"image": {0: "batch"}, "probability_all": {0: "batch"}})
    graph = onnx.load(str(out))
    for key, value in {
        "alnet_model": config.model,
        "alnet_checkpoint": str(Path(checkpoint).resolve()),
        "alnet_preprocessing": json.dumps({"size": config.image_size, "crop": config.crop,
                                           "description": PREPROCESSING}),
        "alnet_output": "probability_all: P(ALL) per image; ALL when > 0.5",
    }.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(out))
    return out
