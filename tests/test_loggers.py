import csv
import importlib.util

import pytest
import yaml
from typer.testing import CliRunner

from alnet.cli import app
from alnet.config import ConfigError, RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing
from alnet.train.loggers import Tracking, read_history
from alnet.train.run import train_run

TINY = dict(protocol="paper", epochs=2, image_size=136, batch_size=8, bn_momentum=0.5, augment=False, seed=3,
            precision="32")


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory):
    return prepare(scan(synthetic_root).cells, tmp_path_factory.mktemp("cache"), Preprocessing(size=136))


def _history(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_history_rows_come_from_the_latest_csv_log_version_of_each_epoch(tmp_path):
    for version, rows in ((0, [(1, "0.9"), (2, "0.8")]), (1, [(2, "0.7"), (3, "0.6")])):
        folder = tmp_path / f"version_{version}"
        folder.mkdir()
        with open(folder / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["epoch", "step", "train_accuracy", "train_loss", "val_accuracy",
                                             "val_loss"])
            writer.writeheader()
            writer.writerows({"epoch": e, "step": e, "train_loss": loss, "train_accuracy": "0.5",
                              "val_loss": "nan", "val_accuracy": "nan"} for e, loss in rows)
    history = read_history(tmp_path)
    assert [(h["epoch"], h["train_loss"]) for h in history] == [("1", "0.9"), ("2", "0.7"), ("3", "0.6")]


def test_an_unknown_logger_or_a_missing_extra_is_a_one_line_error_naming_the_install(monkeypatch):
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        Tracking("wandb").check()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "mlflow")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'alnet\[tensorboard\]'"):
        Tracking("tensorboard").check()
    with pytest.raises(ConfigError, match=r"pip install 'alnet\[mlflow\]'"):
        Tracking("mlflow").check()


def test_cli_refuses_a_missing_logger_extra_before_reading_any_data(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nowhere"), "--logger", "mlflow"])
    assert result.exit_code == 2
    assert "pip install 'alnet[mlflow]'" in result.output


@pytest.mark.slow
def test_history_csv_is_the_csv_log_and_tensorboard_gets_per_epoch_metrics_and_parameters(prepared, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is missing: pip install 'alnet[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train_run(RunConfig(**TINY), prepared, run, progress=False, log=lambda m: None,
              tracking=Tracking("tensorboard"))
    history = _history(run / "history.csv")
    assert [h["fold"] for h in history] == ["fold_0", "fold_0", "fold_1", "fold_1", "fold_2", "fold_2"]
    logged = read_history(run / "logs" / "fold_1")
    assert [{k: h[k] for k in logged[0]} for h in history if h["fold"] == "fold_1"] == logged
    assert (run / "logs" / "fold_1" / "version_0" / "metrics.csv").is_file()

    events = list((run / "tensorboard" / "fold_0").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    for tag in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [e.step for e in accumulator.Scalars(tag)] == [1, 2], tag
    first = [h for h in history if h["fold"] == "fold_0"][0]
    assert accumulator.Scalars("train_loss")[0].value == pytest.approx(float(first["train_loss"]), rel=1e-6)
    params = yaml.safe_load((events[0].parent / "hparams.yaml").read_text())
    assert params["lr"] == 1e-4 and params["epochs"] == 2 and params["fold"] == "fold_0"


@pytest.mark.slow
def test_mlflow_logger_records_a_run_per_fold_with_epoch_metrics_and_parameters(prepared, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'alnet[mlflow]'")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "runs" / "tiny"
    train_run(RunConfig(**TINY), prepared, run, progress=False, log=lambda m: None, tracking=Tracking("mlflow"))
    store = tmp_path / "runs" / "mlruns" / "mlflow.db"
    assert store.is_file(), "the local store lies beside the run directories"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("alnet")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny/fold_0", "tiny/fold_1", "tiny/fold_2"}
    fold = runs["tiny/fold_2"]
    assert fold.data.params["lr"] == "0.0001" and fold.data.params["model"] == "alnet"
    assert fold.data.params["fold"] == "fold_2" and fold.info.status == "FINISHED"
    history = [h for h in _history(run / "history.csv") if h["fold"] == "fold_2"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        logged = client.get_metric_history(fold.info.run_id, key)
        assert [m.step for m in logged] == [1, 2], key
        assert [m.value for m in logged] == pytest.approx([float(h[key]) for h in history], rel=1e-6)
