"""The int8 form of ALNet: folded, calibrated on training cells at the end of training, rebuilt from the
checkpoint by predict, serve and export (`--int8`), and refused with a clear message where it cannot run."""

import csv
import shutil

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alnet.checkpoint import INT8_KEY, add_to_checkpoint
from alnet.cli import app
from alnet.data.cnmc import scan
from alnet.infer.int8 import CALIBRATION_IMAGES, Int8Error, quantized
from alnet.infer.predict import load_predictor, predict_files
from alnet.infer.serve import create_app
from alnet.models.alnet import ALNet

runner = CliRunner()


def _real_cells(mini_root):
    return [c.path for c in scan(mini_root).cells]


def _probabilities(rows):
    return np.array([float(r["probability_all"]) for r in rows])


@pytest.fixture
def checkpoint_copy(mini_checkpoint, tmp_path):
    return shutil.copy(mini_checkpoint, tmp_path / "alnet.ckpt")


@pytest.mark.parametrize("size", [136, 224])
def test_folding_batchnorm_into_the_next_layer_leaves_every_output_unchanged(size):
    torch.manual_seed(0)
    model = ALNet(input_size=size).eval()
    for bn in (model.cl1.bn, model.cl2.bn, model.cl3.bn):  # statistics far from the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-0.5, 0.5)
    folded = model.fold_batchnorm()
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_training_stores_an_int8_calibration_made_of_tensors_only(mini_checkpoint):
    checkpoint = torch.load(mini_checkpoint, map_location="cpu", weights_only=True)  # no code can run
    entry = checkpoint[INT8_KEY]
    assert entry["engine"] == "onednn"
    assert 0 < entry["images"] <= CALIBRATION_IMAGES
    assert entry["observers"] and all(isinstance(v, torch.Tensor) for v in entry["observers"].values())
    assert entry["logit_shift"].shape == (2,) and entry["feature_shift"].shape == (128,)


def test_the_int8_form_computes_in_int8_and_answers_like_full_precision_on_real_cells(mini_checkpoint, mini_root):
    files = _real_cells(mini_root)
    full, _ = predict_files(load_predictor(mini_checkpoint, precision="32"), files)
    int8_predictor = load_predictor(mini_checkpoint, int8=True)
    int8, _ = predict_files(int8_predictor, files)
    assert len(full) == len(int8) == 52
    assert np.abs(_probabilities(int8) - _probabilities(full)).max() < 0.01
    assert np.mean([a["label"] == b["label"] for a, b in zip(full, int8)]) >= 0.95
    assert {r["model"] for r in int8} == {"alnet (int8)"} and {r["status"] for r in int8} == {"ok"}
    network = quantized(int8_predictor.trained.model, torch.load(mini_checkpoint, weights_only=True)[INT8_KEY])
    layers = {name: type(m) for name, m in network.named_modules() if name.rsplit(".", 1)[-1] in (
        "conv1", "conv2", "fc1", "fc2")}
    assert len(layers) == 7  # the five convolutions and two dense layers of Table 2…
    assert all(".quantized." in kind.__module__ for kind in layers.values()), layers  # …all of them int8 modules


def test_predict_and_export_take_int8_and_the_onnx_model_answers_as_the_torch_one(mini_checkpoint, mini_root,
                                                                                  tmp_path):
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(mini_root), "--int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 52 and rows[0]["model"] == "alnet (int8)"

    onnx_path = tmp_path / "alnet-int8.onnx"
    result = runner.invoke(app, ["export", str(mini_checkpoint), "--onnx", str(onnx_path), "--int8"])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(onnx_path))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    constants = [a.t for node in graph.graph.node if node.op_type == "Constant" for a in node.attribute]
    tensors = [*graph.graph.initializer, *constants]
    kernels = [t for t in tensors if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(kernels) == 5  # the five convolutions' weights are stored as int8
    assert {p.key: p.value for p in graph.metadata_props}["alnet_int8"].startswith("yes")
    onnx_rows, _ = predict_files(load_predictor(onnx_path), _real_cells(mini_root), batch_size=7)
    assert np.abs(_probabilities(onnx_rows) - _probabilities(rows)).max() < 0.01


def test_serve_answers_with_the_int8_form(mini_checkpoint, mini_root):
    cell = sorted((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "hem").iterdir())[0]
    client = TestClient(create_app(mini_checkpoint, int8=True))
    response = client.post("/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    assert response.status_code == 200, response.text
    expected = predict_files(load_predictor(mini_checkpoint, int8=True), [cell])[0][0]
    assert response.json()["model"] == "alnet (int8)"
    assert response.json()["probability_all"] == pytest.approx(float(expected["probability_all"]), abs=1e-5)


def test_quantize_calibrates_a_checkpoint_that_has_no_int8_form_yet(checkpoint_copy, mini_root):
    add_to_checkpoint(checkpoint_copy, {INT8_KEY: None})
    refused = runner.invoke(app, ["predict", str(checkpoint_copy), str(mini_root), "--int8"])
    assert refused.exit_code == 2
    assert "no int8 calibration" in refused.output and "alnet quantize" in refused.output

    result = runner.invoke(app, ["quantize", str(checkpoint_copy), "--data", str(mini_root), "--limit", "20"])
    assert result.exit_code == 0, result.output
    assert "on 20 cell(s)" in result.output
    entry = torch.load(checkpoint_copy, map_location="cpu", weights_only=True)[INT8_KEY]
    assert entry["images"] == 20
    rows, _ = predict_files(load_predictor(checkpoint_copy, int8=True), _real_cells(mini_root)[:4])
    assert len(rows) == 4 and rows[0]["model"] == "alnet (int8)"


@pytest.mark.parametrize("damage", ["not a dict", "wrong shape", "not finite", "missing shift", "other engine"])
def test_a_damaged_int8_calibration_is_a_one_line_error_and_leaves_full_precision_working(
        checkpoint_copy, mini_root, damage):
    entry = torch.load(checkpoint_copy, map_location="cpu", weights_only=True)[INT8_KEY]
    name = next(iter(entry["observers"]))
    if damage == "not a dict":
        entry = "int8"
    elif damage == "wrong shape":
        entry["observers"][name] = torch.zeros(10**6)
    elif damage == "not finite":
        entry["logit_shift"] = torch.tensor([float("nan"), 0.0])
    elif damage == "missing shift":
        del entry["feature_shift"]
    else:
        entry["engine"] = "fbgemm"
    add_to_checkpoint(checkpoint_copy, {INT8_KEY: entry})
    result = runner.invoke(app, ["predict", str(checkpoint_copy), str(mini_root), "--int8", "--out",
                                 str(checkpoint_copy.parent / "p.csv")])
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message
    assert str(checkpoint_copy) in message and "alnet quantize" in message
    with pytest.raises(Int8Error):
        load_predictor(checkpoint_copy, int8=True)
    assert len(predict_files(load_predictor(checkpoint_copy), _real_cells(mini_root)[:2])[0]) == 2


def test_int8_is_refused_for_an_onnx_model_and_for_models_without_an_int8_form(mini_checkpoint, tmp_path):
    from alnet.infer.export import export_onnx

    onnx_path = export_onnx(mini_checkpoint, tmp_path / "alnet.onnx")
    with pytest.raises(Int8Error, match="alnet export --int8"):
        load_predictor(onnx_path, int8=True)
    from alnet.config import RunConfig
    from alnet.models import create_model_from

    alexnet = create_model_from(RunConfig(model="alexnet", pretrained=False, image_size=136))  # a baseline
    with pytest.raises(Int8Error, match="only ALNet"):
        quantized(alexnet, {"engine": "onednn"}, "alexnet.ckpt")


def test_the_cli_default_number_of_calibration_cells_is_the_one_training_uses():
    from alnet.cli import infer

    assert infer.CALIBRATION_IMAGES == CALIBRATION_IMAGES
