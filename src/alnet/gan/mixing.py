"""`alnet train --synthetic GAN_DIR`: generated cells join one split's training side, and nothing else.

Each split takes the GAN trained on its own training cells. Before a single cell is drawn, the GAN's record is
checked against the split: a GAN that saw any validation or test cell of the split (or, under the subject
protocol, any of their subjects) is refused. The drawn cells are appended after the real rows of the cache and
added to the training rows only, so validation, the test pass, calibration, the review band, the input gate's
fitting and the int8 calibration (which all take the split's own rows) never see one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.cnmc import Cell
from ..data.protocols import Split
from .store import GanError, TrainedGan, cell_key, generate, read_gan, round_ratio, split_folder
from .training import generated_labels


@dataclass
class Mixed:
    """A split's training input with generated cells appended."""

    images: torch.Tensor  # the real cache followed by the generated cells
    labels: torch.Tensor
    train: np.ndarray  # real training rows + the generated rows
    record: dict  # what metrics.json says of it


def gan_for_split(gan_dir: Path | str, split: Split, cells: list[Cell], config) -> TrainedGan:
    """The GAN of `split` in `gan_dir` for a run of `config` (a RunConfig), refused (GanError) when it was drawn
    from other splits (another protocol, seed or validation share) or saw any of the split's validation or test
    cells (by cell, whatever the file's format) or, under the subject protocol, any of their subjects."""
    if not Path(gan_dir).is_dir():
        raise GanError(f"{gan_dir}: not a folder; pass the --out folder of `alnet gan train`")
    folder = split_folder(gan_dir, split.name)
    if not (folder / "gan.json").is_file():
        raise GanError(f"{folder}: no GAN for split {split.name}; train one with `alnet gan train --data DATA "
                       f"--split {split.name} --out {gan_dir}` (same --protocol and --seed as this run)")
    gan = read_gan(folder)
    if gan.split != split.name:
        raise GanError(f"{folder}: its gan.json is for split {gan.split}, not {split.name}; train the GAN of "
                       f"{split.name} into this folder")
    settings = gan.record["settings"]
    drawn = (gan.record["protocol"], settings["seed"], settings["val_fraction"])
    wanted = (config.protocol, config.seed, config.val_fraction)
    if drawn != wanted:
        raise GanError(f"{folder}: this GAN's splits were drawn with protocol, seed, val_fraction {drawn}, this run's "
                       f"with {wanted}; train the GAN with the run's --protocol and --seed")
    held_out = np.r_[split.val, split.test].astype(int)
    seen_images = sorted({cell_key(cells[i].path.name) for i in held_out} & gan.seen_cells)
    if seen_images:
        raise GanError(f"{folder}: this GAN was trained on {len(seen_images)} validation or test cell(s) of split "
                       f"{split.name} (e.g. {seen_images[0]}); train it with the run's --protocol and --seed")
    if config.protocol == "subject":
        seen_subjects = sorted({cells[i].subject for i in held_out} & gan.seen_subjects)
        if seen_subjects:
            raise GanError(f"{folder}: this GAN saw subject(s) {', '.join(seen_subjects[:5])}, which are validation "
                           f"or test subjects of split {split.name} here; train it with the run's --protocol, "
                           "--seed and data")
    return gan


def generated_count(ratio: float, split: Split) -> int:
    """How many generated cells `ratio` adds to the split's training side; GanError when it rounds to none."""
    count = round_ratio(ratio, len(split.train))
    if count < 1:
        raise GanError(f"a synthetic ratio of {ratio!r} gives no generated cell for the {len(split.train)} training "
                       f"cells of split {split.name}; raise --synthetic-ratio or leave out --synthetic")
    return count


def mix(gan: TrainedGan, split: Split, images: torch.Tensor, labels: torch.Tensor, ratio: float, seed: int,
        size: int) -> Mixed:
    """`round(ratio × training cells)` generated cells in the training side's class shares, drawn with `seed`,
    appended after the real rows."""
    train_labels = labels[torch.from_numpy(np.asarray(split.train, dtype=np.int64))].numpy()
    made_labels = generated_labels(generated_count(ratio, split), train_labels)
    made = torch.from_numpy(generate(gan.generator, made_labels, seed=seed, size=size))
    first = len(images)
    new_rows = np.arange(first, first + len(made), dtype=np.int64)
    record = {"split": split.name, "gan_id": gan.gan_id, "gan": str(gan.folder), "generated": int(len(made)),
              "generated_all": int((made_labels == 1).sum()), "generated_hem": int((made_labels == 0).sum()),
              "real_training_cells": int(len(split.train)), "gan_resolution": gan.resolution, "seed": seed}
    return Mixed(torch.cat([images, made.to(images.device)]),
                 torch.cat([labels, torch.from_numpy(made_labels).to(labels.device)]),
                 np.concatenate([np.asarray(split.train, dtype=np.int64), new_rows]), record)
