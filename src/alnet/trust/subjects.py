"""The patient-level view (docs/design.md, "Calibrated probabilities, patients and review").

C-NMC labels are per subject: every cell of an ALL subject is ALL. A subject's answer is the mean calibrated
P(ALL) of its cells, called ALL above the same threshold as a cell. Confidence intervals resample subjects, not
cells: the cells of one patient are not independent draws. Pure functions, except `read_subject_map`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import metrics as M
from ..data.cnmc import subject_id
from ..labels import ALL, NAMES, THRESHOLD, Status, is_all, name_of

BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
UNKNOWN_SUBJECT = "(unknown)"  # cells whose subject neither the file name nor the map gives
MAX_MAP_BYTES = 16 * 2**20  # a subject map of a million cells is about this size
MAX_SUBJECT_CHARS = 100
_UID = re.compile(r"^UID_(H?)(\d+)_", re.IGNORECASE)  # the C-NMC file-name prefix, e.g. UID_h3_… or UID_57_…
SUBJECTS_CSV = "subjects.csv"


class SubjectMapError(ValueError):
    """A --subjects file alnet cannot use; the message names it, the line and the fix."""


# grouping ----------------------------------------------------------------------------------------------------
def groups(subjects: Iterable[str]) -> dict[str, np.ndarray]:
    """Subject → the indices of its cells, subjects in sorted order."""
    found: dict[str, list[int]] = defaultdict(list)
    for i, subject in enumerate(subjects):
        found[subject].append(i)
    return {s: np.array(found[s], dtype=np.int64) for s in sorted(found)}


def subject_from_name(path: Path | str) -> str | None:
    """The subject of a C-NMC file name (`UID_<subject>_…`, normalised as in the dataset), or None."""
    match = _UID.match(Path(path).name)
    return subject_id(bool(match.group(1)), match.group(2)) if match else None


# intervals ---------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion (stays inside [0, 1] and is sensible at 0 of n and n of n);
    (NaN, NaN) without trials."""
    if trials == 0:
        return float("nan"), float("nan")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(clusters: list[np.ndarray], statistic: Callable[[np.ndarray], float],
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Percentile bootstrap interval of `statistic(indices)`, resampling whole clusters (subjects) with
    replacement. Resamples where the statistic is undefined (NaN, e.g. AUC of a one-class resample) are left
    out and counted."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(clusters), len(clusters)) if clusters else np.array([], dtype=int)
        values.append(statistic(np.concatenate([clusters[k] for k in drawn]) if len(drawn) else drawn))
    values = np.array(values, dtype=float)
    defined = values[~np.isnan(values)]
    low, high = ((float(np.quantile(defined, (1 - confidence) / 2)), float(np.quantile(defined, (1 + confidence) / 2)))
                 if len(defined) else (float("nan"), float("nan")))
    return {"low": low, "high": high, "confidence": confidence, "resamples": resamples, "seed": seed,
            "undefined_resamples": int(len(values) - len(defined)), "unit": "subject"}


def resampled_auc(labels, prob) -> Callable[[np.ndarray], float]:
    """A function of drawn indices (repeats allowed) giving `metrics.roc_auc(labels[idx], prob[idx])`, computed
    from the draw's multiplicities in O(n) numpy: the Mann–Whitney sum over the distinct scores, ties half."""
    labels, prob = np.asarray(labels).astype(int), np.asarray(prob, dtype=float)
    distinct, group = np.unique(prob, return_inverse=True)
    positive = (labels == 1).astype(float)

    def auc(idx: np.ndarray) -> float:
        weight = np.bincount(idx, minlength=len(labels)).astype(float)
        pos = np.bincount(group, weights=weight * positive, minlength=len(distinct))
        neg = np.bincount(group, weights=weight * (1 - positive), minlength=len(distinct))
        if pos.sum() == 0 or neg.sum() == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives with a lower score than each distinct score
        return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))

    return auc


def image_intervals(subjects, labels, prob, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Bootstrap intervals of image-level accuracy and AUC, resampling subjects."""
    labels, prob = np.asarray(labels).astype(int), np.asarray(prob, dtype=float)
    correct = is_all(prob) == (labels == 1)
    clusters = list(groups(subjects).values())
    return {"accuracy": bootstrap_interval(clusters, lambda i: correct[i].mean() if len(i) else np.nan,
                                           resamples, seed),
            "auc": bootstrap_interval(clusters, resampled_auc(labels, prob), resamples, seed)}


# the subject-level view of a labelled test set -----------------------------------------------------------
def subject_level(subjects, labels, prob_calibrated, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """metrics.json's `subject_level`: per subject the mean calibrated P(ALL) and the share of cells called
    ALL; over subjects AUC (of the mean P(ALL)), accuracy of the subject call at the threshold, their bootstrap
    intervals and the number of subjects."""
    labels, prob = np.asarray(labels).astype(int), np.asarray(prob_calibrated, dtype=float)
    per_subject = []
    for subject, idx in groups(subjects).items():
        per_subject.append({"subject": subject, "label": int(labels[idx[0]]), "cells": int(len(idx)),
                            "mean_probability_all": float(prob[idx].mean()),
                            "fraction_called_all": float(is_all(prob[idx]).mean())})
    truth = np.array([s["label"] for s in per_subject], dtype=int)
    score = np.array([s["mean_probability_all"] for s in per_subject], dtype=float)
    correct = is_all(score) == (truth == 1)
    singles = [np.array([k]) for k in range(len(per_subject))]
    return {
        "subjects": len(per_subject),
        "auc": M.roc_auc(truth, score),
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "auc_interval": bootstrap_interval(singles, resampled_auc(truth, score), resamples, seed),
        "accuracy_interval": bootstrap_interval(singles, lambda i: correct[i].mean() if len(i) else np.nan,
                                                resamples, seed),
        "rule": f"a subject is called ALL when the mean calibrated P(ALL) of its cells is above {THRESHOLD}",
        "per_subject": per_subject,
    }


# subjects.csv ---------------------------------------------------------------------------------------------------
def subject_rows(rows: list[dict]) -> list[dict]:
    """subjects.csv rows (`alnet.schema.SUBJECTS`) from predictions.csv rows, for a run's test sets and for
    `alnet predict --by-subject` alike: per test set (`fold`) and subject the cells, those called ALL among the
    cells with a P(ALL) (a run keeps refused cells' P(ALL) for its metrics; `predict` gives them none), the share
    called ALL with its 95 % Wilson interval, the mean P(ALL), the subject's call, the accuracy where the label
    is known, and the cells rejected or flagged for review."""
    by_subject: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_subject[(row.get("fold") or "", row.get("subject") or UNKNOWN_SUBJECT)].append(row)
    out = []
    for (fold, subject), cells in sorted(by_subject.items()):
        scored = [r for r in cells if r.get("probability_all")]
        called_all = np.array([r["predicted"] == NAMES[ALL] for r in scored], dtype=bool)
        n_all = int(called_all.sum())
        low, high = wilson_interval(n_all, len(scored))
        mean = float(np.mean([float(r["probability_all"]) for r in scored])) if scored else float("nan")
        labels = {r.get("label") or "" for r in cells}
        label = labels.pop() if len(labels) == 1 else ""
        accuracy = float((called_all == (label == NAMES[ALL])).mean()) if label and scored else float("nan")
        out.append({
            "fold": fold, "subject": subject, "label": label, "cells": len(cells), "cells_all": n_all,
            "fraction_all": _fmt(n_all / len(scored) if scored else float("nan")),
            "fraction_all_low": _fmt(low), "fraction_all_high": _fmt(high), "mean_probability_all": _fmt(mean),
            "predicted": name_of(mean) if scored else "", "accuracy": _fmt(accuracy),
            "cells_rejected": sum(r.get("status") == Status.REJECTED for r in cells),
            "cells_review": sum(r.get("status") == Status.REVIEW for r in cells),
        })
    return out


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def read_subject_map(path: Path | str) -> dict[Path, str]:
    """A CSV with columns `path` and `subject` → {resolved image path: subject}. Relative paths are taken from
    the folder that holds the CSV. The file is treated as hostile: size-capped, UTF-8 (a byte-order mark is
    fine), every problem a one-line SubjectMapError naming the line."""
    path = Path(path)
    fix = "pass a CSV with a header `path,subject` and one row per image"
    if not path.is_file():
        raise SubjectMapError(f"{path}: no such file; {fix}")
    if path.stat().st_size > MAX_MAP_BYTES:
        raise SubjectMapError(f"{path}: larger than {MAX_MAP_BYTES // 2**20} MiB; {fix}")
    try:
        text = path.read_bytes()[:MAX_MAP_BYTES + 1].decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SubjectMapError(f"{path}: not UTF-8 text; {fix}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "path" not in fields or "subject" not in fields:
        raise SubjectMapError(f"{path}: no `path` and `subject` columns in the header; {fix}")
    reader.fieldnames = fields
    base = path.resolve().parent
    mapping: dict[Path, str] = {}
    try:
        for row in reader:
            line = reader.line_num
            image, subject = (row.get("path") or "").strip(), (row.get("subject") or "").strip()
            if not image or not subject:
                raise SubjectMapError(f"{path}, line {line}: empty path or subject; {fix}")
            if len(subject) > MAX_SUBJECT_CHARS or not subject.isprintable():
                raise SubjectMapError(f"{path}, line {line}: a subject id must be printable and at most "
                                      f"{MAX_SUBJECT_CHARS} characters")
            if subject == UNKNOWN_SUBJECT:
                raise SubjectMapError(f"{path}, line {line}: {UNKNOWN_SUBJECT} is how subjects.csv counts pictures "
                                      "with no subject; give this one a name, or leave its line out")
            key = (base / image).resolve()
            if mapping.get(key, subject) != subject:
                raise SubjectMapError(f"{path}, line {line}: {image} is given two subjects ({mapping[key]!r} and "
                                      f"{subject!r}); keep one")
            mapping[key] = subject
    except csv.Error as err:
        raise SubjectMapError(f"{path}, line {reader.line_num}: not a readable CSV ({err}); {fix}") from None
    return mapping


def subject_of(path: Path | str, mapping: dict[Path, str] | None) -> str:
    """A picture's subject: from `mapping` (`read_subject_map`) when given, else from its C-NMC file name; "" when
    neither says (subjects.csv counts those under UNKNOWN_SUBJECT)."""
    found = mapping.get(Path(path).resolve()) if mapping is not None else subject_from_name(path)
    return found or ""


# two models on the same test cells ------------------------------------------------------------------------------
def paired_difference(before: list[dict], after: list[dict], seed: int = 0,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """`after` − `before` for two models that answered the same test cells (predictions.csv rows of runs with the
    same splits), pooled over the test folds (the preliminary set apart when there are folds): image accuracy and
    AUC, and the subject-level accuracy and AUC (a subject's score is the mean P(ALL) of its cells). Intervals
    resample subjects, the same draw for both models, so the interval is that of the difference itself."""
    def keyed(rows):
        folds = {r["fold"] for r in rows}
        tested = [r for r in rows if r["fold"] != "prelim" or folds == {"prelim"}]
        return {(r["fold"], r["path"]): r for r in tested}

    b, a = keyed(before), keyed(after)
    if set(b) != set(a) or not b:
        raise ValueError("the two runs did not answer the same test cells; compare them with the same data, "
                         "protocol and seed")
    keys = sorted(b)
    labels = np.array([NAMES[ALL] == b[k]["label"] for k in keys], dtype=int)
    subjects = [b[k]["subject"] or UNKNOWN_SUBJECT for k in keys]
    probs = {side: np.array([float(rows[k]["probability_all"]) for k in keys]) for side, rows in
             (("before", b), ("after", a))}
    cells = list(groups(subjects).values())
    correct = {side: is_all(p) == (labels == 1) for side, p in probs.items()}
    auc = {side: resampled_auc(labels, p) for side, p in probs.items()}
    image = {
        "accuracy": _difference(correct["before"].mean(), correct["after"].mean(), bootstrap_interval(
            cells, lambda i: correct["after"][i].mean() - correct["before"][i].mean() if len(i) else np.nan,
            resamples, seed)),
        "auc": _difference(M.roc_auc(labels, probs["before"]), M.roc_auc(labels, probs["after"]), bootstrap_interval(
            cells, lambda i: auc["after"](i) - auc["before"](i), resamples, seed)),
    }
    truth = np.array([labels[idx[0]] for idx in cells])
    mean = {side: np.array([p[idx].mean() for idx in cells]) for side, p in probs.items()}
    right = {side: is_all(m) == (truth == 1) for side, m in mean.items()}
    subject_auc = {side: resampled_auc(truth, m) for side, m in mean.items()}
    singles = [np.array([k]) for k in range(len(cells))]
    subject = {
        "accuracy": _difference(right["before"].mean(), right["after"].mean(), bootstrap_interval(
            singles, lambda i: right["after"][i].mean() - right["before"][i].mean() if len(i) else np.nan,
            resamples, seed)),
        "auc": _difference(M.roc_auc(truth, mean["before"]), M.roc_auc(truth, mean["after"]), bootstrap_interval(
            singles, lambda i: subject_auc["after"](i) - subject_auc["before"](i), resamples, seed)),
    }
    return {"cells": len(keys), "subjects": len(cells), "image": image, "subject": subject}


def _difference(before: float, after: float, interval: dict) -> dict:
    return {"before": float(before), "after": float(after), "difference": float(after - before),
            "interval": interval}
