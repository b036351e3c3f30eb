"""`alnet export`: a checkpoint → an ONNX model that outputs P(ALL), with its preprocessing in the metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_trained_model
from ..labels import THRESHOLD
from ..models import probability_all
from .predict import ONNX_METADATA


class ProbabilityOfAll(nn.Module):
    """A classifier whose single output is P(ALL) per image, as `alnet predict` reports it."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probability_all(self.model(x), self.head)


def export_onnx(checkpoint: Path | str, out: Path | str, opset: int = 17) -> Path:
    import onnx

    trained = load_trained_model(checkpoint)
    wrapper = ProbabilityOfAll(trained.model, trained.head).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = trained.preprocessing.size
    torch.onnx.export(wrapper, (torch.zeros(1, 3, size, size),), str(out), dynamo=False, opset_version=opset,
                      input_names=["image"], output_names=["probability_all"],
                      dynamic_axes={"image": {0: "batch"}, "probability_all": {0: "batch"}})
    graph = onnx.load(str(out))
    for key, value in {
        ONNX_METADATA["model"]: trained.name,
        "alnet_checkpoint": str(Path(checkpoint).resolve()),
        ONNX_METADATA["preprocessing"]: trained.preprocessing.to_json(),
        "alnet_output": f"probability_all: P(ALL) per image; ALL when > {THRESHOLD}",
    }.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(out))
    return out
