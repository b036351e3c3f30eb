"""Fitting a hybrid model (models/hybrid.py) on one split: features once, a small grid, the test predictions.

- **Features** come from `CellClassifier.extract_features`, the path frozen baselines use: each image's features
  once per split, in evaluation mode, un-augmented (a hybrid ignores the augmentation settings).
- **Backbones without ImageNet weights** (alnet) take the weights of a trained model: `features_from` is a run
  directory (each split uses that run's chosen checkpoint of the same split: trained on the same subjects) or one
  checkpoint. A checkpoint that has seen a test subject of a subject-disjoint split is refused.
- **Hyper-parameters** are chosen on the validation subjects (subject protocol): every grid point is fitted on
  the training images and scored by validation log-loss (accuracy breaks ties poorly on few images); the best
  one is kept as fitted. The paper protocol has no validation subjects (its validation part is its test part),
  so there the grid is scored by stratified 3-fold cross-validation inside the training images, image-level
  like the protocol itself. The test part is never looked at.
- **Probabilities**: `predict_proba`; the SVM's are Platt-calibrated on cross-validated decision values.

The fitted model is saved as a checkpoint of the usual form (weights under `model.`, the classifier as skops
bytes in the model's extra state), so evaluate, predict, serve and export read it as any other.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ..models import create_model_from, model_spec
from ..models.hybrid import make_search

CV_FOLDS = 3


class HybridError(ValueError):
    """A hybrid cannot be fitted as configured; the message says what to pass."""


def _trained_backbone_checkpoint(features_from: str | None, split, backbone: str, model: str) -> Path:
    """The checkpoint whose weights the backbone `backbone` takes for `split`."""
    from .rundir import RunDir

    if not features_from:
        raise HybridError(f"{model}: {backbone} has no pretrained weights; pass --features-from with a run "
                          f"directory of a trained {backbone} run (same protocol and seed) or one of its checkpoints")
    source = Path(features_from)
    if source.is_dir():
        chosen = RunDir(source).chosen_checkpoint(split.name)
        if chosen is None:
            raise HybridError(f"{source}: no finished fold {split.name}; pass a run directory trained under the same "
                              "protocol and seed (it has folds/<fold>/checkpoint.txt), or one checkpoint")
        return chosen
    return source


def load_trained_backbones(model, config, split, test_subjects: set[str], log) -> list[str]:
    """Copy trained weights into the backbones that need them; returns the checkpoints used."""
    from ..checkpoint import load_trained_model

    used = []
    for backbone in model_spec(config.model).trained_backbones:
        path = _trained_backbone_checkpoint(config.features_from, split, backbone, config.model)
        trained = load_trained_model(path)
        if trained.name != backbone:
            raise HybridError(f"{path}: a {trained.name} checkpoint; {config.model} needs a {backbone} one")
        if trained.preprocessing != config.preprocessing:
            raise HybridError(f"{path}: trained at image size {trained.preprocessing.size}, crop "
                              f"{trained.preprocessing.crop}; run the hybrid with the same --image-size and crop")
        seen = test_subjects & set(trained.seen_subjects)
        if split.subject_disjoint and seen:
            raise HybridError(f"{path}: was trained or validated on {len(seen)} subject(s) of {split.name}'s test "
                              "set; pass the run directory (each fold then uses its own checkpoint)")
        model.backbones[backbone].load_state_dict(trained.model.state_dict())
        log(f"{split.name}: {backbone} features from {path}")
        used.append(str(path))
    return used


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    from ..labels import is_all

    return float(np.mean(np.array([is_all(v) for v in p]) == y))


def fit_classifier(parts, x_train, y_train, x_val, y_val, seed: int):
    """(the fitted pipeline, the chosen grid point, how it was chosen)."""
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold

    smallest = int(np.bincount(y_train, minlength=2).min())
    if smallest < 2:
        raise HybridError(f"the training part holds {smallest} image(s) of one class; a classifier needs at least "
                          "two of each")
    calibration = min(CV_FOLDS, smallest)
    if len(y_val):
        pipeline, grid = make_search(parts, len(y_train), calibration, seed)
        best = None
        for point in ParameterGrid(grid):
            candidate = clone(pipeline).set_params(**point).fit(x_train, y_train)
            p = candidate.predict_proba(x_val)[:, list(candidate.classes_).index(1)]
            score = _log_loss(y_val, p)
            if best is None or score < best[0]:
                best = (score, candidate, point)
        return best[1], best[2], f"lowest validation log-loss ({best[0]:.4f}) over {len(ParameterGrid(grid))} point(s)"
    folds = min(CV_FOLDS, smallest)
    inner_images = len(y_train) - -(-len(y_train) // folds)  # the fewest images an inner fit sees
    inner_smallest = smallest - -(-smallest // folds)
    pipeline, grid = make_search(parts, inner_images, max(2, min(CV_FOLDS, inner_smallest)), seed)
    search = GridSearchCV(pipeline, grid, scoring="neg_log_loss",
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    search.fit(x_train, y_train)
    return search.best_estimator_, search.best_params_, (
        f"lowest {folds}-fold cross-validated log-loss inside the training images ({-search.best_score_:.4f}); "
        "this protocol has no validation subjects")


def fit_split(job, split, seen_subjects: list[str]):
    """Fit the hybrid of `job.config` on `split`: (the model, history rows, details, the backbone features of every
    row, the precision path they were computed with)."""
    from .module import CellClassifier

    config = job.config
    # Seeded per split as a CNN's split is: a --no-pretrained backbone gets the same random weights as the
    # frozen baseline of that backbone on that split, and a resumed run builds the same model.
    L.seed_everything(zlib.crc32(f"{config.seed}:{split.name}".encode()), verbose=False)
    model = create_model_from(config)
    test_subjects = {job.cells[i].subject for i in split.test}
    used = load_trained_backbones(model, config, split, test_subjects, job.log)
    module = CellClassifier(asdict(config), seen_subjects, model=model)
    start = time.perf_counter()
    needed = np.unique(np.r_[split.train, split.val])  # the test cells are answered by the pipeline, from images
    if config.augment or config.double_offline:
        job.log(f"{split.name}: a hybrid fits on un-augmented features; the augmentation settings are not used")
    job.log(f"{split.name}: computing {config.model} features once for {len(needed)} images")
    cached = module.extract_features(job.images, needed)
    features = cached.numpy()
    feature_seconds = time.perf_counter() - start
    labels = job.labels.numpy().astype(int)
    train, val = (np.sort(np.asarray(rows, dtype=np.int64)) for rows in (split.train, split.val))
    # The paper protocol's validation part is its test part: never used for choosing.
    choose_on = val if config.protocol == "subject" else np.array([], dtype=np.int64)
    start = time.perf_counter()
    fitted, point, how = fit_classifier(model.parts, features[train], labels[train], features[choose_on],
                                        labels[choose_on], config.seed)
    fit_seconds = time.perf_counter() - start
    model.classifier = fitted
    job.log(f"{split.name}: {model.parts.classifier} chosen by {how}: {point or 'no settings to choose'}")
    history = {"epoch": 1, **_scores("train", labels[train], model.predict_proba(features[train]))}
    history.update(_scores("val", labels[val], model.predict_proba(features[val])) if len(val)
                   else {"val_loss": float("nan"), "val_accuracy": float("nan")})
    details = {"fold": split.name, "parameters": {k: _plain(v) for k, v in point.items()}, "chosen_by": how,
               "feature_seconds": feature_seconds, "fit_seconds": fit_seconds, "features": int(features.shape[1]),
               "features_from": used}
    return model, [history], details, cached, module.precision_path


def _scores(prefix: str, y: np.ndarray, p: np.ndarray) -> dict:
    return {f"{prefix}_loss": _log_loss(y, p), f"{prefix}_accuracy": _accuracy(y, p)}


def _plain(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def save_fitted(path: Path, model, config, seen_subjects: list[str], history: list[dict], details: dict) -> None:
    """A checkpoint of the usual form: `torch.load(weights_only=True)` reads it, `load_trained_model` builds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": asdict(config), "seen_subjects": seen_subjects},
                "alnet_history": history, "alnet_hybrid": details}, path)


def check_config(config) -> None:
    """What can be refused before anything is written: a backbone needing trained weights without a source."""
    spec = model_spec(config.model)
    if spec.trained_backbones and not config.features_from:
        raise HybridError(f"{spec.name}: {', '.join(spec.trained_backbones)} has no pretrained weights; pass "
                          "--features-from with a trained run directory (same protocol and seed) or a checkpoint")
    if spec.trained_backbones and not Path(config.features_from).exists():
        raise HybridError(f"{config.features_from}: no such run directory or checkpoint for --features-from")


def fit_and_write(job, split) -> tuple[list[dict], list[dict], dict]:
    """`run._train_split` for a hybrid: fit, save the fitted checkpoint, then the end-of-training stage and the
    test pass as for a CNN (`alnet.fitting`), and write the fold's files."""
    from ..fitting import fit_after_training
    from ..pipeline import answer_rows
    from ..schema import HISTORY_FIELDS, PREDICTION_FIELDS, write_csv
    from .results import prediction_rows
    from .trainer import is_main_process

    seen = sorted({job.cells[i].subject for i in np.r_[split.train, split.val]})
    model, history, details, cached, runs_as = fit_split(job, split, seen)
    history = [{"fold": split.name, **h} for h in history]
    run = job.run
    checkpoint = run.fitted_checkpoint(split.name)
    fitted = fit_after_training(model, job.images, job.cells, split, job.config, runs_as, cached=cached)
    answers = answer_rows(fitted.pipeline(model, job.config, runs_as, checkpoint), job.images, split.test)
    rows = prediction_rows(split.name, job.cells, split.test, answers, job.config.model, checkpoint)
    if is_main_process():
        save_fitted(checkpoint, model, job.config, seen, history, details)
        fitted.store(checkpoint)
        run.fold(split.name).mkdir(parents=True, exist_ok=True)
        run.write_json(run.fold_classifier(split.name), details)
        run.write_json(run.fold_trust(split.name), fitted.trust)
        write_csv(run.fold_history(split.name), history, HISTORY_FIELDS)
        run.record_chosen(split.name, checkpoint)
        write_csv(run.fold_predictions(split.name), rows, PREDICTION_FIELDS)  # written last: marks the fold done
    return rows, history, fitted.trust
