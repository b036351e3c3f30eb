"""Re-testing: a finished run's chosen checkpoints on the same splits, or one checkpoint on a dataset (leaving
out the subjects it was trained or validated on, so a model is never scored on patients it has seen)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .. import metrics as M
from ..checkpoint import load_trained_model
from ..config import RunConfig
from ..data.cache import Prepared
from ..data.protocols import make_splits
from ..pipeline import Pipeline, answer_rows
from ..trust.image_check import ImageCheck
from .batches import tensors
from .results import fold_metrics, json_safe, prediction_rows, summarize_run
from .run import RunError
from .rundir import RunDir

SPLITS = ("prelim", "train", "all")


def checkpoint_pipeline(checkpoint: Path, image_check: ImageCheck | None, gate: bool) -> Pipeline:
    """The checkpoint's pipeline as `predict` builds it, on the precision and device the run was trained with.
    Without the gate (`gate` off) nothing is refused."""
    return Pipeline.from_trained(load_trained_model(checkpoint), image_check=image_check if gate else None,
                                 features=gate)


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
    images, _ = tensors(prepared)
    predictions, trust = {}, {}
    for split in splits:
        chosen = run.chosen_checkpoint(split.name)
        if chosen is None:
            raise RunError(f"{run}: fold {split.name} has not finished; finish it with `alnet train --resume {run}`")
        pipeline = checkpoint_pipeline(chosen, image_check, gate)
        trust[split.name] = {"calibration": pipeline.calibration, "review": pipeline.review}
        predictions[split.name] = prediction_rows(split.name, prepared.cells, split.test,
                                                  answer_rows(pipeline, images, split.test), config.model, chosen)
    return summarize_run(config, splits, predictions, world_size=1, trust=trust)


def evaluate_checkpoint(pipeline: Pipeline, prepared: Prepared, split: str = "auto", include_seen: bool = False,
                        log: Callable[[str], None] = print) -> dict:
    """Test one checkpoint (its pipeline: `checkpoint_pipeline`) on the labelled images of a dataset, leaving out
    the subjects it was trained on."""
    cells = prepared.cells
    labelled = [i for i, c in enumerate(cells) if c.label is not None]
    if split == "auto":
        split = "prelim" if any(cells[i].split == "prelim" for i in labelled) else "train"
    if split not in SPLITS:
        raise RunError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    rows = [i for i in labelled if split == "all" or cells[i].split == split]
    seen = set(pipeline.trained.seen_subjects)  # training + validation subjects
    if not include_seen:
        kept = [i for i in rows if cells[i].subject not in seen]
        if len(kept) < len(rows):
            log(f"left out {len(rows) - len(kept)} image(s) of {len({cells[i].subject for i in rows} & seen)} "
                "subject(s) this checkpoint was trained or validated on (--include-seen keeps them)")
        rows = kept
    if not rows:
        raise RunError(f"no labelled {split} images to evaluate on (after leaving out subjects seen in training)")
    images, _ = tensors(prepared)
    trust = {"calibration": pipeline.calibration, "review": pipeline.review}
    predictions = prediction_rows(split, cells, rows, answer_rows(pipeline, images, np.array(rows)),
                                  pipeline.model_name, pipeline.source)
    config = pipeline.trained.config
    entry = {"fold": split, "note": "subjects seen in training included" if include_seen else
             "subjects seen in training left out", **fold_metrics(predictions, trust, config.get("seed", 0))}
    return json_safe({"protocol": "evaluation", "model": pipeline.model_name, "note": entry["note"],
                      "folds": [entry], "summary": M.summarize([entry]), "world_size": 1})
