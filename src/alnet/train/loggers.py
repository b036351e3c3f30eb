"""Experiment logs through Lightning's loggers: a CSV log always, TensorBoard or MLflow on request.

Every training run logs one row per epoch (`epoch, train_loss, train_accuracy, val_loss, val_accuracy`) to each
logger; `history.csv` is built from the CSV log (`read_history`). Each start of a fold (a first start or a
resume) writes a new `version_<n>` folder, because Lightning's CSV logger replaces a metrics file it finds; the
history takes every version in order and keeps the latest row of each epoch, so a resumed fold's history equals
an uninterrupted one's.

TensorBoard and MLflow are optional extras (`pip install 'alnet[tensorboard]'`, `'alnet[mlflow]'`). MLflow
writes to a local SQLite store, `mlruns/mlflow.db` beside the run directories, unless `--mlflow-uri` names a
server or another store: MLflow 3 refuses its plain-file store unless told otherwise.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..schema import write_text

LOGGERS = ("csv", "tensorboard", "mlflow")
# logger → (module it needs, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
EPOCH_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
EXPERIMENT = "alnet"
MLFLOW_FOLDER = "mlruns"
MLFLOW_RUN_ID = "mlflow_run_id.txt"


@dataclass(frozen=True)
class Tracking:
    """Which experiment logger to add to the CSV log, and where MLflow writes."""

    logger: str = "csv"
    mlflow_uri: str | None = None  # None: sqlite:///<folder beside the runs>/mlruns/mlflow.db

    def check(self) -> "Tracking":
        """An unknown logger or a missing extra: a one-line ConfigError naming the install command."""
        if self.logger not in LOGGERS:
            raise ConfigError(f"unknown logger {self.logger!r}; use one of {', '.join(LOGGERS)}")
        if self.logger in EXTRAS:
            module, extra = EXTRAS[self.logger]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"--logger {self.logger} needs the {module} package: "
                                  f"pip install 'alnet[{extra}]'")
        if self.mlflow_uri is not None and self.logger != "mlflow":
            raise ConfigError("--mlflow-uri is used only with --logger mlflow")
        return self


def mlflow_uri(tracking: Tracking, beside: Path) -> str:
    """The tracking URI: the one given, else a SQLite store in `beside`/mlruns."""
    if tracking.mlflow_uri:
        return tracking.mlflow_uri
    folder = (Path(beside) / MLFLOW_FOLDER).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def make_loggers(tracking: Tracking, csv_folder: Path, tensorboard_folder: Path, mlflow_beside: Path,
                 run_name: str, params: dict) -> list:
    """The loggers of one training: the CSV log in `csv_folder`/version_<n>, plus the one asked for. `params`
    (flat settings) are logged as the run's hyperparameters."""
    from lightning.pytorch.loggers import CSVLogger

    _quiet()
    csv_folder = Path(csv_folder)
    loggers = [CSVLogger(save_dir=csv_folder.parent, name=csv_folder.name, version=None)]
    if tracking.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        tensorboard_folder = Path(tensorboard_folder)
        loggers.append(TensorBoardLogger(save_dir=tensorboard_folder.parent, name=tensorboard_folder.name,
                                         version=None, default_hp_metric=False))
    elif tracking.logger == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = mlflow_uri(tracking, mlflow_beside)
        run_id_file = csv_folder / MLFLOW_RUN_ID
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None  # a resumed fold continues
        artifacts = (Path(mlflow_beside) / MLFLOW_FOLDER / "artifacts").resolve().as_uri() \
            if uri.startswith("sqlite:") else None
        logger = MLFlowLogger(experiment_name=EXPERIMENT, run_name=run_name, tracking_uri=uri, run_id=run_id,
                              artifact_location=artifacts, tags={"alnet.run": run_name})
        loggers.append(logger)
        if isinstance(logger.run_id, str):  # None on DDP ranks other than 0, which log nothing
            csv_folder.mkdir(parents=True, exist_ok=True)
            write_text(run_id_file, logger.run_id + "\n")
    for logger in loggers:
        logger.log_hyperparams(params)
    return loggers


def log_epoch(loggers, row: dict) -> None:
    """One epoch's row to every logger, written out at once (before that epoch's checkpoint is saved)."""
    for logger in loggers:
        logger.log_metrics(row, step=row["epoch"])
        logger.save()


def _version_number(folder: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def read_history(csv_folder: Path) -> list[dict]:
    """The per-epoch rows of every CSV log version in `csv_folder`, the latest row of each epoch, by epoch."""
    by_epoch: dict[int, dict] = {}
    versions = sorted((p for p in Path(csv_folder).glob("version_*") if _version_number(p) >= 0), key=_version_number)
    for version in versions:
        metrics = version / "metrics.csv"
        if not metrics.is_file():
            continue
        with open(metrics, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("epoch") and row.get("train_loss"):
                    by_epoch[int(float(row["epoch"]))] = {k: row.get(k, "") for k in EPOCH_FIELDS}
    return [by_epoch[e] for e in sorted(by_epoch)]


def flat_params(config: dict, **extra) -> dict:
    """Settings as flat strings-or-numbers, as experiment trackers want them."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in {**config, **extra}.items()}


def _quiet() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
