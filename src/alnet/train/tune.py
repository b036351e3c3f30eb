"""`alnet tune`: the paper's grid search over learning rate, epochs, dropout, batch size and optimiser (optuna).

Every trial trains on the training folds' subjects minus a held-out set of validation subjects and is scored by
validation accuracy after its last epoch — the test folds and the preliminary test set are never looked at.
The study lives in a SQLite file: rerunning the same command resumes it, and finished trials are never rerun.
"""

from __future__ import annotations

import csv
import itertools
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import GRID_PRESETS, ConfigError, RunConfig, read_yaml, resolve_preset
from ..data.cache import Prepared
from ..data.protocols import Split, check_no_leakage, subject_holdout
from .batches import CellData, tensors
from .module import build_module
from .trainer import make_trainer, quiet_lightning

STUDY_NAME = "alnet-tune"
TUNABLE = {f.name for f in fields(RunConfig)} - {"protocol", "devices", "strategy", "accelerator"}


def read_grid(grid: Path | str = "grid") -> tuple[dict[str, list], dict]:
    """A grid file (or the packaged preset `grid`) → (search space: setting → values, fixed settings)."""
    path = resolve_preset(grid, GRID_PRESETS)
    data = read_yaml(path, "search grid (format: alnet/configs/grid.yaml)")
    search, fixed = data.get("search") or {}, data.get("fixed") or {}
    unknown = sorted((set(search) | set(fixed)) - TUNABLE)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; use the settings of a run "
                          "configuration (alnet/configs/subject.yaml)")
    bad = [k for k, v in search.items() if not isinstance(v, list) or not v]
    if not search or bad:
        raise ConfigError(f"{path}: `search` must map settings to non-empty lists of values"
                          + (f" (not {', '.join(bad)})" if bad else ""))
    return search, fixed


def _queue_missing_points(study, search: dict[str, list]) -> None:
    """Enqueue every grid point that has neither finished nor is already waiting in the queue."""
    from optuna.trial import TrialState

    names = list(search)

    def point(params: dict) -> tuple:
        return tuple(params.get(name) for name in names)

    done = {point(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    queued = {point(t.system_attrs.get("fixed_params", {}))
              for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for values in itertools.product(*search.values()):
        if values not in done | queued:
            study.enqueue_trial(dict(zip(names, values)))


def validation_split(prepared: Prepared, fraction: float, seed: int) -> Split:
    """Training subjects vs validation subjects, both from the training folds only."""
    cells = prepared.cells
    rows = np.array([i for i, c in enumerate(cells) if c.split == "train" and c.label is not None])
    train, val = subject_holdout(cells, rows, fraction, np.random.default_rng(seed))
    split = Split("tune", train, val, np.array([], dtype=int), note="validation subjects held out of training")
    check_no_leakage(cells, split)
    return split


def train_and_score(config: RunConfig, prepared: Prepared, split: Split, progress: bool = False) -> float:
    """Validation accuracy after the last epoch of one training run."""
    import lightning as L

    images, labels = tensors(prepared)
    L.seed_everything(config.seed, verbose=False)
    module = build_module(config, [])
    trainer = make_trainer(config, [], Path.cwd(), progress, validate=True)
    trainer.fit(module, datamodule=CellData(images, labels, split.train, split.val, split.test, config))
    return float(module.history[-1]["val_accuracy"])


def tune(grid: Path | str, prepared: Prepared, out: Path | str, base: RunConfig, sampler: str = "grid",
         trials: int | None = None, log: Callable[[str], None] = print, progress: bool = False):
    """Run (or resume) the study in out/study.db; writes out/best.yaml and out/trials.csv."""
    import optuna
    from optuna.trial import TrialState

    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search, fixed = read_grid(grid)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = RunConfig(**{**asdict(base), **fixed}).validate()
    split = validation_split(prepared, base.val_fraction, base.seed)
    if sampler == "grid":
        # Every combination is queued explicitly (the sampler never has to choose), so that a point whose
        # trial was killed runs again on resume while finished points never do.
        chosen = optuna.samplers.RandomSampler(seed=base.seed)
        total = int(np.prod([len(v) for v in search.values()]))
    elif sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=base.seed)
        total = trials or 20
    else:
        raise ConfigError(f"unknown sampler {sampler!r}: use grid or tpe")
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}", sampler=chosen,
                                direction="maximize", load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # A trial that was running when the last search was killed: mark it failed so its point runs again.
        study._storage.set_trial_state_values(stale._trial_id, state=TrialState.FAIL)
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if finished:
        log(f"resuming {out / 'study.db'}: {finished} trial(s) finished earlier are kept")
    if sampler == "grid":
        _queue_missing_points(study, search)

    def objective(trial) -> float:
        params = {name: trial.suggest_categorical(name, values) for name, values in search.items()}
        config = RunConfig(**{**asdict(base), **params}).validate()
        start = time.perf_counter()
        score = train_and_score(config, prepared, split, progress)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) + 1
        log(f"trial {done}/{total}: {', '.join(f'{k}={v}' for k, v in params.items())} → validation accuracy "
            f"{score:.3f} ({time.perf_counter() - start:.0f} s)")
        return score

    remaining = max(0, total - finished) if sampler == "tpe" else len(study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,)))
    if remaining:
        study.optimize(objective, n_trials=remaining)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError("no trial finished; see the messages above")
    best = study.best_trial
    best_config = RunConfig(**{**asdict(base), **best.params}).validate()
    best_config.to_yaml(out / "best.yaml")
    with open(out / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial", *search, "validation_accuracy", "state"])
        writer.writeheader()
        for t in study.get_trials(deepcopy=False):
            writer.writerow({"trial": t.number, **t.params, "validation_accuracy": t.value, "state": t.state.name})
    return best_config, best.value, complete
