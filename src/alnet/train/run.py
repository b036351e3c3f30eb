"""One run: splits → train each split → test predictions → metrics → figures and report, in one directory
(the layout is `rundir.py`'s). Only rank 0 writes; under DDP every rank runs this same code in lockstep.

A fold's results are written as it finishes, so a killed run continues with `--resume` where it stopped: finished
folds are kept, an unfinished one continues from its last checkpoint, and the result equals an uninterrupted run.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..checkpoint import CheckpointError, model_weights, read_checkpoint
from ..config import RunConfig
from ..data.cache import Prepared
from ..data.cnmc import Cell
from ..data.protocols import Split, make_splits
from ..device import resolve_precision, threads_per_process
from ..fitting import fit_after_training
from ..gan.mixing import gan_for_split, generated_count, mix
from ..memory import keep_freed_memory
from ..models import WeightsError, create_model_from, model_spec
from ..pipeline import answer_rows
from ..schema import HISTORY_FIELDS, PREDICTION_FIELDS, SUBJECT_FIELDS, read_csv, read_predictions, write_csv
from ..trust.subjects import subject_rows
from .batches import CellData, tensors, world
from .classical import check_config as check_hybrid
from .loggers import Tracking, flat_params, make_loggers, read_history
from .module import build_module
from .results import prediction_rows, summarize_run
from .rundir import RunDir
from .trainer import is_main_process, make_trainer, quiet_lightning


class RunError(Exception):
    """The run cannot start or continue; the message says which file and what to do."""


@dataclass
class Job:
    """What every split of one run shares."""

    config: RunConfig
    cells: list[Cell]
    images: torch.Tensor  # the uint8 cache, N×H×W×3
    labels: torch.Tensor
    run: RunDir
    resume: bool
    callbacks: Sequence[Callback]
    progress: bool
    log: Callable[[str], None]
    tracking: Tracking


def _split_summary(split: Split, cells: list[Cell]) -> dict:
    def side(rows):
        return {"images": int(len(rows)), "subjects": len({cells[i].subject for i in rows}),
                "all": int(sum(cells[i].label == 1 for i in rows)), "hem": int(sum(cells[i].label == 0 for i in rows))}

    return {"name": split.name, "note": split.note, "subject_disjoint": split.subject_disjoint,
            "train": side(split.train), "val": side(split.val), "test": side(split.test)}


def _train_split(job: Job, split: Split) -> tuple[list[dict], list[dict], dict]:
    """Train one split, then the end-of-training stage (`alnet.fitting`) on its chosen checkpoint and the test
    pass; returns (prediction rows, history rows, what was fitted on the validation subjects)."""
    config, run = job.config, job.run
    if model_spec(config.model).hybrid:  # fitted on frozen features, not trained by Lightning
        from .classical import fit_and_write

        return fit_and_write(job, split)
    checkpoints = run.checkpoints(split.name)
    # `last.ckpt` after every epoch (for --resume); `best.ckpt` by validation loss (subject protocol only:
    # the paper protocol's validation set is its test set, so it keeps the last epoch, as the paper did).
    latest = ModelCheckpoint(dirpath=checkpoints, filename="last", monitor=None, save_top_k=1,
                             save_on_train_epoch_end=True, enable_version_counter=False)
    keep = [latest]
    if config.protocol == "subject" and len(split.val) > 0:
        keep.append(ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val_loss", mode="min",
                                    save_top_k=1, save_on_train_epoch_end=True, enable_version_counter=False))
    loggers = make_loggers(job.tracking, run.fold_log(split.name), run.tensorboard / split.name, run.path.parent,
                           f"{run.path.name}/{split.name}", flat_params(asdict(config), fold=split.name))
    trainer = make_trainer(config, [*keep, *job.callbacks], run.fold(split.name), job.progress,
                           validate=len(split.val) > 0, loggers=loggers)
    # Seed per split (not from whatever earlier folds left behind): a resumed run builds the same weights.
    L.seed_everything(zlib.crc32(f"{config.seed}:{split.name}".encode()), verbose=False)
    # Subjects used for training or for choosing the checkpoint: `evaluate` leaves them out later.
    module = build_module(config, sorted({job.cells[i].subject for i in np.r_[split.train, split.val]}))
    inputs, labels, train_rows = job.images, job.labels, split.train
    if config.synthetic:  # generated cells join the training rows only (alnet.gan.mixing)
        mixed = mix(gan_for_split(config.synthetic, split, job.cells, config), split, job.images, job.labels,
                    config.synthetic_ratio, zlib.crc32(f"{config.seed}:{split.name}:generated".encode()),
                    config.image_size)
        inputs, labels, train_rows = mixed.images, mixed.labels, mixed.train
        job.log(f"{split.name}: {mixed.record['generated']} generated cells (GAN {mixed.record['gan_id']}) join "
                f"{len(split.train)} real training cells")
        if is_main_process():
            run.fold(split.name).mkdir(parents=True, exist_ok=True)
            run.write_json(run.fold_synthetic(split.name), mixed.record)
    if module.uses_cached_features:
        # Frozen backbone, no augmentation: every epoch would see the same features, so compute them once and
        # train the head on them (this is what makes the paper's 1,600-epoch baselines cheap).
        needed = np.unique(np.r_[train_rows, split.val])  # the test pass answers from the images
        job.log(f"{split.name}: computing {config.model} features once for {len(needed)} images")
        inputs = module.extract_features(inputs, needed)
        module.on_features = True
    data = CellData(inputs, labels, train_rows, split.val, split.test, config)
    last = run.last_checkpoint(split.name)
    resume_from = str(last) if job.resume and last.is_file() else None
    if resume_from:
        try:
            read_checkpoint(last)  # a truncated or foreign file: a message, not Lightning's traceback
        except CheckpointError as err:
            raise RunError(f"{err}; to restart fold {split.name} from its first epoch, delete {last}") from None
        job.log(f"{split.name}: resuming from {last}")
    # Checkpoints are read as tensors and plain containers only (docs/design.md, "The run directory").
    trainer.fit(module, datamodule=data, ckpt_path=resume_from, weights_only=True)
    history = [{"fold": split.name, **h} for h in read_history(run.fold_log(split.name))]  # from the CSV log
    # The best checkpoint as a name in this run's folder: a resumed copy of a run must not test the original's.
    best = keep[-1].best_model_path
    chosen = checkpoints / Path(best).name if best else last
    try:
        module.model.load_state_dict(model_weights(read_checkpoint(chosen)))  # the chosen epoch's weights
    except CheckpointError as err:
        raise RunError(f"{err}; to retrain fold {split.name}, delete {checkpoints}") from None
    # Calibration, review band, input gate and int8 ranges: from the split's real rows of the real cache only.
    fitted = fit_after_training(module.model, job.images, job.cells, split, config, module.precision_path,
                                cached=inputs if module.on_features else None, int8=is_main_process())
    # The test cells are answered by the pipeline `alnet predict` uses, with what was just fitted.
    answers = answer_rows(fitted.pipeline(module.model, config, module.precision_path, chosen), job.images,
                          split.test)
    rows = prediction_rows(split.name, job.cells, split.test, answers, config.model, chosen)
    if is_main_process():
        run.fold(split.name).mkdir(parents=True, exist_ok=True)
        write_csv(run.fold_history(split.name), history, HISTORY_FIELDS)
        fitted.store(chosen)  # what predict, serve and export use beside the weights
        run.write_json(run.fold_trust(split.name), fitted.trust)
        run.record_chosen(split.name, chosen)
        write_csv(run.fold_predictions(split.name), rows, PREDICTION_FIELDS)  # written last: marks the fold done
    return rows, history, fitted.trust


def train_run(
    config: RunConfig,
    prepared: Prepared,
    run_dir: Path | str,
    data_root: Path | str | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
    tracking: Tracking | None = None,
) -> dict:
    """Train and test every split of the configured protocol; returns metrics.json's content. With `resume`, the
    run's config.yaml decides what is computed and `config` only its RUNTIME_SETTINGS. `tracking`: the
    experiment logger beside the CSV log (default: the CSV log only)."""
    quiet_lightning()
    run = RunDir(run_dir)
    if resume:
        if not run.exists():
            raise RunError(f"{run}: no config.yaml, so nothing to resume; start a new run with --out")
        # What the run computes comes from its config.yaml; where and how fast it runs, from the caller.
        config = replace(RunConfig.from_yaml(run.config), **{key: getattr(config, key) for key in RUNTIME_SETTINGS})
    elif is_main_process() and run.exists():  # DDP ranks > 0 start after rank 0 wrote it
        raise RunError(f"{run}: a run already lives here; continue it with --resume {run} or pick another --out")
    elif is_main_process() and run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
        raise RunError(f"{run}: exists and is not an empty folder; pick a new or empty folder for --out")
    config.validate()
    tracking = (tracking or Tracking()).check()
    check_devices(config)
    if not resume:
        try:  # what only the model can judge (an input too small for ALNet, missing ImageNet weights), before
            create_model_from(config)  # anything is written: a failed start leaves no folder that blocks --out
            check_hybrid(config)
        except (ValueError, WeightsError) as err:
            raise RunError(f"{err}; nothing was written to {run}") from None
    keep_freed_memory()  # alnet.memory: each step reuses the last one's activation maps
    if config.devices > 1:
        torch.set_num_threads(threads_per_process(config.devices))
    L.seed_everything(config.seed, workers=True, verbose=False)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic or was_deterministic)
    try:
        images, labels = tensors(prepared)
        job = Job(config, prepared.cells, images, labels, run, resume, callbacks, progress, log, tracking)
        return _train_splits(job, prepared, data_root)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train_splits(job: Job, prepared: Prepared, data_root: Path | str | None) -> dict:
    config, run, cells = job.config, job.run, job.cells
    splits = make_splits(config.protocol, cells, config.seed, config.val_fraction)
    if config.synthetic:  # every split's GAN is checked before anything is written or trained
        check_gans(config, splits, cells, run if job.resume else None)
    if job.resume:
        _check_same_start(run, prepared, config)
    if is_main_process() and not job.resume:
        run.path.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run.config)
        run.write_json(run.data, {"cache": str(prepared.path), "images": len(cells),
                                  "skipped": [str(p) for p in prepared.skipped],
                                  "root": str(Path(data_root).resolve()) if data_root else None,
                                  "config": asdict(config)})
        run.write_json(run.splits, [_split_summary(s, cells) for s in splits])
    predictions: dict[str, list[dict]] = {}
    trust: dict[str, dict] = {}
    history: list[dict] = []
    world_size = 1
    for split in splits:
        if job.resume and run.fold_predictions(split.name).is_file():
            job.log(f"{split.name}: already finished, kept")
            predictions[split.name] = read_predictions(run.fold_predictions(split.name))
            history += read_csv(run.fold_history(split.name))
            if run.fold_trust(split.name).is_file():
                trust[split.name] = run.read_json(run.fold_trust(split.name))
            continue
        job.log(f"{split.name}: training on {len(split.train)} images, validating on {len(split.val)}, "
                f"testing on {len(split.test)} ({split.note})")
        predictions[split.name], fold_history, trust[split.name] = _train_split(job, split)
        history += fold_history
        world_size = max(world_size, world()[1])
    result = summarize_run(config, splits, predictions, world_size, trust)
    if config.synthetic:
        result["synthetic"] = {"gan_dir": config.synthetic, "ratio": config.synthetic_ratio,
                               "splits": [run.read_json(run.fold_synthetic(s.name)) for s in splits
                                          if run.fold_synthetic(s.name).is_file()],
                               "note": "generated cells joined the training side only: never validation, test, "
                                       "calibration or the input gate's fitting"}
    if is_main_process():
        write_outputs(run, result, predictions, history, config)
    return result


def check_gans(config: RunConfig, splits: list[Split], cells: list[Cell], resumed: RunDir | None = None) -> None:
    """With --synthetic: each split's GAN exists and never saw its validation or test cells; a resumed run's
    splits keep the GAN they started with."""
    for split in splits:
        generated_count(config.synthetic_ratio, split)  # a ratio that adds no cell is refused here, not later
        gan = gan_for_split(config.synthetic, split, cells, config)
        record = resumed.fold_synthetic(split.name) if resumed else None
        if record is not None and record.is_file():
            started = resumed.read_json(record).get("gan_id")
            if started != gan.gan_id:
                raise RunError(f"{resumed}: split {split.name} started with GAN {started}, and {gan.folder} now holds "
                               f"GAN {gan.gan_id}; put that GAN back to resume, or start a new run with --out")


def check_devices(config: RunConfig) -> None:
    """Settings only this machine and Lightning can judge, checked before anything is written."""
    from lightning.pytorch.strategies import StrategyRegistry

    if config.strategy != "auto" and config.strategy not in StrategyRegistry:
        raise RunError(f"strategy {config.strategy!r} is not one Lightning knows; use auto or ddp")
    on_gpu = resolve_precision(config.precision, config.accelerator).accelerator == "gpu"
    if config.compile == "on" and not on_gpu:
        raise RunError("compile on is refused on a CPU: torch.compile's CPU code generator computes wrong gradients "
                       "for ALNet's convolutions (found in torch 2.14); use compile off or auto (auto compiles on a "
                       "GPU only)")
    if config.accelerator in ("gpu", "cuda") and not on_gpu:
        raise RunError(f"accelerator {config.accelerator} asked for, but this machine has no CUDA GPU; use auto")
    available = torch.cuda.device_count() if on_gpu else len(os.sched_getaffinity(0))
    if config.devices > available:
        raise RunError(f"devices {config.devices} is more than this machine has ({available} "
                       f"{'GPUs' if on_gpu else 'cores'})")


# Where and how fast a run runs, not what it computes: a resume may change these (e.g. on another machine).
RUNTIME_SETTINGS = ("devices", "strategy", "accelerator", "precision", "deterministic", "compile")


def config_changes(before: dict, after: RunConfig) -> list[str]:
    """The settings that differ between a recorded configuration and `after`, RUNTIME_SETTINGS aside."""
    now = asdict(after)
    return [f"{key} {before.get(key)!r} → {now[key]!r}" for key in now
            if key not in RUNTIME_SETTINGS and before.get(key) != now[key]]


def _check_same_start(run: RunDir, prepared: Prepared, config: RunConfig) -> None:
    """A resumed run continues the experiment it started, as data.json recorded it: on the same data (the cache key:
    file list, sizes, mtimes, labels, preprocessing) and with config.yaml unedited, RUNTIME_SETTINGS aside (runs
    from before data.json kept the configuration are not checked for it)."""
    recorded = run.read_json(run.data) if run.data.is_file() else {}
    if recorded.get("cache") and Path(recorded["cache"]).name != prepared.path.name:
        raise RunError(f"{run}: the dataset changed since this run started ({recorded.get('images')} images then, "
                       f"{len(prepared.cells)} now, or files, sizes, dates or labels differ); resume with the data "
                       "it was trained on, or start a new run with --out")
    changed = config_changes(recorded["config"], config) if isinstance(recorded.get("config"), dict) else []
    if changed:
        raise RunError(f"{run.config}: edited since this run started ({'; '.join(changed)}); put it back to resume, "
                       "or start a new run with --out")


def write_outputs(run: RunDir, result: dict, predictions: dict[str, list[dict]], history: list[dict],
                  config: RunConfig) -> None:
    from ..report.figures import write_run_figures
    from ..report.html import write_run_report
    from ..report.model_card import write_model_card

    write_csv(run.predictions, [r for rows in predictions.values() for r in rows], PREDICTION_FIELDS)
    write_csv(run.history, history, HISTORY_FIELDS)
    write_csv(run.subjects, subject_rows([r for rows in predictions.values() for r in rows]), SUBJECT_FIELDS)
    run.write_json(run.metrics, result)
    write_run_figures(run.figures, predictions, history)
    write_model_card(run)
    write_run_report(run, result, asdict(config))
