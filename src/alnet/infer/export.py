"""`alnet export`: a checkpoint → an ONNX model that outputs P(ALL) (calibrated), the network's own P(ALL) and
the penultimate features, with its preprocessing, calibration, review band and input gate in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_trained_model
from ..labels import THRESHOLD
from ..models import model_spec, probability_all
from ..trust.calibration import apply_temperature_torch
from ..trust.features import penultimate
from .predict import ONNX_METADATA

OPSET = 18  # the torch.export-based exporter's own opset; older ones would need a version conversion
OUTPUT_NAMES = ("probability_all", "probability_raw", "features")  # what ProbabilityOfAll returns, in order
BATCH_LIMIT = 2**20  # images per call; the graph's batch axis is symbolic up to this


class ProbabilityOfAll(nn.Module):
    """A classifier whose outputs are P(ALL) per image as `alnet predict` reports it (calibrated with the
    checkpoint's temperature, when it has one), the network's own P(ALL), and the penultimate features the
    input gate measures."""

    def __init__(self, model: nn.Module, head: str, temperature: float | None = None):
        super().__init__()
        self.model, self.head, self.temperature = model, head, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, features = penultimate(self.model, x)
        raw = probability_all(logits, self.head)
        calibrated = raw if self.temperature is None else apply_temperature_torch(raw, self.temperature)
        return calibrated, raw, features


def export_graph(model: nn.Module, size: int, out: Path, opset: int = OPSET,
                 output_names: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """`model` (N×3×size×size in [0, 1] → N calibrated values, N raw values and N×d features) as an ONNX graph
    with input `image`, outputs `probability_all`, `probability_raw` and `features`, and a symbolic batch axis,
    through the torch.export-based exporter. `output_names`: a model with other outputs names its own (the
    bioimage.io package's graph has one)."""
    # torch.export specialises a dimension of size 1, so the example batch holds two images.
    example = (torch.zeros(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=BATCH_LIMIT)
    torch.onnx.export(model, example, str(out), dynamo=True, opset_version=opset, input_names=["image"],
                      output_names=list(output_names), dynamic_shapes=({0: batch},),
                      external_data=False, verbose=False)


def export_onnx(checkpoint: Path | str, out: Path | str, opset: int = OPSET) -> Path:
    """Export through the torch.export-based exporter (`dynamo=True`; needs onnxscript), the batch axis
    dynamic, then write alnet's metadata into the graph."""
    import onnx

    trained = load_trained_model(checkpoint)
    wrapper = ProbabilityOfAll(trained.model, trained.head, trained.temperature).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = trained.preprocessing.size
    if model_spec(trained.name).hybrid:  # backbone by torch + classifier by skl2onnx, one graph
        import tempfile

        from .export_hybrid import hybrid_graph

        with tempfile.TemporaryDirectory() as workdir:
            graph = hybrid_graph(trained.model, size, opset, Path(workdir))
    else:
        export_graph(wrapper, size, out, opset)
        graph = onnx.load(str(out))
    for key, value in {
        ONNX_METADATA["model"]: trained.name,
        "alnet_checkpoint": str(Path(checkpoint).resolve()),
        ONNX_METADATA["preprocessing"]: trained.preprocessing.to_json(),
        "alnet_output": f"probability_all: P(ALL) per image, calibrated when alnet_calibration says so; ALL when > "
                        f"{THRESHOLD}; probability_raw: the network's own P(ALL); features: penultimate, for the "
                        f"input gate ({ONNX_METADATA['input_gate']})",
        ONNX_METADATA["calibration"]: json.dumps(trained.calibration),
        ONNX_METADATA["review"]: json.dumps(trained.review),
        **({ONNX_METADATA["input_gate"]: trained.input_gate.to_json()} if trained.input_gate else {}),
    }.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(out))
    return out
