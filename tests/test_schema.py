"""One schema per file: the same columns whoever writes it, formulas neutralised, and files written by the earlier
version still read."""

import csv
import json
from pathlib import Path

import pytest

from alnet.config import RunConfig
from alnet.data.cnmc import scan
from alnet.data.protocols import make_splits
from alnet.schema import PREDICTION_FIELDS, SUBJECT_FIELDS, read_csv, read_predictions, write_csv
from alnet.train.results import summarize_run
from alnet.trust.subjects import subject_rows

EARLIER = Path(__file__).parent / "data" / "earlier-version"


def test_every_csv_neutralises_text_a_spreadsheet_would_run_as_a_formula(tmp_path):
    rows = [{"subject": "=cmd|' /C calc'!A0", "path": "+SUM(1+1).png", "reason": "@x", "note": "\tx",
             "probability_all": "-0.5", "predicted": "ALL"}]
    write_csv(tmp_path / "p.csv", rows, PREDICTION_FIELDS)
    back = read_csv(tmp_path / "p.csv")[0]
    assert back["subject"] == "'=cmd|' /C calc'!A0" and back["path"] == "'+SUM(1+1).png"
    assert back["reason"] == "'@x" and back["note"] == "'\tx"
    assert back["probability_all"] == "-0.5" and back["predicted"] == "ALL"  # numbers and words stay as they are


def test_a_run_of_the_earlier_version_reads_back_to_the_metrics_it_reported(mini_root):
    run = EARLIER / "run"
    config = RunConfig.from_yaml(run / "config.yaml")
    splits = make_splits(config.protocol, scan(mini_root).cells, config.seed, config.val_fraction)
    predictions = {s.name: read_predictions(run / "folds" / s.name / "predictions.csv") for s in splits}
    assert {r["label"] for rows in predictions.values() for r in rows} == {"ALL", "HEM"}  # 1/0 read as classes
    assert all(list(r) == PREDICTION_FIELDS for rows in predictions.values() for r in rows)
    trust = {s.name: json.loads((run / "folds" / s.name / "trust.json").read_text()) for s in splits}
    again = summarize_run(config, splits, predictions, 1, trust)
    recorded = json.loads((run / "metrics.json").read_text())
    for fold, before in zip(again["folds"], recorded["folds"]):
        for key in ("accuracy", "auc", "f1", "images", "confusion", "calibration", "review", "subject_level"):
            assert json.dumps(fold[key], sort_keys=True) == json.dumps(before[key], sort_keys=True), key
    # subjects.csv now has one set of columns; the earlier run's per-subject figures come out the same
    earlier = {(r["fold"], r["subject"]): r for r in read_csv(run / "subjects.csv")}
    rows = subject_rows([r for fold in predictions.values() for r in fold])
    assert len(rows) == len(earlier) and list(rows[0]) == SUBJECT_FIELDS
    for row in rows:
        before = earlier[(row["fold"], row["subject"])]
        assert row["cells"] == int(before["images"]) and row["label"] == ("ALL" if before["label"] == "1" else "HEM")
        assert float(row["mean_probability_all"]) == pytest.approx(float(before["mean_probability_all"]), abs=1e-6)
        assert float(row["accuracy"]) == pytest.approx(float(before["accuracy"]), abs=1e-6)


@pytest.mark.slow
def test_predict_replaces_the_csvs_its_earlier_version_wrote_without_force(mini_checkpoint, mini_root, tmp_path):
    from typer.testing import CliRunner

    from alnet.cli import app

    out = tmp_path / "predictions.csv"
    out.write_bytes((EARLIER / "predict-predictions.csv").read_bytes())
    (tmp_path / "subjects.csv").write_bytes((EARLIER / "predict-subjects.csv").read_bytes())
    cells = mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0"
    result = CliRunner().invoke(app, ["predict", str(mini_checkpoint), str(cells), "--out", str(out), "--by-subject"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as handle:
        assert next(csv.reader(handle)) == PREDICTION_FIELDS
    with open(tmp_path / "subjects.csv", newline="") as handle:
        assert next(csv.reader(handle)) == SUBJECT_FIELDS


def test_a_predictions_csv_that_is_not_one_is_a_one_line_error_naming_it(tmp_path):
    cases = {"no-columns.csv": "a,b\n1,2\n", "word.csv": "path,label,probability_all\nx.png,ALL,abc\n",
             "latin1.csv": "path,label,probability_all\n".encode() + b"\xe9.png,ALL,0.5\n",
             "huge.csv": "path,label,probability_all\n" + "x" * 200_000 + ",ALL,0.5\n",
             "label.csv": "path,label,probability_all\nx.png,maybe,0.5\n"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=f"{name}.*not a predictions.csv alnet wrote"):
            read_predictions(path)
    excel = tmp_path / "excel.csv"  # saved by a spreadsheet: UTF-8 with a byte-order mark
    excel.write_bytes("\ufefffold,path,label,probability_all\nfold_0,x.png,ALL,0.7\n".encode())
    assert read_predictions(excel)[0]["fold"] == "fold_0"


def test_hostile_numbers_in_a_model_s_metadata_are_refused_not_raised():
    from alnet.schema import OnnxMetadata

    base = {"alnet_preprocessing": '{"size": 136, "crop": 1}'}
    for key, value in (("alnet_preprocessing", '{"size": Infinity, "crop": 1}'),
                       ("alnet_calibration", '{"temperature": 1' + "0" * 400 + "}"),
                       ("alnet_review", '{"half_width": 1' + "0" * 400 + "}"),
                       ("alnet_input_gate", '{"dimensions": Infinity}')):
        with pytest.raises(ValueError, match="model.onnx: unreadable .* export the model again"):
            OnnxMetadata.read({**base, key: value}, Path("model.onnx"))


def test_a_stored_calibration_or_review_keeps_only_what_alnet_writes_each_of_its_type():
    """A checkpoint may be hostile: its free text reaches model cards and ONNX metadata as one short plain line,
    and what is not alnet's (a tensor, a nested list, an unknown key) reaches nothing."""
    import torch

    from alnet.schema import STORED_TEXT_LIMIT, checked_calibration, checked_review

    deep = []
    for _ in range(100_000):
        deep = [deep]
    stored = {"method": "temperature", "temperature": 2.0, "validation_nll_before": 0.4, "validation_nll_after": deep,
              "fitted_on": torch.zeros(10), "note": "x\n\n## Intended use\x1b[31m SAFE\r" + "y" * 10**6, "extra": 1}
    checked = checked_calibration(stored)
    assert set(checked) == {"method", "temperature", "validation_nll_before", "note"}
    assert checked["note"].startswith("x ## Intended use [31m SAFE y") and len(checked["note"]) <= STORED_TEXT_LIMIT
    json.dumps(checked)  # every value JSON can hold: export writes it into the model's metadata
    with pytest.raises(TypeError, match="method 'none' with a temperature"):
        checked_calibration({"method": "none", "temperature": 0.5})
    with pytest.raises(TypeError, match="a list is not a number"):
        checked_calibration({"temperature": deep})
    review = checked_review({"half_width": 0.1, "threshold": 0.5, "fitted_on": ["a"], "other": "b"})
    assert review == {"half_width": 0.1, "threshold": 0.5}
