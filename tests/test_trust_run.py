"""Calibration, the patient-level view and review through a run, predict, serve and the ONNX export."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import predict_rows
from PIL import Image
from typer.testing import CliRunner

from alnet.checkpoint import add_to_checkpoint, load_trained_model
from alnet.cli import app
from alnet.data.cnmc import scan
from alnet.infer.export import export_onnx
from alnet.infer.predict import load_pipeline
from alnet.schema import CALIBRATION_KEY, REVIEW_KEY
from alnet.trust.calibration import negative_log_likelihood

runner = CliRunner()


@pytest.fixture(scope="module")
def subject_run(mini_root, tmp_path_factory):
    """ALNet (136 px) trained for one epoch per fold on the real cells, subject protocol."""
    from alnet.config import RunConfig
    from alnet.data.cache import prepare
    from alnet.data.transforms import Preprocessing
    from alnet.train.run import train_run

    base = tmp_path_factory.mktemp("subject-run")
    prepared = prepare(scan(mini_root).cells, base / "cache", Preprocessing(size=136))
    config = RunConfig(protocol="subject", epochs=1, image_size=136, batch_size=16, bn_momentum=0.5, seed=3)
    result = train_run(config, prepared, base / "run", progress=False, log=lambda m: None)
    return base / "run", result, prepared


@pytest.fixture(scope="module")
def calibrated_checkpoint(subject_run, tmp_path_factory):
    """fold_0's chosen checkpoint with a temperature far from 1 and a review band, so that calibrated and raw
    probabilities differ clearly whatever the one-epoch fit found."""
    source = next((subject_run[0] / "checkpoints" / "fold_0").glob("best.ckpt"))
    path = tmp_path_factory.mktemp("calibrated") / "model.ckpt"
    shutil.copy(source, path)
    add_to_checkpoint(path, {CALIBRATION_KEY: {"method": "temperature", "temperature": 0.25},
                             REVIEW_KEY: {"half_width": 0.2}})
    return path


@pytest.mark.slow
def test_a_subject_run_reports_calibration_patients_and_review_per_test_set(subject_run):
    run, result, _ = subject_run
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(result))
    for fold in result["folds"]:
        calibration = fold["calibration"]
        assert calibration["method"] == "temperature" and calibration["temperature"] > 0
        assert "validation subjects" in calibration["fitted_on"]
        assert set(calibration["before"]) == set(calibration["after"]) == {"ece", "brier", "nll"}
        # Fitted on the validation subjects: never worse there.
        assert calibration["validation_nll_after"] <= calibration["validation_nll_before"] + 1e-9
        level = fold["subject_level"]
        assert level["subjects"] == len(level["per_subject"]) == len({p["subject"] for p in level["per_subject"]})
        assert level["auc_interval"]["resamples"] == 1000 and level["auc_interval"]["unit"] == "subject"
        assert set(fold["intervals"]) == {"accuracy", "auc"}
        low, high = fold["intervals"]["accuracy"]["low"], fold["intervals"]["accuracy"]["high"]
        assert low <= fold["accuracy"] <= high
        assert 0 <= fold["review"]["coverage"] <= 1 and fold["review"]["half_width"] is not None
    for key in ("ece_before", "ece_after", "brier_before", "brier_after", "nll_before", "nll_after"):
        assert set(result["summary"]["calibration"][key]) == {"mean", "std"}
    assert set(result["summary"]["subject_level"]["auc"]) == {"mean", "std"}
    header = (run / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"probability_raw", "status", "reason"} <= set(header)
    for figure in ("reliability.png", "subjects.png", "risk_coverage.png"):
        assert (run / "figures" / figure).is_file(), figure
    report = (run / "report.html").read_text()
    assert "Reliability" in report and "risk–coverage" in report.lower() and "subject-level" in report.lower()


@pytest.mark.slow
def test_the_chosen_checkpoint_carries_its_calibration_and_still_loads_without_unpickling(subject_run, mini_root):
    run, result, _ = subject_run
    chosen = run / "checkpoints" / "fold_0" / (run / "folds" / "fold_0" / "checkpoint.txt").read_text().strip()
    stored = torch.load(chosen, map_location="cpu", weights_only=True)
    assert stored["calibration"]["temperature"] == result["folds"][0]["calibration"]["temperature"]
    assert stored["review"]["half_width"] == result["folds"][0]["review"]["half_width"]
    assert stored["input_gate"]["features"]["threshold"] > 0  # the input gate, written in the same rewrite
    trained = load_trained_model(chosen)
    assert trained.temperature == stored["calibration"]["temperature"] and trained.review is not None
    assert trained.input_gate is not None
    # The stored temperature really lowers (or keeps) the NLL of the validation cells it was fitted on.
    fitted = stored["calibration"]
    assert fitted["validation_nll_after"] <= fitted["validation_nll_before"] + 1e-9


@pytest.mark.slow
def test_evaluate_applies_the_calibration_stored_with_each_checkpoint(subject_run):
    from alnet.train.evaluate import evaluate_run

    run, result, prepared = subject_run
    again = evaluate_run(run, prepared)
    for retested, original in zip(again["folds"], result["folds"]):
        assert retested["calibration"]["temperature"] == original["calibration"]["temperature"]
        assert retested["calibration"]["after"]["nll"] == pytest.approx(original["calibration"]["after"]["nll"],
                                                                         abs=1e-3)
        assert retested["review"]["half_width"] == original["review"]["half_width"]
        assert retested["subject_level"]["subjects"] == original["subject_level"]["subjects"]


@pytest.mark.slow
def test_predict_serve_and_onnx_agree_on_the_calibrated_probability(calibrated_checkpoint, mini_root, tmp_path):
    from fastapi.testclient import TestClient

    from alnet.infer.serve import create_app

    files = [c.path for c in scan(mini_root).cells]
    torch_rows, _ = predict_rows(load_pipeline(calibrated_checkpoint, precision="32"), files, batch_size=16)
    onnx_path = export_onnx(calibrated_checkpoint, tmp_path / "model.onnx")
    onnx_rows, _ = predict_rows(load_pipeline(onnx_path), files, batch_size=7)
    calibrated = np.array([float(r["probability_all"]) for r in torch_rows])
    raw = np.array([float(r["probability_raw"]) for r in torch_rows])
    np.testing.assert_allclose([float(r["probability_all"]) for r in onnx_rows], calibrated, atol=1e-3)
    np.testing.assert_allclose([float(r["probability_raw"]) for r in onnx_rows], raw, atol=1e-3)
    # T = 0.25 sharpens: the calibrated value is σ(4·logit(raw)), not the raw one.
    expected = 1 / (1 + np.exp(-4 * np.log(raw.clip(1e-6, 1 - 1e-6) / (1 - raw.clip(1e-6, 1 - 1e-6)))))
    np.testing.assert_allclose(calibrated, expected, atol=1e-4)
    assert np.abs(calibrated - raw).max() > 0.01
    # Within 0.2 of the threshold: review, label still given.
    for row, p in zip(torch_rows, calibrated):
        assert row["status"] == ("review" if abs(p - 0.5) < 0.2 else "ok") and row["predicted"] in ("ALL", "HEM")
    # The ONNX graph computes the calibrated output itself: a consumer without alnet gets it.
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probability_all", "probability_raw", "features"]
    metadata = session.get_modelmeta().custom_metadata_map  # calibration, review band and input gate together
    assert json.loads(metadata["alnet_calibration"])["temperature"] == 0.25
    assert json.loads(metadata["alnet_review"])["half_width"] == 0.2 and "alnet_input_gate" in metadata
    client = TestClient(create_app(calibrated_checkpoint))
    for path, row in list(zip(files, torch_rows))[:4]:
        buffer = io.BytesIO()
        Image.open(path).save(buffer, format="PNG")
        body = client.post("/predict", files={"file": ("cell.png", buffer.getvalue(), "image/png")}).json()
        assert body["probability_all"] == pytest.approx(float(row["probability_all"]), abs=1e-3)
        assert body["probability_raw"] == pytest.approx(float(row["probability_raw"]), abs=1e-3)
        assert body["status"] == row["status"] and body["predicted"] == row["predicted"]


@pytest.mark.slow
def test_predict_by_subject_on_the_real_cells_gives_one_row_per_subject(calibrated_checkpoint, mini_root, tmp_path):
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(calibrated_checkpoint), str(mini_root), "--out", str(out),
                                 "--by-subject"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "subjects.csv", newline="") as handle:
        subjects = list(csv.DictReader(handle))
    with open(out, newline="") as handle:
        cells = list(csv.DictReader(handle))
    subject_of = {c.path.resolve(): c.subject for c in scan(mini_root).cells}  # the dataset's own reading
    assert {s["subject"] for s in subjects} == set(subject_of.values()) and len(subjects) == 26
    for row in subjects:
        mine = [c for c in cells if subject_of[Path(c["path"]).resolve()] == row["subject"]]
        assert int(row["cells"]) == 2 == len(mine)
        assert int(row["cells_all"]) == sum(c["predicted"] == "ALL" for c in mine)
        assert int(row["cells_review"]) == sum(c["status"] == "review" for c in mine)
        assert float(row["fraction_all_low"]) <= float(row["fraction_all"]) <= float(row["fraction_all_high"])
        assert row["predicted"] == ("ALL" if float(row["mean_probability_all"]) > 0.5 else "HEM")
        assert int(row["cells_rejected"]) == 0
    # A map names the subjects instead; a hostile one is a one-line error.
    mapping = tmp_path / "map.csv"
    files = sorted(mini_root.rglob("*_all.*"))[:3]
    mapping.write_text("path,subject\n" + "".join(f"{f},patient-{i % 2}\n" for i, f in enumerate(files)))
    result = runner.invoke(app, ["predict", str(calibrated_checkpoint), *map(str, files), "--out", str(out),
                                 "--subjects", str(mapping)])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "subjects.csv", newline="") as handle:
        assert [(r["subject"], r["cells"]) for r in csv.DictReader(handle)] == [("patient-0", "2"), ("patient-1", "1")]
    mapping.write_text("path,subject\na.png,1\na.png,2\n")
    result = runner.invoke(app, ["predict", str(calibrated_checkpoint), *map(str, files), "--out", str(out),
                                 "--subjects", str(mapping)])
    assert result.exit_code == 2 and "given two subjects" in result.output


@pytest.mark.slow
def test_a_hostile_review_band_or_preprocessing_in_an_onnx_file_is_a_one_line_error(calibrated_checkpoint, mini_root,
                                                                                     tmp_path):
    import onnx

    path = export_onnx(calibrated_checkpoint, tmp_path / "model.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["alnet_calibration"])["temperature"] == 0.25
    assert json.loads(meta["alnet_review"])["half_width"] == 0.2
    for key, value, message in (("alnet_review", '{"half_width": 3}', "unreadable review band"),
                                ("alnet_review", "[" * 100_000 + "]" * 100_000, "unreadable review band"),
                                ("alnet_review", "not json", "unreadable review band"),
                                ("alnet_preprocessing", '{"size": 64, "crop": 1}', "metadata says 64 px pictures")):
        graph = onnx.load(str(path))
        for entry in graph.metadata_props:
            if entry.key == key:
                entry.value = value
        hostile = tmp_path / "hostile.onnx"
        onnx.save(graph, str(hostile))
        result = runner.invoke(app, ["predict", str(hostile), str(next(mini_root.rglob("*.bmp"))), "--out",
                                     str(tmp_path / "p.csv")])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_by_subject_never_replaces_a_subjects_csv_alnet_did_not_write(calibrated_checkpoint, mini_root, tmp_path):
    (tmp_path / "subjects.csv").write_text("my own notes\n")
    result = runner.invoke(app, ["predict", str(calibrated_checkpoint), str(mini_root), "--out",
                                 str(tmp_path / "p.csv"), "--by-subject"])
    assert result.exit_code == 2 and "subjects.csv" in result.output
    assert (tmp_path / "subjects.csv").read_text() == "my own notes\n" and not (tmp_path / "p.csv").exists()


def test_nll_helper_clips_saturated_probabilities():
    assert np.isfinite(negative_log_likelihood([1, 0], [0.0, 1.0]))


@pytest.mark.slow
def test_a_paper_protocol_checkpoint_carries_no_calibration(mini_checkpoint):
    stored = torch.load(mini_checkpoint, map_location="cpu", weights_only=True)
    assert stored["calibration"] is None and stored["review"] is None
    trained = load_trained_model(mini_checkpoint)
    assert trained.temperature is None and trained.review is None
