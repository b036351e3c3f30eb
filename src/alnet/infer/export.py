"""`alnet export`: a checkpoint → an ONNX model that outputs P(ALL) (calibrated), the network's own P(ALL) and
the penultimate features, with its preprocessing, calibration, review band and input gate in the metadata.

`--int8` writes the checkpoint's int8 form (`alnet.int8`) instead, as a QDQ graph (QuantizeLinear →
DequantizeLinear around int8 weights and uint8 activations) that onnxruntime runs with its int8 kernels."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_trained_model
from ..int8 import quantized
from ..labels import THRESHOLD
from ..models import Penultimate, model_spec, probability_all
from ..schema import ONNX_METADATA
from ..trust.calibration import apply_temperature_torch

OPSET = 18  # the torch.export-based exporter's own opset; older ones would need a version conversion
# torch.export cannot trace quantized tensors; the TorchScript-based exporter writes PyTorch's int8 operators as
# QDQ, with per-channel weights from opset 13.
INT8_OPSET = 13
INT8_NOTE = ("yes: int8 weights and uint8 activations (QDQ), calibrated on training cells; no full-precision "
             "fallback: pictures beyond the calibrated ranges are flagged in beyond_range")
OUTPUT_NAMES = ("probability_all", "probability_raw", "features")  # what ProbabilityOfAll returns, in order
BATCH_LIMIT = 2**20  # images per call; the graph's batch axis is symbolic up to this


class ProbabilityOfAll(nn.Module):
    """A classifier whose outputs are P(ALL) per image as `alnet predict` reports it (calibrated with the
    checkpoint's temperature, when it has one), the network's own P(ALL), and the penultimate features the
    input gate measures."""

    def __init__(self, network: nn.Module, head: str, temperature: float | None = None):
        super().__init__()  # network: images → (logits, penultimate features), e.g. Penultimate(model)
        self.network, self.head, self.temperature = network, head, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, features = self.network(x)
        raw = probability_all(logits, self.head)
        return apply_temperature_torch(raw, self.temperature), raw, features


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


def export_int8_graph(network: nn.Module, size: int, out: Path) -> None:
    """An int8 `network` (images → calibrated, raw, features) as a QDQ graph with export_graph's names and
    symbolic batch axis, through the TorchScript-based exporter (the only one that knows quantized operators)."""
    import warnings

    names = {"image": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice, and tracer notes on the calibration constants
        torch.onnx.export(network, (torch.zeros(2, 3, size, size),), str(out), dynamo=False, opset_version=INT8_OPSET,
                          input_names=["image"], output_names=list(OUTPUT_NAMES), dynamic_axes=names)


def flag_beyond_ranges(graph) -> None:
    """Add the output `beyond_range` (bool per image) to an int8 QDQ graph: whether any activation reached an end
    of its calibrated range (the top; also the bottom where the range does not start at 0), where it may have been
    clipped. `alnet predict` refuses those pictures, since the file cannot answer them in full precision."""
    from onnx import TensorProto, helper, numpy_helper

    constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.graph.node
                 if node.op_type == "Constant" and node.attribute and node.attribute[0].type == 4}  # 4: a tensor
    constants.update({t.name: numpy_helper.to_array(t) for t in graph.graph.initializer})
    image = graph.graph.input[0].name
    added, flags = [], []
    for k, limit in enumerate((255, 0)):
        added.append(helper.make_node("Constant", [], [f"beyond/limit{k}"], value=helper.make_tensor(
            f"beyond/limit{k}", TensorProto.UINT8, [], [limit])))
    for i, node in enumerate(n for n in list(graph.graph.node) if n.op_type == "QuantizeLinear"):
        if node.input[0] == image:
            continue  # the input: quantized exactly, nothing to clip
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
        ends = [("ReduceMax", 0)] + ([("ReduceMin", 1)] if zero_point is not None and int(zero_point) > 0 else [])
        flat = f"beyond/{i}/flat"
        added.append(helper.make_node("Flatten", [node.output[0]], [flat], axis=1))
        for reduce, k in ends:
            added += [helper.make_node(reduce, [flat], [f"beyond/{i}/{reduce}"], axes=[1], keepdims=0),
                      helper.make_node("Equal", [f"beyond/{i}/{reduce}", f"beyond/limit{k}"], [f"beyond/{i}/{k}"])]
            flags.append(f"beyond/{i}/{k}")
    any_flag = flags[0]
    for j, flag in enumerate(flags[1:], start=1):
        added.append(helper.make_node("Or", [any_flag, flag], [f"beyond/or{j}"]))
        any_flag = f"beyond/or{j}"
    added.append(helper.make_node("Identity", [any_flag], ["beyond_range"]))
    graph.graph.node.extend(added)
    graph.graph.output.append(helper.make_tensor_value_info("beyond_range", TensorProto.BOOL, ["batch"]))


def export_onnx(checkpoint: Path | str, out: Path | str, opset: int = OPSET, int8: bool = False) -> Path:
    """Export through the torch.export-based exporter (`dynamo=True`; needs onnxscript) at `opset`, the batch
    axis dynamic, then write alnet's metadata into the graph. `int8`: the checkpoint's int8 form as QDQ, through
    the TorchScript-based exporter at INT8_OPSET (`opset` does not apply), with a fourth output `beyond_range`
    (`flag_beyond_ranges`): the file cannot fall back to the network without int8, so `alnet predict` refuses the
    pictures it flags."""
    import onnx

    trained = load_trained_model(checkpoint)
    network = quantized(trained.model, trained.int8, str(checkpoint), trained.name) if int8 else Penultimate(
        trained.model)
    wrapper = ProbabilityOfAll(network, trained.head, trained.temperature).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = trained.preprocessing.size
    if int8:
        export_int8_graph(wrapper, size, out)
        graph = onnx.load(str(out))
        flag_beyond_ranges(graph)
    elif model_spec(trained.name).hybrid:  # backbone by torch + classifier by skl2onnx, one graph
        import tempfile

        from .export_hybrid import hybrid_graph

        with tempfile.TemporaryDirectory() as workdir:
            graph = hybrid_graph(trained.model, size, opset, Path(workdir))
    else:
        export_graph(wrapper, size, out, opset)
        graph = onnx.load(str(out))
    for key, value in {
        ONNX_METADATA["model"]: trained.name,
        ONNX_METADATA["checkpoint"]: str(Path(checkpoint).resolve()),
        ONNX_METADATA["preprocessing"]: trained.preprocessing.to_json(),
        ONNX_METADATA["output"]: (
            f"probability_all: P(ALL) per image, calibrated when alnet_calibration says so; ALL when > {THRESHOLD}; "
            f"probability_raw: the network's own P(ALL); features: penultimate, for the input gate "
            f"({ONNX_METADATA['input_gate']})"
            + ("; beyond_range: an activation reached an end of its int8 range: refuse" if int8 else "")),
        ONNX_METADATA["calibration"]: json.dumps(trained.calibration),
        ONNX_METADATA["review"]: json.dumps(trained.review),
        ONNX_METADATA["int8"]: INT8_NOTE if int8 else "no",
        **({ONNX_METADATA["input_gate"]: trained.input_gate.to_json()} if trained.input_gate else {}),
    }.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(out))
    return out
