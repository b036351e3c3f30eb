"""Synthetic cells in the exact C-NMC Kaggle layout — for the demo, tests and scale benchmarks only.

These images are *synthetic*: a stained cell drawn on black, not microscopy. The classes differ the way
blasts and normal lymphocytes tend to (docs/design.md, "The dataset"), with overlapping distributions so that
the task is learnable but not trivial:

- ALL (blast): larger nucleus relative to the cell, a more irregular nuclear outline, fine chromatin.
- HEM (normal): smaller, rounder nucleus, coarser clumped chromatin.

Every subject has its own stain hue and brightness, so a model can also overfit to subjects — which is what
the subject-level protocol is there to expose.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .cnmc import LABELS_CSV

SIZE = 450


@dataclass(frozen=True)
class Stain:
    nucleus: np.ndarray  # RGB in [0, 1]
    cytoplasm: np.ndarray
    brightness: float


def _subject_stain(rng: np.random.Generator) -> Stain:
    shift = rng.normal(0, 0.06, 3)
    nucleus = np.clip(np.array([0.42, 0.22, 0.55]) + shift, 0.05, 0.95)
    cytoplasm = np.clip(np.array([0.72, 0.62, 0.82]) + shift * 0.7, 0.05, 0.98)
    return Stain(nucleus, cytoplasm, float(rng.uniform(0.8, 1.15)))


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise: a coarse random grid upsampled bilinearly to SIZE×SIZE, in [0, 1]."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0


_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def draw_cell(label: int, stain: Stain, rng: np.random.Generator) -> np.ndarray:
    """One 450×450×3 uint8 image: a cell on a black background."""
    blast = label == 1
    cx, cy = SIZE / 2 + rng.normal(0, 12, 2)
    cell_r = rng.normal(95 if blast else 85, 12)
    nucleus_fraction = np.clip(rng.normal(0.82 if blast else 0.66, 0.05), 0.45, 0.95)
    irregularity = abs(rng.normal(0.09 if blast else 0.03, 0.02))
    dx, dy = _X - cx, _Y - cy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    # Outlines as radius functions of the angle: a few random harmonics make them irregular.
    cell_edge = cell_r * (1 + 0.03 * np.sin(2 * theta + rng.uniform(0, 6.3)))
    nucleus_edge = cell_r * nucleus_fraction * np.ones_like(theta)
    for k in (2, 3, 5, 7):
        nucleus_edge *= 1 + irregularity / k**0.5 * np.sin(k * theta + rng.uniform(0, 6.3))
    ncx, ncy = rng.normal(0, 0.08 * cell_r, 2)  # the nucleus sits a little off-centre
    nr = np.hypot(dx - ncx, dy - ncy)
    cell_mask = np.clip(cell_edge - r, 0, 1.5) / 1.5  # 1.5-pixel soft edge
    nucleus_mask = np.clip(nucleus_edge - nr, 0, 1.5) / 1.5
    chromatin = _smooth_noise(rng, 60 if blast else 22)  # fine (blast) vs clumped (normal) texture
    darkness = 0.75 + (0.35 if blast else 0.55) * (chromatin - 0.5)
    colour = (
        cell_mask[..., None] * (1 - nucleus_mask[..., None]) * stain.cytoplasm
        + nucleus_mask[..., None] * stain.nucleus * darkness[..., None]
    )
    colour = colour * stain.brightness + rng.normal(0, 0.015, colour.shape) * cell_mask[..., None]
    return (np.clip(colour, 0, 1) * 255).astype(np.uint8)


def write_dataset(
    out: Path | str,
    n_subjects: int = 6,
    cells_per_subject: int = 10,
    n_folds: int = 3,
    prelim_subjects: int = 2,
    final_images: int = 6,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the Kaggle layout under `out`; returns `out`.

    `n_subjects` ALL and as many HEM subjects are dealt round-robin over `n_folds` subject-disjoint folds;
    `prelim_subjects` more of each class make the labelled preliminary test set, `final_images` the
    unlabelled final one."""
    out = Path(out)
    if n_subjects < 1 or cells_per_subject < 1 or n_folds < 1:
        raise ValueError("n_subjects, cells_per_subject and n_folds must be at least 1")
    rng = np.random.default_rng(seed)
    base = out / "C-NMC_Leukemia"
    training = base / "training_data"
    for fold in range(n_folds):
        for cls in ("all", "hem"):
            (training / f"fold_{fold}" / cls).mkdir(parents=True, exist_ok=True)

    def subject_cells(subject_number: int, label: int):
        stain = _subject_stain(rng)
        for i in range(cells_per_subject):
            image, cell = divmod(i, 3)
            prefix = "" if label == 1 else "H"
            suffix = "all" if label == 1 else "hem"
            yield f"UID_{prefix}{subject_number}_{image + 1}_{cell + 1}_{suffix}.bmp", draw_cell(label, stain, rng)

    for s in range(n_subjects):
        fold = s % n_folds
        for label, cls in ((1, "all"), (0, "hem")):
            for name, pixels in subject_cells(s + 1, label):
                Image.fromarray(pixels).save(training / f"fold_{fold}" / cls / name)

    if prelim_subjects > 0:
        prelim = base / "validation_data" / "C-NMC_test_prelim_phase_data"
        prelim.mkdir(parents=True, exist_ok=True)
        rows, n = [], 0
        for s in range(prelim_subjects):
            for label in (1, 0):
                for original, pixels in subject_cells(n_subjects + s + 1, label):
                    n += 1
                    Image.fromarray(pixels).save(prelim / f"{n}.bmp")
                    rows.append((original, f"{n}.bmp", label))
        with open(prelim.parent / LABELS_CSV, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Patient_ID", "new_names", "labels"])
            writer.writerows(rows)

    if final_images > 0:
        final = base / "testing_data" / "C-NMC_test_final_phase_data"
        final.mkdir(parents=True, exist_ok=True)
        stain = _subject_stain(rng)
        for n in range(final_images):
            Image.fromarray(draw_cell(int(rng.integers(0, 2)), stain, rng)).save(final / f"{n + 1}.bmp")
    return out
