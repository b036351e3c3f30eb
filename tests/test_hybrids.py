import csv
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import compare_on_mini
from typer.testing import CliRunner

from alnet.checkpoint import CheckpointError, load_trained_model, read_checkpoint
from alnet.cli import app
from alnet.config import ConfigError, RunConfig
from alnet.labels import label_of
from alnet.models import create_model, model_spec, probability_all, split_model_list
from alnet.models.head import logits_for
from alnet.models.hybrid import make_search

pytestmark = pytest.mark.usefixtures("offline_weights")  # tests never download ImageNet weights


# names -----------------------------------------------------------------------------------------------------------
def test_hybrid_names_are_parsed_by_the_registry_into_backbones_pca_and_classifier():
    spec = model_spec("AlexNet, ResNet50+PCA+rf")
    assert spec.name == "alexnet,resnet50+pca+rf" and spec.hybrid and spec.frozen
    assert spec.trained_backbones == () and spec.pretrained
    assert model_spec("alnet+svm").trained_backbones == ("alnet",)
    assert not model_spec("resnet50").hybrid


@pytest.mark.parametrize("name", ["resnet50+", "resnet50+xgb", "foo+svm", "resnet50+pca", "resnet50,resnet50+svm",
                                  "resnet50+svm+pca", "alnet+svm+rf"])
def test_malformed_hybrid_names_are_refused_with_the_form_to_write(name):
    with pytest.raises(ValueError, match="BACKBONE"):
        model_spec(name)
    with pytest.raises(ConfigError, match="hybrid"):
        RunConfig(model=name).validate()


def test_a_model_list_keeps_an_ensembles_commas_when_separated_by_semicolons_or_spaces():
    assert split_model_list("alnet,resnet50,resnet50+svm") == ["alnet", "resnet50", "resnet50+svm"]
    assert split_model_list("alnet; alexnet,resnet50+svm") == ["alnet", "alexnet,resnet50+svm"]
    assert split_model_list("alnet alexnet,resnet50+svm") == ["alnet", "alexnet,resnet50+svm"]


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_a_probability_returned_as_logits_reads_back_exactly_through_either_head(head):
    p = torch.tensor([0.0, 1e-6, 0.3, 0.5, 0.73, 1.0], dtype=torch.float64)
    assert torch.allclose(probability_all(logits_for(p, head), head).double(), p.clamp(1e-12, 1 - 1e-12), atol=1e-6)


def test_the_hybrid_concatenates_the_penultimate_features_of_its_backbones():
    model = create_model("alexnet,resnet50+knn", pretrained=False, image_size=64)
    assert model.num_features == 4096 + 2048
    assert model.forward_features(torch.rand(2, 3, 64, 64)).shape == (2, 6144)
    assert not any(p.requires_grad for p in model.parameters())


# safety ----------------------------------------------------------------------------------------------------------
def _fitted_checkpoint(path, classifier_state=None, **settings):
    """A small hybrid (ResNet-50 at 64 px, k-NN on random features) saved the way training saves one."""
    from dataclasses import asdict

    config = RunConfig(model="resnet50+knn", pretrained=False, image_size=64).validate()
    model = create_model("resnet50+knn", pretrained=False, image_size=64)
    pipeline, _ = make_search(model.parts, 12, 3, 0)
    features = np.random.default_rng(0).normal(size=(12, model.num_features)).astype(np.float32)
    model.classifier = pipeline.set_params(classifier__n_neighbors=3, **settings).fit(features, np.arange(12) % 2)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if classifier_state is not None:
        state["model._extra_state"] = classifier_state
    torch.save({"state_dict": state, "hyper_parameters": {"config": asdict(config), "seen_subjects": []}}, path)
    return path, model, features


def test_a_fitted_hybrid_checkpoint_is_plain_data_and_loads_back_the_same_classifier(tmp_path):
    path, model, features = _fitted_checkpoint(tmp_path / "fitted.ckpt")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no pickle of objects needed
    assert raw["state_dict"]["model._extra_state"]["format"] == "skops"
    loaded = load_trained_model(path)
    assert np.allclose(loaded.model.predict_proba(features), model.predict_proba(features))


def test_a_hostile_classifier_is_refused_in_one_line_and_never_run(tmp_path):
    import os

    import skops.io as sio

    marker = tmp_path / "ran"
    # A skops archive that would call os.system if its types were trusted.
    hostile = {"format": "skops", "data": sio.dumps({"payload": os.system, "argument": f"touch {marker}"})}
    path, _, _ = _fitted_checkpoint(tmp_path / "hostile.ckpt", hostile)
    read_checkpoint(path)  # the file itself is plain data
    with pytest.raises(CheckpointError, match="does not trust") as refused:
        load_trained_model(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    not_skops = {"format": "skops", "data": b"\x80\x04cos\nsystem\n."}  # a pickle in its place
    path, _, _ = _fitted_checkpoint(tmp_path / "pickle.ckpt", not_skops)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_trained_model(path)
    image = tmp_path / "cell.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "hostile.ckpt"), str(image)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert not marker.exists()


def test_a_classifier_archive_that_would_unpack_to_gigabytes_is_refused_before_anything_is_unpacked(tmp_path):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("schema.json", "{}")
        with archive.open("zeros.npy", "w", force_zip64=True) as member:  # 1.1 GB of zeros, ~1 MB compressed
            for _ in range(1100):
                member.write(bytes(2**20))
    bomb = {"format": "skops", "data": buffer.getvalue()}
    assert len(bomb["data"]) < 5 * 2**20
    path, _, _ = _fitted_checkpoint(tmp_path / "bomb.ckpt", bomb)
    with pytest.raises(CheckpointError, match="would unpack to 1,153,433,602 bytes"):
        load_trained_model(path)


# training on the real cells --------------------------------------------------------------------------------------
def _auc_by_hand(labels, probabilities):
    positives = [p for y, p in zip(labels, probabilities) if y == 1]
    negatives = [p for y, p in zip(labels, probabilities) if y == 0]
    if not positives or not negatives:
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in positives for b in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.fixture(scope="module")
def mini_prepared(mini_root, tmp_path_factory):
    from alnet.data.cache import prepare
    from alnet.data.cnmc import scan
    from alnet.data.transforms import Preprocessing

    return prepare(scan(mini_root).cells, tmp_path_factory.mktemp("hybrid-cache"), Preprocessing(size=64))


@pytest.mark.slow
@pytest.mark.parametrize("name, protocol", [("resnet50+svm", "subject"), ("resnet50+svm", "paper"),
                                            ("googlenet,resnet50+svm", "subject")])  # an ensemble's features: once
def test_a_hybrid_trains_on_the_real_cells_and_its_metrics_match_its_predictions(name, protocol, mini_prepared,
                                                                                 tmp_path):
    from alnet.infer.predict import load_pipeline
    from alnet.train.run import train_run
    from alnet.train.rundir import RunDir

    config = RunConfig(model=name, protocol=protocol, pretrained=False, image_size=64, precision="32").validate()
    logged = []
    train_run(config, mini_prepared, tmp_path / "run", progress=False, log=logged.append)
    run = RunDir(tmp_path / "run")
    for output in (run.predictions, run.metrics, run.history, run.subjects, run.report, run.figures / "roc.png"):
        assert output.is_file(), output
    metrics = json.loads(run.metrics.read_text())
    with open(run.predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {f["fold"] for f in metrics["folds"]} == {r["fold"] for r in rows} == {"fold_0", "fold_1", "fold_2"}
    for fold in metrics["folds"]:
        mine = [r for r in rows if r["fold"] == fold["fold"]]
        labels = [label_of(r["label"]) for r in mine]
        probabilities = [float(r["probability_all"]) for r in mine]
        assert fold["images"] == len(mine)
        assert fold["accuracy"] == pytest.approx(np.mean([(p > 0.5) == y for p, y in zip(probabilities, labels)]))
        assert fold["auc"] == pytest.approx(_auc_by_hand(labels, probabilities))
    chosen = [json.loads((run.fold(f) / "classifier.json").read_text()) for f in ("fold_0", "fold_1", "fold_2")]
    assert all(c["fit_seconds"] > 0 and c["parameters"] for c in chosen)
    # Hyper-parameters come from validation subjects, or (paper protocol) from folds inside the training images.
    expected = "validation log-loss" if protocol == "subject" else "cross-validated log-loss inside the training"
    assert all(expected in c["chosen_by"] for c in chosen)
    # The fitted checkpoint is what predict uses: the same probabilities for the same test images.
    checkpoint = run.chosen_checkpoint("fold_0")
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # Input gate and (no) calibration written in one rewrite; metrics.json says why there is no temperature.
    assert stored["input_gate"]["features"]["threshold"] > 0 and stored["calibration"] is None
    assert all("hybrid" in f["calibration"]["note"] for f in metrics["folds"])
    predictor = load_pipeline(checkpoint, precision="32")
    fold0 = [r for r in rows if r["fold"] == "fold_0"]
    by_path = {str(c.path): i for i, c in enumerate(mini_prepared.cells)}
    images = mini_prepared.images[[by_path[r["path"]] for r in fold0]]
    assert np.allclose(predictor.probabilities(np.asarray(images)), [float(r["probability_all"]) for r in fold0],
                       atol=1e-5)


@pytest.mark.slow
def test_compare_lists_hybrids_beside_the_cnns_and_alnets_features_feed_alnet_svm(mini_root, tmp_path):
    out = tmp_path / "compare"
    rows, _ = compare_on_mini(mini_root, out, "alnet resnet50 resnet50+svm alnet,googlenet+knn alnet+svm",
                              "--precision", "32")
    assert [r["model"] for r in rows] == ["alnet", "resnet50", "resnet50+svm", "alnet,googlenet+knn", "alnet+svm"]
    for row in rows:
        metrics = json.loads((out / row["model"] / "metrics.json").read_text())
        assert float(row["accuracy"]) == pytest.approx(metrics["summary"]["accuracy"]["mean"])
        assert float(row["training_seconds"]) > 0
    assert rows[2]["trainable_parameters"] == ""  # a hybrid trains no network weights
    markdown = (out / "comparison.md").read_text()
    assert "| resnet50+svm |" in markdown and "| alnet,googlenet+knn |" in markdown
    assert "alnet,googlenet+knn" in (out / "report.html").read_text()
    # Seeded per split as the CNNs are: without ImageNet weights, resnet50+svm's backbone is the resnet50 baseline's.
    baseline = torch.load(out / "resnet50" / "checkpoints" / "fold_0" / "best.ckpt", weights_only=True)["state_dict"]
    hybrid = torch.load(out / "resnet50+svm" / "checkpoints" / "fold_0" / "fitted.ckpt", weights_only=True)
    assert torch.equal(baseline["model.backbone.conv1.weight"],
                       hybrid["state_dict"]["model.backbones.resnet50.backbone.conv1.weight"])
    # alnet+svm and the ensemble used, per fold, the alnet trained on that fold's training subjects in this comparison.
    for model, fold in itertools.product(("alnet+svm", "alnet,googlenet+knn"), ("fold_0", "fold_1", "fold_2")):
        used = json.loads((out / model / "folds" / fold / "classifier.json").read_text())["features_from"]
        assert used == [str(out / "alnet" / "checkpoints" / fold / "best.ckpt")]


@pytest.mark.slow
def test_alnet_svm_refuses_a_checkpoint_that_saw_the_test_subjects(mini_root, mini_checkpoint, tmp_path):
    from alnet.data.cache import prepare
    from alnet.data.cnmc import scan
    from alnet.data.transforms import Preprocessing
    from alnet.train.classical import HybridError
    from alnet.train.run import RunError, train_run

    prepared = prepare(scan(mini_root).cells, tmp_path / "cache", Preprocessing(size=136))
    missing = RunConfig(model="alnet+svm", image_size=136).validate()
    with pytest.raises(RunError, match="--features-from"):
        train_run(missing, prepared, tmp_path / "none", progress=False, log=lambda m: None)
    assert not (tmp_path / "none").exists()
    # The paper-protocol fixture saw fold 0's subjects, which the subject protocol's fold 0 tests on.
    leaky = RunConfig(model="alnet+svm", image_size=136, features_from=str(mini_checkpoint)).validate()
    with pytest.raises(HybridError, match="test set"):
        train_run(leaky, prepared, tmp_path / "leaky", progress=False, log=lambda m: None)


@pytest.mark.slow
def test_a_hybrid_exports_to_one_onnx_graph_that_agrees_with_its_checkpoint(mini_prepared, tmp_path):
    import onnx

    from alnet.infer.export import export_onnx
    from alnet.infer.predict import load_pipeline
    from alnet.train.run import train_run
    from alnet.train.rundir import RunDir

    config = RunConfig(model="resnet50+pca+knn", pretrained=False, image_size=64, precision="32").validate()
    train_run(config, mini_prepared, tmp_path / "run", progress=False, log=lambda m: None)
    checkpoint = RunDir(tmp_path / "run").chosen_checkpoint("fold_0")
    exported = export_onnx(checkpoint, tmp_path / "hybrid.onnx")
    graph = onnx.load(str(exported))
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["probability_all", "features"]
    images = np.asarray(mini_prepared.images[:8])
    assert np.allclose(load_pipeline(exported).probabilities(images),
                       load_pipeline(checkpoint, precision="32").probabilities(images),
                       atol=1e-4)


def test_tune_refuses_a_hybrid_before_writing_anything(tmp_path):
    from alnet.train.tune import tune

    grid = tmp_path / "grid.yaml"
    grid.write_text("search:\n  lr: [1.0e-4, 1.0e-3]\nfixed: {}\n")
    with pytest.raises(ConfigError, match="hybrid"):
        tune(grid, None, tmp_path / "study", RunConfig(model="resnet50+svm"))
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_export_refuses_a_classifier_its_onnx_converter_would_change(tmp_path):
    from alnet.infer.export import export_onnx

    # skl2onnx converts distance-weighted k-NN as uniform votes: the graph would answer differently.
    path, _, _ = _fitted_checkpoint(tmp_path / "fitted.ckpt", classifier__weights="distance")
    with pytest.raises(ValueError, match="disagrees with the checkpoint"):
        export_onnx(path, tmp_path / "hybrid.onnx")
