"""The input gate: what is not one C-NMC cell is refused with a reason, and real cells never are."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import predict_rows
from fastapi.testclient import TestClient
from noncells import write_non_cells
from typer.testing import CliRunner

from alnet.checkpoint import load_trained_model
from alnet.cli import app
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing, load_image
from alnet.infer.export import export_onnx
from alnet.infer.predict import load_pipeline
from alnet.infer.serve import create_app
from alnet.schema import INPUT_GATE_KEY
from alnet.trust.feature_check import (
    FeatureGate,
    fit_feature_gate,
    ledoit_wolf,
    mahalanobis,
)
from alnet.trust.image_check import (
    GateError,
    ImageCheck,
    image_reason,
    measure,
    read_image_check,
)

runner = CliRunner()


def _real_cells(mini_root) -> list[Path]:
    return [c.path for c in scan(mini_root).cells]


@pytest.fixture(scope="module")
def non_cells(mini_root, mini_checkpoint, tmp_path_factory) -> list[tuple[str, Path]]:
    """Generated non-cells, the training run's own chart PNGs among them."""
    charts = sorted((mini_checkpoint.parents[2] / "figures").glob("*.png"))
    assert len(charts) >= 4
    cells = _real_cells(mini_root)[:4]
    return write_non_cells(tmp_path_factory.mktemp("non-cells"), cells, charts)


@pytest.mark.parametrize("size", [136, 224])
def test_the_image_check_alone_accepts_every_real_cell(mini_root, size):
    files = _real_cells(mini_root)
    assert len(files) == 52
    reasons = {f.name: image_reason(load_image(f, Preprocessing(size=size))[0]) for f in files}
    assert {name: r for name, r in reasons.items() if r} == {}


def test_the_image_check_accepts_synthetic_cells(synthetic_root):
    files = [c.path for c in scan(synthetic_root).cells]
    assert [f.name for f in files if image_reason(load_image(f, Preprocessing(size=136))[0])] == []


def test_the_image_check_names_what_is_wrong_in_words():
    black = np.zeros((64, 64, 3), np.uint8)
    assert image_reason(black).startswith("blank")
    assert image_reason(np.full((64, 64, 3), 255, np.uint8)).startswith("saturated")
    grey = np.full((64, 64, 3), 128, np.uint8)
    assert image_reason(grey).startswith("not a cell on a black background")
    two = black.copy()
    two[10:22, 10:22] = two[40:52, 40:52] = 150
    assert image_reason(two).startswith("not one cell")
    corner = black.copy()
    corner[0:20, 0:20] = 150
    assert image_reason(corner).startswith("off centre")
    flat = black.copy()
    flat[20:44, 20:44] = 150
    assert image_reason(flat).startswith("smooth")
    textured = flat.copy()
    textured[20:44, 20:44] = np.random.default_rng(0).integers(90, 210, (24, 24, 1))
    assert image_reason(textured) is None


def test_objects_touching_at_a_corner_are_one_object_and_the_largest_one_is_measured():
    picture = np.zeros((64, 64, 3), np.uint8)  # at the check's own 64×64 grid: no resampling
    picture[10:20, 10:20] = picture[20:30, 20:30] = 120  # diagonal neighbours at (19, 19) and (20, 20)
    assert measure(picture)["objects"] == 1
    picture[40:44, 50:52] = 120  # a separate speck of 8 pixels beside 200
    stats = measure(picture)
    assert stats["objects"] == 2 and stats["object_share"] == pytest.approx(200 / 208)
    assert stats["centre_offset"] == pytest.approx(np.hypot(19.5 - 31.5, 19.5 - 31.5) / 64)
    assert measure(np.zeros((64, 64, 3), np.uint8))["objects"] == 0


def test_ledoit_wolf_shrinkage_matches_scikit_learn():
    from sklearn.covariance import LedoitWolf

    x = torch.randn(30, 50, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 50)
    mean, cov = ledoit_wolf(x)
    reference = LedoitWolf().fit(x.numpy().astype(np.float64))
    np.testing.assert_allclose(mean.numpy(), reference.location_, atol=1e-6)
    np.testing.assert_allclose(cov.numpy(), reference.covariance_, rtol=1e-5, atol=1e-7)


def test_the_precision_is_the_inverse_of_the_shrunk_covariance_with_fewer_cells_than_features_or_more():
    from alnet.trust.feature_check import _distances_to_fit, _fit

    generator = torch.Generator().manual_seed(2)
    for cells, features in ((30, 200), (200, 30)):  # the Woodbury path and the direct one
        x = torch.randn(cells, features, generator=generator) * torch.linspace(0.1, 3, features)
        mean, precision = _fit(x)
        _, covariance = ledoit_wolf(x)
        np.testing.assert_allclose((precision @ covariance).numpy(), np.eye(features), atol=1e-8)
        np.testing.assert_allclose(mean.numpy(), x.double().mean(0).numpy())
        others = torch.randn(7, features, generator=generator)  # distances without the precision matrix agree
        np.testing.assert_allclose(_distances_to_fit(x, others).numpy(), mahalanobis(others, mean, precision).numpy(),
                                   rtol=1e-5)


def test_the_feature_gate_refuses_features_far_from_the_training_cells():
    generator = torch.Generator().manual_seed(1)
    train, val = torch.randn(200, 16, generator=generator), torch.randn(50, 16, generator=generator)
    gate = fit_feature_gate(train, val)
    near = torch.randn(100, 16, generator=generator)
    far = near + 10
    assert (gate.distances(near) <= gate.threshold).all() and (gate.distances(far) > gate.threshold).all()
    assert gate.reason(float(gate.distances(far[:1])[0])).startswith("unlike the cells the model was trained on")
    # distances agree with the definition
    expected = ((far[0] - gate.mean) @ gate.precision @ (far[0] - gate.mean)).sqrt()
    assert float(mahalanobis(far[:1], gate.mean, gate.precision)[0]) == pytest.approx(float(expected), rel=1e-4)
    assert fit_feature_gate(train[:3]) is None  # too few cells for a covariance: no feature check


def test_without_validation_cells_the_threshold_comes_from_training_cells_cross_fitted_by_subject():
    train = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    gate = fit_feature_gate(train, None, groups=[f"s{i % 8}" for i in range(40)])
    assert "cross-fitted by subject" in gate.held_out and "validation" not in gate.held_out
    assert gate.threshold == pytest.approx(gate.margin * gate.reference)


def test_a_feature_gate_survives_json_and_hostile_metadata_is_refused():
    gate = fit_feature_gate(torch.randn(20, 6), torch.randn(5, 6))
    again = FeatureGate.from_json(gate.to_json())
    assert torch.equal(again.precision, gate.precision) and again.threshold == gate.threshold
    state = json.loads(gate.to_json())
    for hostile in ({**state, "dimensions": 10**6}, {**state, "precision": "AAAA"}, {**state, "threshold": -1},
                    {**state, "mean": 5}):
        with pytest.raises(ValueError):
            FeatureGate.from_json(json.dumps(hostile))


@pytest.mark.slow
def test_a_model_trained_on_the_real_cells_rejects_none_of_them(mini_checkpoint, mini_root):
    trained = load_trained_model(mini_checkpoint)
    assert trained.input_gate is not None and trained.input_gate.cells > 0
    stored = torch.load(mini_checkpoint, map_location="cpu", weights_only=True)[INPUT_GATE_KEY]["features"]
    assert isinstance(stored["precision"], torch.Tensor)  # plain tensors: loadable with weights_only=True
    rows, failed = predict_rows(load_pipeline(mini_checkpoint), _real_cells(mini_root))
    assert not failed and len(rows) == 52
    assert [(Path(r["path"]).name, r["reason"]) for r in rows if r["status"] != "ok"] == []


@pytest.mark.slow
def test_a_model_trained_on_synthetic_cells_rejects_no_real_cell(synthetic_root, mini_root, tmp_path):
    from alnet.config import RunConfig
    from alnet.data.cache import prepare
    from alnet.train.run import train_run

    prepared = prepare(scan(synthetic_root).cells, tmp_path / "cache", Preprocessing(size=136))
    config = RunConfig(protocol="subject", epochs=1, image_size=136, batch_size=16, bn_momentum=0.5)
    metrics = train_run(config, prepared, tmp_path / "run", progress=False, log=lambda m: None)
    # the run's own test sets were screened too, and say so
    assert all(f["input_gate"]["images"] == f["images"] for f in metrics["folds"])
    checkpoint = next((tmp_path / "run" / "checkpoints" / "prelim").glob("best.ckpt"))
    predictor = load_pipeline(checkpoint)
    assert predictor.gate.features is not None and "validation cells" in predictor.gate.features.held_out
    rows, _ = predict_rows(predictor, _real_cells(mini_root))
    assert [(Path(r["path"]).name, r["reason"]) for r in rows if r["status"] != "ok"] == []


@pytest.mark.slow
def test_at_least_95_percent_of_generated_non_cells_are_refused_each_with_a_reason(mini_checkpoint, non_cells):
    kinds = Counter(kind for kind, _ in non_cells)
    assert set(kinds) == {"noise", "gradient", "text", "white", "one-pixel", "pasted", "chart"}
    rows, failed = predict_rows(load_pipeline(mini_checkpoint), [path for _, path in non_cells])
    assert not failed and len(rows) == len(non_cells)
    refused = [r for r in rows if r["status"] == "rejected"]
    assert len(refused) >= 0.95 * len(rows), [Path(r["path"]).name for r in rows if r["status"] == "ok"]
    assert all(r["reason"] and r["predicted"] == "" and r["probability_all"] == "" for r in refused)
    kind_of = {str(path): kind for kind, path in non_cells}
    for kind in ("white", "one-pixel", "pasted", "chart", "text", "gradient", "noise"):  # by the image check
        assert all(r["status"] == "rejected" for r in rows if kind_of[r["path"]] == kind), kind


@pytest.mark.slow
def test_onnx_export_carries_the_feature_gate_and_refuses_what_the_checkpoint_refuses(mini_checkpoint, non_cells,
                                                                                      mini_root, tmp_path):
    path = export_onnx(mini_checkpoint, tmp_path / "alnet.onnx")
    graph = onnx.load(str(path))
    assert [o.name for o in graph.graph.output] == ["probability_all", "probability_raw", "features"]
    assert "alnet_input_gate" in {p.key for p in graph.metadata_props}
    files = _real_cells(mini_root)[:10] + [p for _, p in non_cells]
    torch_rows, _ = predict_rows(load_pipeline(mini_checkpoint, precision="32"), files)
    onnx_predictor = load_pipeline(path)
    assert onnx_predictor.gate.features is not None
    onnx_rows, _ = predict_rows(onnx_predictor, files)
    assert [r["status"] for r in onnx_rows] == [r["status"] for r in torch_rows]


@pytest.mark.slow
def test_the_service_answers_a_chart_with_422_and_a_reason_and_a_real_cell_with_a_call(mini_checkpoint,
                                                                                         non_cells, mini_root):
    client = TestClient(create_app(mini_checkpoint))
    chart = next(path for kind, path in non_cells if kind == "chart")
    refused = client.post("/predict", files={"file": (chart.name, chart.read_bytes(), "image/png")})
    assert refused.status_code == 422
    body = refused.json()
    assert set(body) >= {"error", "reason"} and "predicted" not in body
    assert chart.name in body["error"] and body["reason"].startswith("saturated")
    cell = _real_cells(mini_root)[0]
    answered = client.post("/predict", files={"file": (cell.name, cell.read_bytes(), "image/png")})
    assert answered.status_code == 200 and answered.json()["status"] == "ok"
    assert answered.json()["predicted"] in ("ALL", "HEM")
    assert "body.reason" in client.get("/").text  # the page shows the reason in words


def test_explain_still_shows_a_refused_picture_but_says_why_its_answer_does_not_count(mini_checkpoint, non_cells,
                                                                                        mini_root, tmp_path):
    chart = next(path for kind, path in non_cells if kind == "chart")
    result = runner.invoke(app, ["explain", str(mini_checkpoint), str(chart), "--gradcam", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "refused by the input gate: saturated" in result.output and "does not count" in result.output
    assert (tmp_path / "gradcam.png").is_file()
    cell = _real_cells(mini_root)[0]
    result = runner.invoke(app, ["explain", str(mini_checkpoint), str(cell), "--gradcam", "--out", str(tmp_path)])
    assert result.exit_code == 0 and "P(ALL) = " in result.output and "refused" not in result.output


@pytest.mark.slow
def test_gate_settings_come_from_a_checked_yaml_file_and_no_gate_answers_everything(mini_checkpoint, tmp_path):
    from PIL import Image

    white = tmp_path / "white.png"
    Image.new("RGB", (450, 450), "white").save(white)
    loose = tmp_path / "loose.yaml"
    loose.write_text("min_background: 0.0\nmax_saturated: 1.0\nmin_texture: 0.0\n")
    assert read_image_check(loose) == ImageCheck(min_background=0.0, max_saturated=1.0, min_texture=0.0)
    statuses = {}
    for name, extra in (("default", []), ("loose", ["--gate", str(loose)]), ("off", ["--no-gate"])):
        out = tmp_path / f"{name}.csv"
        result = runner.invoke(app, ["predict", str(mini_checkpoint), str(white), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        with open(out, newline="") as handle:
            row = next(csv.DictReader(handle))
        statuses[name] = [row["status"], row["reason"]]
    assert statuses["default"][0] == "rejected" and "saturated" in statuses["default"][1]
    assert statuses["off"] == ["ok", ""]
    # past the loosened image check, the model's feature check still finds it unlike the training cells
    assert statuses["loose"][0] == "rejected" and statuses["loose"][1].startswith("unlike the cells")
    for text, message in (("dark_lvl: 3\n", "unknown gate setting"), ("min_background: 2\n", "from 0 to 1"),
                          ("- a\n- b\n", "name: value"), ("min_background: !!python/object:os.system x\n",
                                                          "cannot read gate settings")):
        loose.write_text(text)
        with pytest.raises(GateError, match=message):
            read_image_check(loose)
        result = runner.invoke(app, ["predict", str(mini_checkpoint), str(white), "--out", str(tmp_path / "x.csv"),
                                     "--gate", str(loose)])
        assert result.exit_code == 2 and "loose.yaml" in result.output


@pytest.mark.slow
def test_evaluate_reports_how_many_test_cells_the_gate_refused_and_why(mini_checkpoint, synthetic_copy, tmp_path):
    from PIL import Image

    prelim = next(synthetic_copy.rglob("C-NMC_test_prelim_phase_data"))
    victim = sorted(prelim.glob("*.bmp"))[0]
    Image.new("RGB", (450, 450), "white").save(victim, format="BMP")  # a white square among the test cells
    out = tmp_path / "evaluation.json"
    result = runner.invoke(app, ["evaluate", str(mini_checkpoint), "--data", str(synthetic_copy), "--out", str(out),
                                 "--no-progress", "--include-seen"])  # synthetic subject ids may clash with real
    assert result.exit_code == 0, result.output
    fold = json.loads(out.read_text())["folds"][0]
    gate = fold["input_gate"]
    assert gate["images"] == fold["images"]  # nothing dropped: every test cell is counted
    assert gate["rejected"] >= 1 and gate["reasons"].get("saturated", 0) >= 1
    assert sum(gate["reasons"].values()) == gate["rejected"]


def test_a_refused_image_is_rejected_before_review_and_an_accepted_one_close_to_the_threshold_is_flagged(mini_root):
    from alnet.labels import Status
    from alnet.pipeline import NetworkOutputs, Pipeline
    from alnet.trust.input_gate import InputGate

    cell = load_image(_real_cells(mini_root)[0], Preprocessing(size=136))[0]
    images = np.stack([cell, np.zeros_like(cell)])  # a real cell and a blank picture

    def network(batch):  # P(ALL) 0.55, no features: inside a review band of width 0.2
        return NetworkOutputs(np.full(len(batch), 0.55, np.float32), None)

    pipeline = Pipeline(network, "fake", Preprocessing(size=136), Path("model.ckpt"), review={"half_width": 0.2},
                        gate=InputGate())
    cell_answer, blank_answer = pipeline.answer(images)
    assert cell_answer.status is Status.REVIEW and "within 0.200 of the threshold" in cell_answer.reason
    assert cell_answer.answered and cell_answer.predicted == "ALL"
    assert blank_answer.status is Status.REJECTED and blank_answer.reason.startswith("blank")
    # every picture gets its probabilities: a writer decides what to make of a refused one
    assert blank_answer.probability_all == pytest.approx(0.55) and not blank_answer.answered
    calibrated = Pipeline(network, "fake", Preprocessing(size=136), Path("model.ckpt"),
                          calibration={"temperature": 2.0}, gate=InputGate(None))
    answer = calibrated.answer(images[:1])[0]
    assert answer.probability_raw == pytest.approx(0.55) and answer.status is Status.OK
    assert answer.probability_all == pytest.approx(1 / (1 + (0.45 / 0.55) ** 0.5))


def test_a_network_output_that_is_not_a_probability_or_not_one_per_picture_gets_no_answer(mini_root):
    from alnet.labels import Status
    from alnet.pipeline import NetworkOutputs, Pipeline
    from alnet.trust.input_gate import InputGate

    cells = np.stack([load_image(path, Preprocessing(size=136))[0] for path in _real_cells(mini_root)[:3]])
    broken = Pipeline(lambda batch: NetworkOutputs(np.array([np.nan, 1.5, 0.3], np.float32), None), "fake",
                      Preprocessing(size=136), Path("damaged.ckpt"), gate=InputGate())
    answers = broken.answer(cells)
    assert [a.status for a in answers] == [Status.REJECTED, Status.REJECTED, Status.OK]
    assert "not a probability" in answers[0].reason and "damaged" in answers[1].reason
    shifted = Pipeline(lambda batch: NetworkOutputs(np.full(2 * len(batch), 0.5, np.float32), None), "fake",
                       Preprocessing(size=136), Path("odd.onnx"), gate=InputGate())
    with pytest.raises(ValueError, match="odd.onnx: the model gave outputs of shapes"):
        shifted.answer(cells)


def test_a_tiny_yaml_file_that_expands_to_gigabytes_is_refused_in_one_short_line(tmp_path):
    parts = ["&a [x, x, x, x, x, x, x, x, x, x]"] + [f"&{name} [{', '.join(['*' + last] * 10)}]"
                                                 for last, name in zip("abcdefg", "bcdefgh")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"min_background: [{', '.join(parts)}]\n")  # 10^9 strings if printed whole
    with pytest.raises(GateError, match="bomb.yaml: min_background must be a number from 0 to 1") as refused:
        read_image_check(bomb)
    assert len(str(refused.value)) < 200


def test_explain_replaces_only_the_pngs_it_wrote_itself(mini_checkpoint, mini_root, tmp_path):
    from PIL import Image

    cell = _real_cells(mini_root)[0]
    mine = tmp_path / "gradcam.png"
    Image.new("RGB", (8, 8), "red").save(mine)  # the user's own figure of that name
    result = runner.invoke(app, ["explain", str(mini_checkpoint), str(cell), "--gradcam", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--force" in result.output and Image.open(mine).size == (8, 8)
    forced = ["explain", str(mini_checkpoint), str(cell), "--gradcam", "--out", str(tmp_path), "--force"]
    assert runner.invoke(app, forced).exit_code == 0 and Image.open(mine).size != (8, 8)
    again = runner.invoke(app, forced[:-1])  # its own file: replaced without --force
    assert again.exit_code == 0, again.output


def test_gate_settings_from_a_pipe_or_with_a_number_of_thousands_of_digits_are_one_line_errors(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.yaml")  # reading it would block forever
    with pytest.raises(GateError, match="pipe.yaml: not a regular file"):
        read_image_check(tmp_path / "pipe.yaml")
    (tmp_path / "digits.yaml").write_text("dark_level: " + "9" * 5000 + "\n")
    with pytest.raises(GateError, match="digits.yaml: cannot read gate settings"):
        read_image_check(tmp_path / "digits.yaml")


def test_explain_refuses_an_out_that_is_a_file_before_running_the_model(mini_checkpoint, mini_root, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    result = runner.invoke(app, ["explain", str(mini_checkpoint), str(_real_cells(mini_root)[0]), "--gradcam",
                                 "--out", str(taken)])
    assert result.exit_code == 2 and "is not a folder" in result.output and taken.read_text() == "mine\n"
