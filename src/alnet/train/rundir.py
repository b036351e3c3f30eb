"""The layout of a run directory and of a comparison, in one place: no other module spells these file names.

    RUN/config.yaml          everything needed to rerun it
    RUN/data.json            where the data and the cache were, images used and skipped
    RUN/splits.json          images and subjects on each side of every split
    RUN/history.csv          per fold and epoch: train/val loss and accuracy
    RUN/predictions.csv      per test image (columns: alnet.schema.PREDICTIONS)
    RUN/subjects.csv         per test set and subject (columns: alnet.schema.SUBJECTS)
    RUN/metrics.json         protocol, folds, summary (mean ± std over folds), prelim (when used)
    RUN/report.html          one self-contained page; RUN/figures/*.png
    RUN/model_card.md        intended use, data, results, limitations (the CLAIM checklist's items)
    RUN/evaluation.json      written by `alnet evaluate RUN`
    RUN/checkpoints/<fold>/{last,best}.ckpt
    RUN/logs/<fold>/version_<n>/metrics.csv   the CSV log (one version per start); history.csv comes from it
    RUN/tensorboard/<fold>/version_<n>/       with --logger tensorboard (MLflow: ../mlruns/ beside the runs)
    RUN/folds/<fold>/{history.csv, predictions.csv, checkpoint.txt, trust.json}   a fold's results as it finishes
    RUN/folds/<fold>/synthetic.json   with --synthetic: the generated cells of its training side, their GAN
    RUN/checkpoints/<fold>/fitted.ckpt, RUN/folds/<fold>/classifier.json   hybrids: the fitted model, its choice

    COMPARISON/<model>/      one run directory per model (+ timing.json)
    COMPARISON/comparison.{csv,md}, COMPARISON/report.html
    COMPARISON/<model>-with-generated/, COMPARISON/generated.json   with --synthetic: the same model with generated
                             cells, and the paired difference (subject-bootstrap intervals)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..schema import write_text

FINAL_MODEL_FOLDS = ("prelim", "fold_0")  # the model a run stands for: trained on all folds, else the first


BEST_YAML_HEADER = "# written by `alnet tune`: the best point of its search, a configuration for `alnet train`"
# How the files alnet writes into a comparison or search folder begin: a file of that name that begins otherwise is
# someone else's, and is never replaced.
OWN_BEGINNINGS = {
    "comparison.csv": ("model,trainable_parameters,",),
    "comparison.md": ("# Model comparison (",),
    "report.html": ('<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
                    'content="width=device-width,initial-scale=1"><title>',),
    "trials.csv": ("trial,",),
    "best.yaml": (BEST_YAML_HEADER,),
    "generated.json": ('{\n  "gan_dir": ',),
}


def foreign_files(folder: Path) -> list[Path]:
    """The files in `folder` named as alnet's outputs there (OWN_BEGINNINGS) that alnet did not write."""
    found = []
    for name, beginnings in OWN_BEGINNINGS.items():
        path = folder / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            found.append(path)
        elif path.is_file():
            try:
                with open(path, encoding="utf-8") as handle:
                    start = handle.read(256)
            except (OSError, UnicodeDecodeError):
                start = ""
            if not start.startswith(beginnings):
                found.append(path)
    return found


def default_run_dir(protocol: str) -> Path:
    """runs/<protocol>-<time>. DDP relaunches the command in more processes: they inherit the name chosen here."""
    default = Path("runs") / f"{protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(os.environ.setdefault("ALNET_RUN_DIR", str(default)))


class RunDir:
    """One run's folder. Paths are properties; reading and writing the small files goes through here."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    config = property(lambda self: self.path / "config.yaml")
    data = property(lambda self: self.path / "data.json")
    splits = property(lambda self: self.path / "splits.json")
    history = property(lambda self: self.path / "history.csv")
    predictions = property(lambda self: self.path / "predictions.csv")
    subjects = property(lambda self: self.path / "subjects.csv")
    metrics = property(lambda self: self.path / "metrics.json")
    report = property(lambda self: self.path / "report.html")
    model_card = property(lambda self: self.path / "model_card.md")
    evaluation = property(lambda self: self.path / "evaluation.json")
    timing = property(lambda self: self.path / "timing.json")
    figures = property(lambda self: self.path / "figures")
    logs = property(lambda self: self.path / "logs")
    tensorboard = property(lambda self: self.path / "tensorboard")

    def exists(self) -> bool:
        """A run lives here (its configuration was written)."""
        return self.config.is_file()

    def finished(self) -> bool:
        return self.metrics.is_file()

    # one fold --------------------------------------------------------------------------------------------------
    def fold(self, name: str) -> Path:
        return self.path / "folds" / name

    def fold_history(self, name: str) -> Path:
        return self.fold(name) / "history.csv"

    def fold_predictions(self, name: str) -> Path:
        """Written last when a fold finishes: its presence marks the fold done."""
        return self.fold(name) / "predictions.csv"

    def fold_log(self, name: str) -> Path:
        """The fold's CSV log folder (one version_<n> per start of the fold)."""
        return self.logs / name

    def fold_trust(self, name: str) -> Path:
        """The split's calibration and review band, fitted on its validation subjects (also in its checkpoint)."""
        return self.fold(name) / "trust.json"

    def fold_synthetic(self, name: str) -> Path:
        """With --synthetic: the generated cells that joined the split's training side, and their GAN."""
        return self.fold(name) / "synthetic.json"

    def checkpoints(self, name: str) -> Path:
        return self.path / "checkpoints" / name

    def last_checkpoint(self, name: str) -> Path:
        return self.checkpoints(name) / "last.ckpt"

    def fitted_checkpoint(self, name: str) -> Path:
        """A hybrid's fitted model (backbone weights + classifier)."""
        return self.checkpoints(name) / "fitted.ckpt"

    def fold_classifier(self, name: str) -> Path:
        """A hybrid fold's chosen hyper-parameters, how they were chosen and the seconds it took."""
        return self.fold(name) / "classifier.json"

    def record_chosen(self, name: str, checkpoint: Path | str) -> None:
        """Remember which checkpoint a fold was tested with (folds/<fold>/checkpoint.txt)."""
        self.fold(name).mkdir(parents=True, exist_ok=True)
        write_text(self.fold(name) / "checkpoint.txt", Path(checkpoint).name + "\n")

    def chosen_checkpoint(self, name: str) -> Path | None:
        """The checkpoint a finished fold was tested with; None while the fold is unfinished. The record holds a
        file name in the fold's checkpoint folder, never a path, so a run directory from elsewhere cannot send a
        command (`quantize` rewrites the checkpoint) to a file outside it; anything else is a ValueError."""
        record = self.fold(name) / "checkpoint.txt"
        if not record.is_file():
            return None
        altered = f"{record}: {{}}; this run directory was altered: pass its checkpoint (.ckpt) itself"
        if record.is_symlink():  # alnet writes a file; a link's target is never quoted back
            raise ValueError(altered.format("a link, not the record alnet writes"))
        with open(record, encoding="utf-8-sig", errors="replace") as handle:
            chosen = handle.read(256).strip()
        if not chosen or chosen in (".", "..") or any(c in chosen for c in "/\\\0\n"):
            raise ValueError(altered.format(f"does not name a file of {self.checkpoints(name)}"))
        return self.checkpoints(name) / chosen

    def final_checkpoint(self) -> Path | None:
        """The checkpoint that stands for the whole run: the final model (prelim), else fold 0's."""
        for name in FINAL_MODEL_FOLDS:
            chosen = self.chosen_checkpoint(name)
            if chosen is not None:
                return chosen
        return None

    def data_root(self) -> Path | None:
        """The data root the run was trained on (data.json), None when not recorded (or not as alnet writes it)."""
        data = self.read_json(self.data) if self.data.is_file() else None
        root = data.get("root") if isinstance(data, dict) else None
        return Path(root) if isinstance(root, str) and root else None

    # small files -----------------------------------------------------------------------------------------------
    def read_json(self, path: Path) -> dict | list:
        return json.loads(path.read_text())

    def write_json(self, path: Path, value) -> None:
        write_text(path, json.dumps(value, indent=2))


class ComparisonDir:
    """A comparison's folder: one run directory per model, and the tables over them."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def run(self, model: str) -> RunDir:
        return RunDir(self.path / model)

    csv = property(lambda self: self.path / "comparison.csv")
    generated = property(lambda self: self.path / "generated.json")  # with --synthetic: with minus without
    markdown = property(lambda self: self.path / "comparison.md")
    report = property(lambda self: self.path / "report.html")
