"""A hybrid model as one ONNX graph: the backbone(s) exported by torch, the scikit-learn pipeline converted by
skl2onnx, joined at the features; outputs P(ALL) and the features, as `alnet export` gives for every model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.hybrid import backbone_features

ML_OPSET = 3  # the ai.onnx.ml operators skl2onnx writes


class FeaturesOf(nn.Module):
    """The hybrid's (concatenated) backbone features, the input of its classifier. Only the backbones: the
    tracer cannot hold the classifier's state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbones = model.backbones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([backbone_features(m, x) for m in self.backbones.values()], dim=1)


def hybrid_graph(model, size: int, opset: int, workdir: Path):
    """The merged onnx.ModelProto: image → features → probabilities → probability_all."""
    import onnx
    from onnx import compose, helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    features_path = workdir / "features.onnx"
    torch.onnx.export(FeaturesOf(model).eval(), (torch.zeros(1, 3, size, size),), str(features_path), dynamo=False,
                      opset_version=opset, input_names=["image"], output_names=["features"],
                      dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
    backbone = onnx.load(str(features_path))
    try:
        classifier = to_onnx(model.classifier, initial_types=[("classifier_input",
                                                              FloatTensorType([None, model.num_features]))],
                             options={"zipmap": False}, target_opset={"": opset, "ai.onnx.ml": ML_OPSET})
    except Exception as err:  # a pipeline skl2onnx has no converter for
        raise ValueError(f"{model.parts.name}: skl2onnx cannot convert this classifier ({type(err).__name__}: "
                         f"{err}); use the checkpoint with `alnet predict` or `alnet serve` instead") from None
    classifier.ir_version = backbone.ir_version
    backbone = compose.add_prefix(backbone, "backbone_")  # keep node and tensor names apart
    classifier = compose.add_prefix(classifier, "classifier_")
    merged = compose.merge_models(backbone, classifier, io_map=[("backbone_features", "classifier_classifier_input")])
    probabilities = next(o.name for o in merged.graph.output if o.name.endswith("probabilities"))
    # Column 1 is P(ALL): the pipeline's classes are (0, 1) = (HEM, ALL).
    if list(model.classifier.classes_) != [0, 1]:
        raise ValueError(f"{model.parts.name}: classifier classes {list(model.classifier.classes_)}, expected [0, 1]")
    index = helper.make_tensor("all_column", onnx.TensorProto.INT64, [], [1])
    merged.graph.initializer.append(index)
    merged.graph.node.append(helper.make_node("Gather", [probabilities, "all_column"], ["probability_all"], axis=1))
    # The features are the second output, as in every exported model (the input gate measures them).
    merged.graph.node.append(helper.make_node("Identity", ["backbone_features"], ["features"]))
    del merged.graph.output[:]
    merged.graph.output.append(helper.make_tensor_value_info("probability_all", onnx.TensorProto.FLOAT, ["batch"]))
    merged.graph.output.append(helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT,
                                                             ["batch", model.num_features]))
    for node in merged.graph.node:  # the prefix renamed the image input; give it back its name
        node.input[:] = ["image" if name == "backbone_image" else name for name in node.input]
    merged.graph.input[0].name = "image"
    onnx.checker.check_model(merged)
    _check_agreement(merged, model, size)
    return merged


def _check_agreement(graph, model, size: int, tolerance: float = 1e-3) -> None:
    """The graph must give the checkpoint's P(ALL), so a converter that handles some setting differently is
    refused here rather than shipped. Probes: random images (the whole graph), and feature vectors drawn around
    the training features' mean and spread (the classifier where its decisions vary; random images fall far from
    every training image)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.predict_proba(model.forward_features(images).numpy())
    got = session.run(None, {"image": images.numpy()})[0]
    scale = model.classifier.named_steps["scale"]
    features = (scale.mean_ + scale.scale_ * np.random.default_rng(0).normal(size=(64, len(scale.mean_))))
    features = features.astype(np.float32)
    classifier = _classifier_session(graph)
    got_features = classifier.run(None, {classifier.get_inputs()[0].name: features})[0]
    for what, a, b in (("probe images", got, expected),
                       ("probe features", got_features, model.predict_proba(features))):
        if not np.allclose(a, b, atol=tolerance):
            raise ValueError(f"{model.parts.name}: the ONNX graph disagrees with the checkpoint on {what} (largest "
                             f"difference {np.abs(a - b).max():.3g}); use the checkpoint with `alnet predict` or "
                             "`alnet serve` instead")


def _classifier_session(graph):
    """The classifier half of the merged graph alone: from the features to probability_all."""
    import onnx
    import onnxruntime as ort

    part = onnx.utils.Extractor(graph).extract_model(["backbone_features"], ["probability_all"])
    return ort.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"])
