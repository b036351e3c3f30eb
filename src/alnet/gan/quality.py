"""How close generated cells are to real ones, with no download: both figures work on the penultimate features of
an ALNet trained on real cells of the same split (docs/design.md, "Generated cells").

- **KID** (Bińkowski et al. 2018; torchmetrics' `KernelInceptionDistance` with our features in place of
  Inception's, standardised over both sets): an unbiased estimate of the squared MMD under
  a cubic polynomial kernel, averaged over subsets. About 0 when both sets come from one distribution.
- **Two-sample accuracy** (Lopez-Paz & Oquab 2017): a logistic regression learns to tell real from generated on
  half of the real subjects and half of the generated cells, and is scored on the other halves (then the halves
  swap). 0.5 is chance: the classifier cannot tell them apart; 1.0 means every cell gives itself away.

Real cells are the split's held-out subjects' (never seen by the GAN), so neither figure rewards memorising.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def kid(real: np.ndarray, generated: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID over `subsets` random subsets of up to `subset_size` features of each set."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(generated)) * 3 // 4  # subsets that differ, even for small sets
    if size < 2:
        raise ValueError(f"KID needs at least 3 cells on each side ({len(real)} real, {len(generated)} generated)")
    # Features standardised over both sets together: the figure then does not depend on the scale of one network's
    # features (an ALNet's are far from Inception's), the kernel's 1/d scale fits them, and a feature that is
    # constant on real cells cannot blow up.
    pooled = np.concatenate([real, generated])
    centre, scale = pooled.mean(axis=0), pooled.std(axis=0) + 1e-6
    with warnings.catch_warnings():  # "will save all extracted features": a few thousand vectors here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=size)
    metric.update(torch.as_tensor((real - centre) / scale, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor((generated - centre) / scale, dtype=torch.float64), real=False)
    with torch.random.fork_rng():  # the subsets are drawn with torch's global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def two_sample_accuracy(real: np.ndarray, real_subjects, generated: np.ndarray, seed: int = 0) -> dict:
    """Held-out accuracy of a real-vs-generated classifier: two folds, real cells split by subject, equal numbers
    of real and generated cells in each fold (so 0.5 is chance)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    subjects = np.array(sorted(set(real_subjects)))
    if len(subjects) < 2:
        raise ValueError("the two-sample test needs real cells of at least 2 subjects")
    half = set(rng.permutation(subjects)[: len(subjects) // 2])
    real_side = np.array([s in half for s in real_subjects])
    generated_side = rng.permutation(len(generated)) % 2 == 0
    scores = []
    for side in (True, False):
        train = _balanced(real[real_side == side], generated[generated_side == side], rng)
        test = _balanced(real[real_side != side], generated[generated_side != side], rng)
        if train is None or test is None:
            continue
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        classifier.fit(*train)
        scores.append(float(classifier.score(*test)))
    if not scores:
        raise ValueError("too few cells on one side for the two-sample test")
    return {"accuracy": float(np.mean(scores)), "folds": len(scores), "real_cells": int(len(real)),
            "generated_cells": int(len(generated)), "chance": 0.5}


def _balanced(real: np.ndarray, generated: np.ndarray, rng: np.random.Generator):
    n = min(len(real), len(generated))
    if n < 1:
        return None
    x = np.concatenate([real[rng.choice(len(real), n, replace=False)],
                        generated[rng.choice(len(generated), n, replace=False)]])
    return x, np.r_[np.zeros(n), np.ones(n)]


def held_out_rows(gan, cells) -> np.ndarray:
    """Rows of labelled real cells the GAN never saw: not its training images and, under the subject protocol,
    not of its training subjects."""
    from .store import cell_key

    seen, subjects = gan.seen_cells, gan.seen_subjects
    by_subject = gan.record["protocol"] == "subject"
    return np.array([i for i, c in enumerate(cells) if c.label is not None and cell_key(c.path.name) not in seen
                     and not (by_subject and c.subject in subjects)], dtype=np.int64)


def measure_quality(gan, trained, prepared, seed: int = 0, max_cells: int = 2000) -> dict:
    """KID and the two-sample accuracy of `gan` (a `store.TrainedGan`) against the real held-out cells of
    `prepared` (a cache at the size of `trained`, a `checkpoint.TrainedModel` trained on real cells), in the
    features of `trained`."""
    from ..device import resolve_precision
    from ..pipeline import torch_network
    from .store import generate
    from .training import generated_labels

    rows = held_out_rows(gan, prepared.cells)
    if len(rows) < 4:
        raise ValueError(f"{len(rows)} real cell(s) of this data were not seen by GAN {gan.gan_id}; the quality "
                         "figures need the split's held-out subjects (pass the data the GAN was trained from)")
    rows = np.random.default_rng(seed).permutation(rows)[:max_cells]
    labels = np.array([prepared.cells[i].label for i in rows])
    network = torch_network(trained.model, resolve_precision("32"), trained.head)
    real = np.concatenate([network(prepared.images[rows[s:s + 64]]).features for s in range(0, len(rows), 64)])
    made = generate(gan.generator, generated_labels(len(rows), labels), seed=seed, size=prepared.preprocessing.size)
    fake = np.concatenate([network(made[s:s + 64]).features for s in range(0, len(made), 64)])
    mean, std = kid(real, fake, seed=seed)
    return {"gan_id": gan.gan_id, "split": gan.split, "features_from": str(trained.path),
            "kid": mean, "kid_std": std,
            "two_sample": two_sample_accuracy(real, [prepared.cells[i].subject for i in rows], fake, seed),
            "real_cells": int(len(rows)), "real_subjects": len({prepared.cells[i].subject for i in rows})}
