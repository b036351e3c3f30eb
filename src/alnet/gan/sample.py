"""`alnet gan sample`: generated cells as files, in the Kaggle layout, named so that they are never taken for real
cells (`data.cnmc.GENERATED_NAME`), with a manifest (`schema.GENERATED`) of where each came from."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..data.cnmc import CLASS_NAMES, generated_name
from ..labels import ALL, HEM, NAMES
from ..schema import GENERATED_FIELDS, write_csv
from .store import TrainedGan, generate

MANIFEST = "generated.csv"
FOLD = "fold_0"  # the Kaggle layout has training folds only; the manifest, not the folder, says which split


def class_folder(out: Path, label: int) -> Path:
    return out / "C-NMC_Leukemia" / "training_data" / FOLD / CLASS_NAMES[label]


def sample_cells(gan: TrainedGan, n_per_class: int, out: Path, seed: int = 0, classes=(ALL, HEM),
                 progress: Callable[[int, int], None] | None = None, chunk: int = 256) -> list[dict]:
    """Write `n_per_class` generated cells of each class below `out`; returns the manifest rows."""
    rows, done, total = [], 0, n_per_class * len(classes)
    for label in classes:
        folder = class_folder(out, label)
        folder.mkdir(parents=True, exist_ok=True)
        # Each class is its own draw (seed + label), so asking for more cells of one class keeps the first ones.
        for start in range(0, n_per_class, chunk):
            count = min(chunk, n_per_class - start)
            cells = generate(gan.generator, np.full(count, label), seed=_draw_seed(seed, label, start))
            for offset, pixels in enumerate(cells):
                index = start + offset
                name = generated_name(gan.gan_id, seed, index, label)
                Image.fromarray(pixels).save(folder / name)
                rows.append({"path": str((folder / name).relative_to(out)), "label": NAMES[label],
                             "gan_id": gan.gan_id, "split": gan.split, "seed": seed, "index": index})
            done += count
            if progress:
                progress(done, total)
    write_csv(out / MANIFEST, rows, GENERATED_FIELDS)
    return rows


def _draw_seed(seed: int, label: int, start: int) -> int:
    return (seed * 1_000_003 + label * 7_919 + start) % 2**63
