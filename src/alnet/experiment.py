"""One run, one directory: splits → train each split → test predictions → metrics → figures.

    RUN_DIR/config.yaml        everything needed to rerun it (+ data.json: where the data and cache were)
    RUN_DIR/splits.json        images and subjects on each side of every split
    RUN_DIR/history.csv        per fold and epoch: train/val loss and accuracy
    RUN_DIR/predictions.csv    per test image: fold, path, subject, label, probability_all, predicted
    RUN_DIR/metrics.json       protocol, folds, summary (mean ± std over folds), prelim (when used)
    RUN_DIR/subjects.csv       per test subject: images, share called ALL, accuracy
    RUN_DIR/checkpoints/<fold>/{last,best}.ckpt,  RUN_DIR/figures/*.png

Only rank 0 writes; under DDP every rank runs this same function in lockstep.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from . import metrics as M
from .config import RunConfig
from .data.cnmc import Cell
from .data.preprocess import Prepared
from .data.protocols import Split, make_splits
from .engine import (CellClassifier, CellData, extract_features, quiet_lightning, resolve_precision,
                     threads_per_process, uses_cached_features, world)

HISTORY_FIELDS = ["fold", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
PREDICTION_FIELDS = ["fold", "path", "subject", "label", "probability_all", "predicted"]


class RunError(Exception):
    """The run cannot start or continue; the message says which file and what to do."""


def is_main_process() -> bool:
    return rank_zero_only.rank == 0


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def tensors(prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole cache in memory as one uint8 tensor, and the labels (-1 where unknown).

    A read-only memory map is read into memory on first use and kept on `prepared`, so the runs of a
    comparison or a search share one copy instead of reading the cache again each time."""
    if not prepared.images.flags.writeable:
        prepared.images = np.array(prepared.images)
    images = torch.from_numpy(prepared.images)
    labels = torch.tensor([c.label if c.label is not None else -1 for c in prepared.cells], dtype=torch.long)
    return images, labels


def make_trainer(config: RunConfig, callbacks: Sequence[Callback], root: Path, progress: bool, validate: bool):
    accelerator, precision, _ = resolve_precision(config)
    return L.Trainer(
        accelerator=accelerator, devices=config.devices, strategy=config.strategy, precision=precision,
        max_epochs=config.epochs, logger=False, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=config.deterministic, callbacks=list(callbacks), use_distributed_sampler=False,
        default_root_dir=root, enable_progress_bar=progress, limit_val_batches=1.0 if validate else 0,
        # Only the checkpoints a caller asks for: never Lightning's default folder in the working directory.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def build_module(config: RunConfig, seen_subjects: list[str]) -> CellClassifier:
    module = CellClassifier(asdict(config), seen_subjects=seen_subjects)
    module.use_channels_last()
    return module


def prediction_rows(split_name: str, cells: list[Cell], predictions: dict) -> list[dict]:
    return [
        {"fold": split_name, "path": str(cells[i].path), "subject": cells[i].subject, "label": int(label),
         "probability_all": f"{p:.6f}", "predicted": int(p > 0.5)}
        for i, p, label in zip(predictions["index"], predictions["prob_all"], predictions["label"])
    ]


def _split_summary(split: Split, cells: list[Cell]) -> dict:
    def side(rows):
        return {"images": int(len(rows)), "subjects": len({cells[i].subject for i in rows}),
                "all": int(sum(cells[i].label == 1 for i in rows)), "hem": int(sum(cells[i].label == 0 for i in rows))}

    return {"name": split.name, "note": split.note, "subject_disjoint": split.subject_disjoint,
            "train": side(split.train), "val": side(split.val), "test": side(split.test)}


def _train_split(config, split, images, labels, cells, run_dir, resume, callbacks, progress, log):
    fold_dir = run_dir / "folds" / split.name
    checkpoints = run_dir / "checkpoints" / split.name
    monitored = config.protocol == "subject" and len(split.val) > 0
    # `last.ckpt` after every epoch (for --resume); `best.ckpt` by validation loss (subject protocol only:
    # the paper protocol's validation set is its test set, so it keeps the last epoch, as the paper did).
    latest = ModelCheckpoint(dirpath=checkpoints, filename="last", monitor=None, save_top_k=1,
                             save_on_train_epoch_end=True, enable_version_counter=False)
    keep = [latest]
    if monitored:
        keep.append(ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val_loss", mode="min",
                                    save_top_k=1, save_on_train_epoch_end=True, enable_version_counter=False))
    trainer = make_trainer(config, [*keep, *callbacks], fold_dir, progress, validate=len(split.val) > 0)
    # Seed per split (not from whatever earlier folds left behind): a resumed run builds the same weights.
    L.seed_everything(zlib.crc32(f"{config.seed}:{split.name}".encode()), verbose=False)
    # Subjects used for training or for choosing the checkpoint: `evaluate` leaves them out later.
    module = build_module(config, sorted({cells[i].subject for i in np.r_[split.train, split.val]}))
    inputs = images
    if uses_cached_features(module):
        # Frozen backbone, no augmentation: every epoch would see the same features, so compute them once and
        # train the head on them (this is what makes the paper's 1,600-epoch baselines cheap).
        needed = np.unique(np.r_[split.train, split.val, split.test])
        log(f"{split.name}: computing {config.model} features once for {len(needed)} images")
        inputs = extract_features(module, images, needed)
        module.on_features = True
    data = CellData(inputs, labels, split.train, split.val, split.test, config)
    last = checkpoints / "last.ckpt"
    resume_from = str(last) if resume and last.is_file() else None
    if resume_from:
        log(f"{split.name}: resuming from {last}")
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    history = list(module.history)  # testing below loads the chosen checkpoint, history included
    chosen = keep[-1].best_model_path or str(last)
    trainer.test(module, datamodule=data, ckpt_path=chosen, verbose=False)
    rows = prediction_rows(split.name, cells, module.test_predictions)
    if is_main_process():
        fold_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(fold_dir / "history.csv", [{"fold": split.name, **h} for h in history], HISTORY_FIELDS)
        (fold_dir / "checkpoint.txt").write_text(Path(chosen).name + "\n")
        _write_csv(fold_dir / "predictions.csv", rows, PREDICTION_FIELDS)  # written last: marks the fold done
    return rows, [{"fold": split.name, **h} for h in history]


def fold_metrics(rows: list[dict]) -> dict:
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["probability_all"]) for r in rows])
    return M.evaluate(labels, probs)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def summarize_run(config: RunConfig, splits: list[Split], predictions: dict[str, list[dict]], world_size: int):
    folds = []
    prelim = None
    for split in splits:
        entry = {"fold": split.name, "note": split.note, **fold_metrics(predictions[split.name])}
        if split.name == "prelim":
            prelim = entry
        else:
            folds.append(entry)
    result = {"protocol": config.protocol, "model": config.model, "note": splits[0].note, "folds": folds,
              "summary": M.summarize(folds), "world_size": world_size}
    if prelim is not None:
        result["prelim"] = prelim
    return _json_safe(result)


def train_run(
    config: RunConfig,
    prepared: Prepared,
    run_dir: Path | str,
    data_root: Path | str | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train and test every split of the configured protocol; returns metrics.json's content."""
    quiet_lightning()
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunError(f"{run_dir}: no config.yaml, so nothing to resume; start a new run with --out")
        config = RunConfig.from_yaml(run_dir / "config.yaml")
    elif is_main_process() and (run_dir / "config.yaml").exists():  # DDP ranks > 0 start after rank 0 wrote it
        raise RunError(f"{run_dir}: a run already lives here; continue it with --resume {run_dir} or pick another "
                       "--out")
    config.validate()
    if config.devices > 1:
        torch.set_num_threads(threads_per_process(config.devices))
    L.seed_everything(config.seed, workers=True, verbose=False)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic or was_deterministic)
    try:
        return _train_splits(config, prepared, run_dir, data_root, resume, callbacks, progress, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train_splits(config, prepared, run_dir, data_root, resume, callbacks, progress, log) -> dict:
    cells = prepared.cells
    splits = make_splits(config.protocol, cells, config.seed, config.val_fraction)
    if is_main_process() and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_dir / "config.yaml")
        (run_dir / "data.json").write_text(json.dumps(
            {"cache": str(prepared.path), "images": len(cells), "skipped": [str(p) for p in prepared.skipped],
             "root": str(Path(data_root).resolve()) if data_root else None}, indent=2))
        (run_dir / "splits.json").write_text(json.dumps([_split_summary(s, cells) for s in splits], indent=2))
    images, labels = tensors(prepared)
    predictions: dict[str, list[dict]] = {}
    history: list[dict] = []
    world_size = 1
    for split in splits:
        done = run_dir / "folds" / split.name / "predictions.csv"
        if resume and done.is_file():
            log(f"{split.name}: already finished, kept")
            predictions[split.name] = _read_csv(done)
            history += _read_csv(done.parent / "history.csv")
            continue
        log(f"{split.name}: training on {len(split.train)} images, validating on {len(split.val)}, "
            f"testing on {len(split.test)} ({split.note})")
        predictions[split.name], fold_history = _train_split(config, split, images, labels, cells, run_dir, resume,
                                                             callbacks, progress, log)
        history += fold_history
        world_size = max(world_size, world()[1])
    result = summarize_run(config, splits, predictions, world_size)
    if is_main_process():
        write_outputs(run_dir, result, predictions, history, config)
    return result


def write_outputs(run_dir: Path, result: dict, predictions: dict[str, list[dict]], history: list[dict],
                  config: RunConfig) -> None:
    from .report.figures import write_run_figures
    from .report.html import write_run_report

    all_rows = [r for rows in predictions.values() for r in rows]
    _write_csv(run_dir / "predictions.csv", all_rows, PREDICTION_FIELDS)
    _write_csv(run_dir / "history.csv", history, HISTORY_FIELDS)
    subject_rows = []
    for fold, rows in predictions.items():
        for row in M.per_subject([r["subject"] for r in rows], [int(r["label"]) for r in rows],
                                 [float(r["probability_all"]) for r in rows]):
            subject_rows.append({"fold": fold, **row})
    _write_csv(run_dir / "subjects.csv", subject_rows,
               ["fold", "subject", "label", "images", "mean_probability_all", "fraction_called_all", "accuracy"])
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    write_run_figures(run_dir / "figures", predictions, history)
    write_run_report(run_dir, result, asdict(config))


# --- evaluation of finished runs and single checkpoints -------------------------------------------------------

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


def chosen_checkpoint(run_dir: Path, fold: str) -> Path | None:
    """The checkpoint a finished fold was tested with (folds/<fold>/checkpoint.txt), None if unfinished."""
    record = Path(run_dir) / "folds" / fold / "checkpoint.txt"
    return Path(run_dir) / "checkpoints" / fold / record.read_text().strip() if record.is_file() else None


def evaluate_run(run_dir: Path, prepared: Prepared) -> dict:
    """Re-test each fold's chosen checkpoint of a finished run on the same splits."""
    from .engine import load_module

    run_dir = Path(run_dir)
    config = RunConfig.from_yaml(run_dir / "config.yaml")
    recorded = json.loads((run_dir / "data.json").read_text()).get("images")
    if recorded is not None and recorded != len(prepared.cells):
        raise RunError(f"{run_dir}: the run used {recorded} images, this dataset has {len(prepared.cells)}; "
                       "evaluate on the dataset the run was trained on")
    splits = make_splits(config.protocol, prepared.cells, config.seed, config.val_fraction)
    images, labels = tensors(prepared)
    predictions = {}
    for split in splits:
        chosen = chosen_checkpoint(run_dir, split.name)
        if chosen is None:
            raise RunError(f"{run_dir}: fold {split.name} has not finished; finish it with "
                           f"`alnet train --resume {run_dir}`")
        module = load_module(chosen)
        predictions[split.name] = prediction_rows(split.name, prepared.cells,
                                                  test_rows(module, images, labels, split.test))
    return summarize_run(config, splits, predictions, world_size=1)


def evaluate_checkpoint(module: CellClassifier, prepared: Prepared, split: str = "auto", include_seen: bool = False,
                        log: Callable[[str], None] = print) -> dict:
    """Test one checkpoint on the labelled images of a dataset, leaving out the subjects it was trained on."""
    cells = prepared.cells
    labelled = [i for i, c in enumerate(cells) if c.label is not None]
    if split == "auto":
        split = "prelim" if any(cells[i].split == "prelim" for i in labelled) else "train"
    if split not in ("prelim", "train", "all"):
        raise RunError(f"unknown split {split!r}: use prelim, train or all")
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
    predictions = prediction_rows(split, cells, test_rows(module, images, labels, np.array(rows)))
    entry = {"fold": split, "note": "subjects seen in training included" if include_seen else
             "subjects seen in training left out", **fold_metrics(predictions)}
    return _json_safe({"protocol": "evaluation", "model": module.config.model, "note": entry["note"],
                       "folds": [entry], "summary": M.summarize([entry]), "world_size": 1})
