"""How cells are split into train / validation / test. Pure functions over the cell table; every split with
subject-level guarantees is checked for leakage (a subject on both sides stops the run).

- `paper`: each training fold on its own, stratified 80/20 into train and test as the paper did (Table 3).
  Images of one subject land on both sides: an image-level split, kept for reproduction only.
- `subject` (default): leave one fold out over the subject-disjoint folds (a grouped split by subject when
  folds are missing or not disjoint), validation subjects drawn from the training subjects only, and a final
  model on all folds tested on the labelled preliminary test set when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cnmc import Cell

PAPER_TEST_FRACTION = 0.2
PAPER_NOTE = "image-level split: subjects appear in both train and test"


class LeakageError(Exception):
    """A subject appears on both sides of a split that promises subject-level separation."""


@dataclass
class Split:
    name: str  # "fold_0", …, "prelim"
    train: np.ndarray  # row indices into the cell table / cache
    val: np.ndarray
    test: np.ndarray
    note: str = ""
    subject_disjoint: bool = True


def paper_test_size(n: int, fraction: float = PAPER_TEST_FRACTION) -> int:
    """Test images of a fold of n images: ceil(fraction·n) (scikit-learn's rule; gives Table 3's 706/717/711)."""
    return math.ceil(fraction * n)


def stratified_holdout(labels: np.ndarray, n_test: int, rng: np.random.Generator) -> np.ndarray:
    """Pick n_test positions with class shares as in `labels` (largest remainder per class)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / counts.sum()
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n_test - take.sum()]:
        take[i] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def check_no_leakage(cells: list[Cell], split: Split) -> None:
    parts = {"train": split.train, "val": split.val, "test": split.test}
    subjects = {name: {cells[i].subject for i in idx} for name, idx in parts.items()}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        shared = subjects[a] & subjects[b]
        if shared:
            raise LeakageError(
                f"{split.name}: subject(s) {', '.join(sorted(map(str, shared))[:5])} on both {a} and {b} sides; "
                "the folds are not subject-disjoint: fix the dataset or use --protocol paper knowingly"
            )


def _train_rows(cells: list[Cell]) -> np.ndarray:
    return np.array([i for i, c in enumerate(cells) if c.split == "train" and c.label is not None], dtype=int)


def paper_splits(cells: list[Cell], seed: int = 0) -> list[Split]:
    """Each fold on its own, stratified 80/20; validation = the fold's test part (curves only, as in the paper)."""
    rows = _train_rows(cells)
    folds = sorted({cells[i].fold for i in rows if cells[i].fold is not None})
    if not folds:
        raise ValueError("the paper protocol needs the training folds (fold_0, fold_1, fold_2)")
    rng = np.random.default_rng(seed)
    splits = []
    for fold in folds:
        members = np.array([i for i in rows if cells[i].fold == fold])
        labels = np.array([cells[i].label for i in members])
        test_pos = stratified_holdout(labels, paper_test_size(len(members)), rng)
        test = members[test_pos]
        train = np.setdiff1d(members, test)
        splits.append(Split(f"fold_{fold}", train, test.copy(), test, note=PAPER_NOTE, subject_disjoint=False))
    return splits


def subject_holdout(cells: list[Cell], rows: np.ndarray, fraction: float, rng: np.random.Generator):
    """Split rows by subject: about `fraction` of each class's subjects (at least one) go to the held-out side."""
    held = []
    for label in (0, 1):
        subjects = sorted({cells[i].subject for i in rows if cells[i].label == label})
        if len(subjects) < 2:
            continue
        n = min(len(subjects) - 1, max(1, round(fraction * len(subjects))))
        held.extend(rng.choice(subjects, size=n, replace=False))
    held = set(held)
    is_held = np.array([cells[i].subject in held for i in rows], dtype=bool)
    return rows[~is_held], rows[is_held]


def _folds_are_disjoint(cells: list[Cell], rows: np.ndarray) -> bool:
    seen: dict[str, int] = {}
    for i in rows:
        if seen.setdefault(cells[i].subject, cells[i].fold) != cells[i].fold:
            return False
    return True


def _grouped_folds(cells: list[Cell], rows: np.ndarray, k: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Deal subjects of each class round-robin (shuffled) into k folds."""
    fold_of: dict[str, int] = {}
    for label in (0, 1):
        subjects = sorted({cells[i].subject for i in rows if cells[i].label == label})
        for n, subject in enumerate(rng.permutation(subjects)):
            fold_of[subject] = n % k
    return {f: np.array([i for i in rows if fold_of[cells[i].subject] == f]) for f in range(k)}


def subject_splits(cells: list[Cell], seed: int = 0, val_fraction: float = 0.15, k: int = 3) -> list[Split]:
    """Leave-one-fold-out over subject-disjoint folds, then (if labelled prelim data exist) all folds → prelim."""
    rng = np.random.default_rng(seed)
    rows = _train_rows(cells)
    if any(cells[i].subject is None for i in rows):
        raise ValueError("every training image needs a subject id for the subject protocol")
    folds = sorted({cells[i].fold for i in rows if cells[i].fold is not None})
    note = "subject-level: test subjects never seen in training"
    if len(folds) >= 2 and all(cells[i].fold is not None for i in rows) and _folds_are_disjoint(cells, rows):
        by_fold = {f: np.array([i for i in rows if cells[i].fold == f]) for f in folds}
    else:
        by_fold = _grouped_folds(cells, rows, k, rng)
        note += f" (grouped {k}-fold by subject: the dataset's folds are missing or share subjects)"
    splits = []
    for fold, test in by_fold.items():
        rest = np.sort(np.concatenate([idx for f, idx in by_fold.items() if f != fold]))
        train, val = subject_holdout(cells, rest, val_fraction, rng)
        splits.append(Split(f"fold_{fold}", train, val, np.sort(test), note=note))
    prelim = np.array([i for i, c in enumerate(cells) if c.split == "prelim" and c.label is not None], dtype=int)
    if len(prelim):
        train, val = subject_holdout(cells, rows, val_fraction, rng)
        splits.append(Split("prelim", train, val, prelim, note="final model on all folds, tested on the "
                            "preliminary test set (unseen subjects)"))
    for split in splits:
        check_no_leakage(cells, split)
    return splits


def make_splits(protocol: str, cells: list[Cell], seed: int = 0, val_fraction: float = 0.15) -> list[Split]:
    if protocol == "paper":
        return paper_splits(cells, seed)
    if protocol == "subject":
        return subject_splits(cells, seed, val_fraction)
    raise ValueError(f"unknown protocol {protocol!r}: use 'paper' or 'subject'")
