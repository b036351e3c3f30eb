"""`alnet tune`: the paper's grid search over learning rate, epochs, dropout, batch size and optimiser (optuna).

Every trial trains on the training folds' subjects minus a held-out set of validation subjects and is scored by
validation accuracy after its last epoch — the test folds and the preliminary test set are never looked at.
The study lives in a SQLite file, or in any optuna storage shared by several workers (`study.py`): rerunning
the same command resumes it, and finished trials are never rerun.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import GRID_PRESETS, ConfigError, RunConfig, read_yaml, resolve_preset
from ..data.cache import Prepared
from ..data.protocols import Split, check_no_leakage, subject_holdout
from ..models import model_spec
from .batches import CellData, tensors
from .loggers import Tracking, flat_params, make_loggers
from .module import build_module
from .rundir import BEST_YAML_HEADER, foreign_files
from .study import STALE_SECONDS, Heartbeat, fail_stale_trials, open_storage, shown
from .trainer import make_trainer, quiet_lightning

STUDY_NAME = "alnet-tune"
SKIPPED = "skipped"  # user attribute of a trial a worker did not run (a duplicate of a queued point), and why
POLL_SECONDS = 5.0  # how often an idle worker looks whether the others have finished (or died)
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


def _point(trial, names: list[str]) -> tuple:
    """The grid point a trial stands for: the values it was queued with, else those it chose."""
    params = trial.system_attrs.get("fixed_params") or trial.params
    return tuple(params.get(name) for name in names)


def _queue_missing_points(study, search: dict[str, list]) -> None:
    """Enqueue every grid point that has not finished and is neither waiting nor running."""
    from optuna.trial import TrialState

    names = list(search)
    taken = {_point(t, names) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING))}
    for values in itertools.product(*search.values()):
        if values not in taken:
            study.enqueue_trial(dict(zip(names, values)))


def _claim(study, trial, names: list[str]) -> bool:
    """Whether this worker runs the trial it was handed. Two workers may queue the same point at once; the
    copy with the lower number runs, the other is skipped (as is a trial created when the queue had emptied)."""
    from optuna.trial import TrialState

    frozen = study._storage.get_trial(trial._trial_id)
    if "fixed_params" not in frozen.system_attrs:
        reason = "no grid point left"
    else:
        mine = _point(frozen, names)
        first = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                 if t.number != frozen.number and _point(t, names) == mine
                 and (t.state == TrialState.COMPLETE or t.number < frozen.number)]
        if not first:
            return True
        reason = f"same point as trial {min(first)}"
    trial.set_user_attr(SKIPPED, reason)
    study.tell(trial, state=TrialState.PRUNED)
    return False


def validation_split(prepared: Prepared, fraction: float, seed: int) -> Split:
    """Training subjects vs validation subjects, both from the training folds only."""
    cells = prepared.cells
    rows = np.array([i for i, c in enumerate(cells) if c.split == "train" and c.label is not None])
    train, val = subject_holdout(cells, rows, fraction, np.random.default_rng(seed))
    split = Split("tune", train, val, np.array([], dtype=int), note="validation subjects held out of training")
    check_no_leakage(cells, split)
    return split


def train_and_score(config: RunConfig, prepared: Prepared, split: Split, progress: bool = False,
                    loggers=()) -> float:
    """Validation accuracy after the last epoch of one training run."""
    import lightning as L

    images, labels = tensors(prepared)
    L.seed_everything(config.seed, verbose=False)
    module = build_module(config, [])
    trainer = make_trainer(config, [], Path.cwd(), progress, validate=True, loggers=loggers)
    trainer.fit(module, datamodule=CellData(images, labels, split.train, split.val, split.test, config))
    return float(trainer.callback_metrics["val_accuracy"])


def trial_loggers(tracking: Tracking, out: Path, trial: int, params: dict) -> list:
    """A trial's CSV log in out/logs/trial-<n>, and the experiment logger asked for (TensorBoard in
    out/tensorboard/trial-<n>, MLflow in out/mlruns)."""
    name = f"trial-{trial}"
    return make_loggers(tracking, out / "logs" / name, out / "tensorboard" / name, out, f"{out.name}/{name}", params)


def tune(grid: Path | str, prepared: Prepared, out: Path | str, base: RunConfig, sampler: str = "grid",
         trials: int | None = None, log: Callable[[str], None] = print, progress: bool = False,
         storage: str | None = None, tracking: Tracking | None = None):
    """Run (or resume, or join) the study; writes out/best.yaml and out/trials.csv.

    The study lives in out/study.db, or in `storage` (an optuna storage URL or journal:FILE) shared by workers
    started with the same grid and settings on several machines: each grid point runs once, a point whose worker
    died runs again, and every worker waits for the others to finish before writing the same results. Every trial
    keeps a CSV log (out/logs/trial-<n>), plus the experiment logger of `tracking`."""
    import optuna
    from optuna.trial import TrialState

    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracking = (tracking or Tracking()).check()
    search, fixed = read_grid(grid)
    base = RunConfig(**{**asdict(base), **fixed}).validate()
    if model_spec(base.model).hybrid:
        raise ConfigError(f"{base.model}: a hybrid chooses its own small grid on the validation subjects during "
                          "`alnet train`; tune searches the CNNs' training settings")
    out = Path(out)
    foreign = foreign_files(out)
    if foreign:
        raise ConfigError(f"{foreign[0]}: not written by alnet tune, and tune would replace it; move it aside or "
                          "search into another --out")
    out.mkdir(parents=True, exist_ok=True)
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
    where = shown(storage) if storage else str(out / "study.db")
    study = _open_study(storage, out, where, chosen)
    _check_same_search(study, where, search, base, sampler)
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if finished:
        log(f"resuming {where}: {finished} trial(s) finished earlier are kept")
    names = list(search)
    waiting_said = False
    while True:
        for number in fail_stale_trials(study):
            log(f"trial {number}: its worker fell silent for {STALE_SECONDS:.0f} s; its point runs again")
        if sampler == "grid":
            _queue_missing_points(study, search)
        counts = {state: len(study.get_trials(deepcopy=False, states=(state,)))
                  for state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
        work_left = (counts[TrialState.WAITING] if sampler == "grid"
                     else total - counts[TrialState.COMPLETE] - counts[TrialState.RUNNING])
        if work_left <= 0:
            if not counts[TrialState.RUNNING]:
                break
            if not waiting_said:
                log(f"waiting for {counts[TrialState.RUNNING]} trial(s) running in other workers")
                waiting_said = True
            time.sleep(POLL_SECONDS)
            continue
        trial = study.ask()
        if sampler == "grid" and not _claim(study, trial, names):
            continue
        params = {name: trial.suggest_categorical(name, values) for name, values in search.items()}
        config = RunConfig(**{**asdict(base), **params}).validate()
        start = time.perf_counter()
        try:
            loggers = trial_loggers(tracking, out, trial.number, flat_params(asdict(config), trial=trial.number))
            with Heartbeat(trial):
                score = train_and_score(config, prepared, split, progress, loggers)
        except BaseException:
            _tell(study, trial, log, state=TrialState.FAIL)
            raise
        if _tell(study, trial, log, values=score):
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            log(f"trial {done}/{total}: {', '.join(f'{k}={v}' for k, v in params.items())} → validation accuracy "
                f"{score:.3f} ({time.perf_counter() - start:.0f} s)")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError("no trial finished; see the messages above")
    # The best by score, ties to the earlier grid point (else trial): the same whichever worker ran what first.
    order = {values: i for i, values in enumerate(itertools.product(*search.values()))}
    best = max(complete, key=lambda t: (t.value, -order.get(_point(t, names), t.number)))
    best_config = RunConfig(**{**asdict(base), **best.params}).validate()
    written = out / f".best.yaml.{os.getpid()}"  # written whole, then renamed: workers finish together
    best_config.to_yaml(written)
    written.write_text(BEST_YAML_HEADER + "\n" + written.read_text())
    os.replace(written, out / "best.yaml")
    written = out / f".trials.csv.{os.getpid()}"
    with open(written, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial", *search, "validation_accuracy", "state"])
        writer.writeheader()
        for t in study.get_trials(deepcopy=False):
            if SKIPPED not in t.user_attrs:
                writer.writerow({"trial": t.number, **t.params, "validation_accuracy": t.value,
                                 "state": t.state.name})
    os.replace(written, out / "trials.csv")
    return best_config, best.value, complete


def _open_study(storage: str | None, out: Path, where: str, sampler):
    import optuna

    for attempt in range(3):
        try:
            return optuna.create_study(study_name=STUDY_NAME, storage=open_storage(storage, out), sampler=sampler,
                                       direction="maximize", load_if_exists=True)
        except ConfigError:
            raise
        except ImportError as err:
            raise ConfigError(f"--storage {where}: its database driver is not installed ({err}); e.g. pip install "
                              "'alnet[postgres]'") from None
        except Exception as err:  # unreachable server, bad credentials, unknown dialect: SQLAlchemy's own errors
            if attempt == 2:
                raise ConfigError(f"--storage {where}: cannot open the study ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]})") from None
            time.sleep(1 + attempt)  # workers starting together on a new database race to create its tables


def _tell(study, trial, log, **outcome) -> bool:
    """Record a trial's end; False when another worker had already given it up as stale (its point ran again)."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        study.tell(trial, **outcome)
        return True
    except (UpdateFinishedTrialError, RuntimeError, ValueError) as err:
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            log(f"trial {trial.number} was given up as stale by another worker; its result is dropped")
            return False
        raise err


def _check_same_search(study, where: str, search: dict, base: RunConfig, sampler: str) -> None:
    """Workers joining a study must search the same grid from the same base configuration."""
    setup = json.loads(json.dumps({"search": search, "base": asdict(base), "sampler": sampler}))
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", setup)
    elif recorded != setup:
        differ = sorted(k for k in setup if recorded.get(k) != setup[k])
        raise ConfigError(f"{where}: this study was started with another {' and '.join(differ)}; start every worker "
                          "with the same --grid, --config, --image-size, --seed and --sampler, or use another "
                          "--storage/--out")
