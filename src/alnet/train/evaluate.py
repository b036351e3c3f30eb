"""Re-testing: a finished run's chosen checkpoints on the same splits, or one checkpoint on a dataset (leaving
out the subjects it was trained or validated on, so a model is never scored on patients it has seen)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import metrics as M
from ..config import RunConfig
from ..data.cache import Prepared
from ..data.protocols import make_splits
from ..trust.gate import ImageCheck
from ..trust.screen import InputGate, screen_rows
from .batches import CellData, tensors
from .module import CellClassifier, module_from_checkpoint
from .results import fold_metrics, json_safe, prediction_rows, summarize_run
from .run import RunError
from .rundir import RunDir
from .trainer import make_trainer, quiet_lightning

SPLITS = ("prelim", "train", "all")


def test_rows(module: CellClassifier, images: torch.Tensor, labels: torch.Tensor, rows: np.ndarray) -> dict:
    """P(ALL) for `rows` with a trained module (one process, the configured precision)."""
    quiet_lightning()
    config = module.config
    module.use_channels_last()
    single = RunConfig(**{**asdict(config), "devices": 1, "strategy": "auto"})
    trainer = make_trainer(single, [], Path.cwd(), progress=False, validate=False)
    empty = np.array([], dtype=np.int64)
    trainer.test(module, dataloaders=CellData(images, labels, empty, empty, rows, single).test_dataloader(),
                 verbose=False)
    return module.test_predictions


def screen(module: CellClassifier, images: torch.Tensor, rows: np.ndarray, image_check: ImageCheck | None,
           gate: bool = True) -> list[str | None] | None:
    """The input gate's reason per row (None: accepted), as `predict` would refuse them; None without a gate."""
    if not gate:
        return None
    features = getattr(module, "input_gate", None)
    return screen_rows(InputGate(image_check, features), module.model, images, rows)


def evaluate_run(run_dir: Path | str, prepared: Prepared, image_check: ImageCheck | None = ImageCheck(),
                 gate: bool = True) -> dict:
    """Re-test each fold's chosen checkpoint of a finished run on the same splits."""
    run = RunDir(run_dir)
    config = RunConfig.from_yaml(run.config)
    recorded = run.read_json(run.data).get("images")
    if recorded is not None and recorded != len(prepared.cells):
        raise RunError(f"{run}: the run used {recorded} images, this dataset has {len(prepared.cells)}; "
                       "evaluate on the dataset the run was trained on")
    splits = make_splits(config.protocol, prepared.cells, config.seed, config.val_fraction)
    images, labels = tensors(prepared)
    predictions, trust = {}, {}
    for split in splits:
        chosen = run.chosen_checkpoint(split.name)
        if chosen is None:
            raise RunError(f"{run}: fold {split.name} has not finished; finish it with `alnet train --resume {run}`")
        module = module_from_checkpoint(chosen)
        trust[split.name] = module.trust  # the calibration and review band stored in the checkpoint
        tested = test_rows(module, images, labels, split.test)
        predictions[split.name] = prediction_rows(split.name, prepared.cells, tested, module.trust,
                                                  screen(module, images, tested["index"], image_check, gate))
    return summarize_run(config, splits, predictions, world_size=1, trust=trust)


def evaluate_checkpoint(module: CellClassifier, prepared: Prepared, split: str = "auto", include_seen: bool = False,
                        log: Callable[[str], None] = print, image_check: ImageCheck | None = ImageCheck(),
                        gate: bool = True) -> dict:
    """Test one checkpoint on the labelled images of a dataset, leaving out the subjects it was trained on."""
    cells = prepared.cells
    labelled = [i for i, c in enumerate(cells) if c.label is not None]
    if split == "auto":
        split = "prelim" if any(cells[i].split == "prelim" for i in labelled) else "train"
    if split not in SPLITS:
        raise RunError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    rows = [i for i in labelled if split == "all" or cells[i].split == split]
    seen = set(module.hparams.get("seen_subjects") or [])  # training + validation subjects
    if not include_seen:
        kept = [i for i in rows if cells[i].subject not in seen]
        if len(kept) < len(rows):
            log(f"left out {len(rows) - len(kept)} image(s) of {len({cells[i].subject for i in rows} & seen)} "
                "subject(s) this checkpoint was trained or validated on (--include-seen keeps them)")
        rows = kept
    if not rows:
        raise RunError(f"no labelled {split} images to evaluate on (after leaving out subjects seen in training)")
    images, labels = tensors(prepared)
    trust = getattr(module, "trust", None)  # the checkpoint's calibration and review band
    tested = test_rows(module, images, labels, np.array(rows))
    predictions = prediction_rows(split, cells, tested, trust,
                                  screen(module, images, tested["index"], image_check, gate))
    entry = {"fold": split, "note": "subjects seen in training included" if include_seen else
             "subjects seen in training left out", **fold_metrics(predictions, trust, module.config.seed)}
    return json_safe({"protocol": "evaluation", "model": module.config.model, "note": entry["note"],
                      "folds": [entry], "summary": M.summarize([entry]), "world_size": 1})
