"""One pipeline: `alnet predict`, `alnet serve`, `alnet evaluate` and a run's own test pass give the same answer
for the same picture and checkpoint."""

import csv
import shutil

import pytest
from conftest import predict_rows
from fastapi.testclient import TestClient
from PIL import Image

from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing
from alnet.infer.predict import load_pipeline
from alnet.infer.serve import create_app
from alnet.schema import PREDICTION_FIELDS, read_predictions
from alnet.train.evaluate import evaluate_run


@pytest.fixture(scope="module")
def run_with_a_non_cell(mini_root, tmp_path_factory):
    """A subject run (fp32, 136 px, one epoch) on the real cells, one test cell of fold_0 replaced by a white
    square the input gate refuses."""
    from alnet.config import RunConfig
    from alnet.train.run import train_run

    base = tmp_path_factory.mktemp("one-pipeline")
    data = shutil.copytree(mini_root, base / "data")
    victim = sorted((data / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all").glob("*.png"))[-1]
    Image.new("RGB", (450, 450), (250, 250, 250)).save(victim)
    prepared = prepare(scan(data).cells, base / "cache", Preprocessing(size=136))
    config = RunConfig(protocol="subject", epochs=1, image_size=136, batch_size=16, bn_momentum=0.5, seed=5,
                       val_fraction=0.5,  # validation cells enough for a review band
                       precision="32")
    train_run(config, prepared, base / "run", progress=False, log=lambda m: None)
    return base / "run", prepared


@pytest.mark.slow
def test_predict_serve_evaluate_and_the_run_s_test_pass_give_the_same_answers(run_with_a_non_cell):
    run, prepared = run_with_a_non_cell
    tested = read_predictions(run / "predictions.csv")
    assert {r["status"] for r in tested} == {"ok", "review", "rejected"}  # every kind of answer is compared
    retested = evaluate_run(run, prepared)
    by_fold = {f["fold"]: f for f in retested["folds"]}
    for fold in ("fold_0", "fold_1", "fold_2"):
        mine = [r for r in tested if r["fold"] == fold]
        checkpoint = mine[0]["checkpoint"]
        pipeline = load_pipeline(checkpoint, precision="32")
        predicted, _ = predict_rows(pipeline, [r["path"] for r in mine])
        client = TestClient(create_app(checkpoint))
        for row, again in zip(mine, predicted):
            assert (again["status"], again["reason"]) == (row["status"], row["reason"]), row["path"]
            if row["status"] != "rejected":  # predict's CSV gives a refused picture no probability
                assert float(again["probability_all"]) == pytest.approx(float(row["probability_all"]), abs=1e-5)
                assert float(again["probability_raw"]) == pytest.approx(float(row["probability_raw"]), abs=1e-5)
                assert again["predicted"] == row["predicted"]
            with open(row["path"], "rb") as handle:
                response = client.post("/predict", files={"file": ("cell.png", handle.read(), "image/png")})
            body = response.json()
            assert body["status"] == row["status"] and body["reason"] == row["reason"]
            if row["status"] != "rejected":
                assert body["probability_all"] == pytest.approx(float(row["probability_all"]), abs=1e-5)
        rejected = sum(r["status"] == "rejected" for r in mine)
        assert by_fold[fold]["input_gate"]["rejected"] == rejected
        assert by_fold[fold]["review"]["flagged"] == sum(r["status"] == "review" for r in mine)
    with open(run / "predictions.csv", newline="") as handle:
        assert next(csv.reader(handle)) == PREDICTION_FIELDS
