"""The int8 form of ALNet: folded, calibrated on training cells at the end of training, rebuilt from the
checkpoint by predict, serve and export (`--int8`), and refused with a clear message where it cannot run."""

import csv
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import predict_rows, statuses
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alnet.checkpoint import INT8_KEY, add_to_checkpoint, load_trained_model
from alnet.cli import app
from alnet.data.cnmc import scan
from alnet.infer.predict import load_pipeline
from alnet.infer.serve import create_app
from alnet.int8 import CALIBRATION_IMAGES, Int8Error, _checksum, quantized, weights_fingerprint
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
    assert entry["engine"] == "onednn" and entry["headroom"] == 1.25
    assert 0 < entry["images"] <= CALIBRATION_IMAGES
    assert entry["ranges"] and all(isinstance(v, torch.Tensor) for v in entry["ranges"].values())
    assert entry["logit_shift"].shape == (2,) and entry["feature_shift"].shape == (128,)
    assert entry["weights"] == weights_fingerprint(load_trained_model(mini_checkpoint).model)


def test_the_int8_form_computes_in_int8_and_answers_like_full_precision_on_real_cells(mini_checkpoint, mini_root):
    files = _real_cells(mini_root)
    full, _ = predict_rows(load_pipeline(mini_checkpoint, precision="32"), files)
    int8_predictor = load_pipeline(mini_checkpoint, int8=True)
    int8, _ = predict_rows(int8_predictor, files)
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
    assert [o.name for o in graph.graph.output] == ["probability_all", "probability_raw", "features", "beyond_range"]
    onnx_rows, _ = predict_rows(load_pipeline(onnx_path), _real_cells(mini_root), batch_size=7)
    assert np.abs(_probabilities(onnx_rows) - _probabilities(rows)).max() < 0.01


def test_serve_answers_with_the_int8_form(mini_checkpoint, mini_root):
    cell = sorted((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "hem").iterdir())[0]
    client = TestClient(create_app(mini_checkpoint, int8=True))
    response = client.post("/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    assert response.status_code == 200, response.text
    expected = predict_rows(load_pipeline(mini_checkpoint, int8=True), [cell])[0][0]
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
    rows, _ = predict_rows(load_pipeline(checkpoint_copy, int8=True), _real_cells(mini_root)[:4])
    assert len(rows) == 4 and rows[0]["model"] == "alnet (int8)"


DAMAGE = ["not a dict", "wrong shape", "not finite", "absurd range", "min above max", "sparse", "missing shift",
          "shift too large", "extra key", "other engine", "edited value", "other weights",
          # edits whose checksum is recomputed (it is plain sha256): the proof cells catch them
          "ranges 9999, checksum recomputed", "logit shift, checksum recomputed", "proof replaced by black",
          "earlier version without proof"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_int8_calibration_is_a_one_line_error_and_leaves_full_precision_working(
        checkpoint_copy, mini_checkpoint, mini_root, damage):
    entry = torch.load(checkpoint_copy, map_location="cpu", weights_only=True)[INT8_KEY]
    ranges = entry["ranges"]
    low = next(name for name in ranges if name.endswith("min_val"))
    high = low.replace("min_val", "max_val")
    if damage == "not a dict":
        entry = "int8"
    elif damage == "wrong shape":
        ranges[low] = torch.zeros(10**6)
    elif damage == "not finite":
        entry["logit_shift"] = torch.tensor([float("nan"), 0.0])
    elif damage == "absurd range":
        ranges[high] = torch.tensor(1e30)
    elif damage == "min above max":
        ranges[low], ranges[high] = torch.tensor(5.0), torch.tensor(1.0)
    elif damage == "sparse":
        entry["feature_shift"] = entry["feature_shift"].to_sparse()
    elif damage == "missing shift":
        del entry["feature_shift"]
    elif damage == "shift too large":
        entry["logit_shift"] = torch.tensor([0.0, 50.0])
    elif damage == "extra key":
        ranges["logit_shift"] = entry["logit_shift"]
    elif damage == "other engine":
        entry["engine"] = "fbgemm"
    elif damage == "edited value":  # well formed, plausible, and not what calibration measured
        entry["logit_shift"] = torch.tensor([0.5, -0.5])
    elif damage == "ranges 9999, checksum recomputed":
        entry["ranges"] = {name: torch.full_like(value, 9999.0 if name.endswith("max_val") else 0.0)
                           for name, value in ranges.items()}
        entry["checksum"] = _checksum(entry)
    elif damage == "logit shift, checksum recomputed":
        entry["logit_shift"] = torch.tensor([5.0, -5.0])
        entry["checksum"] = _checksum(entry)
    elif damage == "proof replaced by black":
        entry["proof"] = torch.zeros_like(entry["proof"])
        entry["checksum"] = _checksum(entry)
    elif damage == "earlier version without proof":
        del entry["proof"], entry["proof_error"]
        entry["checksum"] = "0" * 64
    else:  # a whole, valid calibration of another fold's weights, copied in
        other = mini_checkpoint.parents[1] / "fold_1" / mini_checkpoint.name
        entry = torch.load(other, map_location="cpu", weights_only=True)[INT8_KEY]
    add_to_checkpoint(checkpoint_copy, {INT8_KEY: entry})
    result = runner.invoke(app, ["predict", str(checkpoint_copy), str(mini_root), "--int8", "--out",
                                 str(checkpoint_copy.parent / "p.csv")])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message
    assert str(checkpoint_copy) in message and "alnet quantize" in message
    expected = {"edited value": "edited or damaged", "other weights": "other weights",
                "ranges 9999, checksum recomputed": "does not answer as the network does",
                "logit shift, checksum recomputed": "does not answer as the network does",
                "proof replaced by black": "not cells", "earlier version without proof": "earlier version"}
    assert expected.get(damage, "") in message
    with pytest.raises(Int8Error):
        load_pipeline(checkpoint_copy, int8=True)
    assert len(predict_rows(load_pipeline(checkpoint_copy), _real_cells(mini_root)[:2])[0]) == 2


def test_quantize_rewrites_a_linked_checkpoint_s_target_keeps_its_mode_and_refuses_a_read_only_one(
        checkpoint_copy, mini_root, tmp_path):
    import os
    import stat

    add_to_checkpoint(checkpoint_copy, {INT8_KEY: None})
    os.chmod(checkpoint_copy, 0o640)
    link = tmp_path / "link.ckpt"
    link.symlink_to(checkpoint_copy)
    result = runner.invoke(app, ["quantize", str(link), "--data", str(mini_root), "--limit", "8"])
    assert result.exit_code == 0, result.output
    assert "only 8 cell(s)" in result.output  # few cells: said so
    assert link.is_symlink() and torch.load(checkpoint_copy, weights_only=True)[INT8_KEY]["images"] == 8
    assert stat.S_IMODE(checkpoint_copy.stat().st_mode) == 0o640
    os.chmod(checkpoint_copy, 0o440)  # refused for root too: the mode is the user's wish
    before = checkpoint_copy.read_bytes()
    refused = runner.invoke(app, ["quantize", str(checkpoint_copy), "--data", str(mini_root), "--limit", "4"])
    assert refused.exit_code == 2 and "read-only" in refused.output
    assert checkpoint_copy.read_bytes() == before
    assert not [p for p in checkpoint_copy.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_int8_is_refused_for_an_onnx_model_and_for_models_without_an_int8_form(mini_checkpoint, tmp_path):
    from alnet.infer.export import export_onnx

    onnx_path = export_onnx(mini_checkpoint, tmp_path / "alnet.onnx")
    with pytest.raises(Int8Error, match="alnet export --int8"):
        load_pipeline(onnx_path, int8=True)
    from alnet.config import RunConfig
    from alnet.models import create_model_from

    alexnet = create_model_from(RunConfig(model="alexnet", pretrained=False, image_size=136))  # a baseline
    with pytest.raises(Int8Error, match="alexnet.ckpt: alexnet has no int8 form, only ALNet has"):
        quantized(alexnet, {"engine": "onednn"}, "alexnet.ckpt", "alexnet")


def test_the_cli_default_number_of_calibration_cells_is_the_one_training_uses():
    from alnet.cli import infer

    assert infer.CALIBRATION_IMAGES == CALIBRATION_IMAGES


@pytest.fixture(scope="module")
def sharp_checkpoint(mini_root, tmp_path_factory):
    """ALNet trained on the real cells until its answers spread over [0, 1]: the session's one-epoch model answers
    about 0.49 for every cell, which would hide what int8 changes."""
    from alnet.config import RunConfig
    from alnet.data.cache import prepare
    from alnet.data.transforms import Preprocessing
    from alnet.train.run import train_run

    base = tmp_path_factory.mktemp("sharp")
    prepared = prepare(scan(mini_root).cells, base / "cache", Preprocessing(size=136))
    config = RunConfig(protocol="paper", epochs=20, image_size=136, batch_size=16, lr=1e-3, augment=False,
                       bn_momentum=0.5)
    train_run(config, prepared, base / "run", progress=False, log=lambda message: None)
    return base / "run" / "checkpoints" / "fold_0" / "last.ckpt"


def _unlike_the_training_cells(mini_root) -> np.ndarray:
    """Real cells altered inside their own outline, black background kept (so the image check lets them pass):
    colours inverted, noise, and 2.5× brighter."""
    from alnet.data.transforms import Preprocessing, load_image

    cells = np.stack([load_image(path, Preprocessing(size=136))[0] for path in _real_cells(mini_root)[::4]])
    inside = cells.max(-1, keepdims=True) > 24
    noise = np.random.default_rng(0).integers(30, 240, cells.shape)
    brighter = np.clip(cells * 2.5, 0, 245)
    return np.concatenate([np.where(inside, x, 0).astype(np.uint8) for x in (255 - cells, noise, brighter)])


@pytest.mark.slow
def test_int8_keeps_a_trained_model_s_labels_and_refuses_what_full_precision_refuses(sharp_checkpoint, mini_root):
    full = load_pipeline(sharp_checkpoint, precision="32")
    int8 = load_pipeline(sharp_checkpoint, int8=True)
    files = _real_cells(mini_root)
    p_full = _probabilities(predict_rows(full, files)[0])
    p_int8 = _probabilities(predict_rows(int8, files)[0])
    assert p_full.min() < 0.2 and p_full.max() > 0.8  # answers spread out: the comparison has teeth
    assert np.abs(p_int8 - p_full).max() < 0.1  # measured 0.06 (bf16: 0.008); mean 0.01
    assert np.mean((p_int8 > 0.5) == (p_full > 0.5)) >= 0.95

    unusual = _unlike_the_training_cells(mini_root)
    refused_full = [status == "rejected" for status, _ in statuses(full, unusual)]
    int8_answers = int8.answer(unusual)
    refused_int8 = [not answer.answered for answer in int8_answers]
    assert sum(refused_full) >= len(unusual) // 2  # the feature check refuses most of them in full precision…
    assert refused_int8 == refused_full  # …and exactly those with --int8: they left the calibrated ranges
    assert sum(answer.int8_fallback for answer in int8_answers) >= sum(refused_full)


@pytest.mark.slow
def test_the_int8_onnx_model_answers_within_a_few_hundredths_of_predict_int8(sharp_checkpoint, mini_root, tmp_path):
    from alnet.infer.export import export_onnx

    files = _real_cells(mini_root)
    torch_int8 = _probabilities(predict_rows(load_pipeline(sharp_checkpoint, int8=True), files)[0])
    onnx_path = export_onnx(sharp_checkpoint, tmp_path / "int8.onnx", int8=True)
    onnx_int8 = load_pipeline(onnx_path)
    assert onnx_int8.described == "alnet (int8)"
    answered = _probabilities(predict_rows(onnx_int8, files, batch_size=5)[0])
    assert np.abs(answered - torch_int8).max() < 0.05  # onnxruntime's int8 kernels round differently (0.018)
    # No full-precision network in the file: what would be clipped is refused, with the reason.
    answers = statuses(onnx_int8, _unlike_the_training_cells(mini_root))
    assert {status for status, _ in answers} == {"rejected"}
    assert any("leave the ranges this int8 model was calibrated on" in reason for _, reason in answers)


def test_an_int8_onnx_model_without_its_beyond_range_output_is_refused_when_loaded(mini_checkpoint, tmp_path):
    from alnet.infer.export import export_onnx

    graph = onnx.load(str(export_onnx(mini_checkpoint, tmp_path / "int8.onnx", int8=True)))
    kept = [o for o in graph.graph.output if o.name != "beyond_range"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(tmp_path / "edited.onnx"))
    with pytest.raises(ValueError, match="beyond_range"):
        load_pipeline(tmp_path / "edited.onnx")


def test_threads_sharing_one_int8_predictor_get_the_answers_each_would_get_alone(mini_checkpoint, mini_root):
    from concurrent.futures import ThreadPoolExecutor

    from alnet.data.transforms import Preprocessing, load_image

    predictor = load_pipeline(mini_checkpoint, int8=True)
    cells = np.stack([load_image(path, Preprocessing(size=136))[0] for path in _real_cells(mini_root)[:6]])
    batches = [cells, _unlike_the_training_cells(mini_root)[:2]]  # other sizes; the second leaves the ranges
    def raw(batch):
        return [answer.probability_raw for answer in predictor.answer(batch)]

    alone = [raw(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: raw(batches[i % 2]), range(16)))
    for i, answer in enumerate(together):
        np.testing.assert_array_equal(answer, alone[i % 2])
