"""A GAN folder on disk, read back as hostile input, and what is drawn from it.

    GAN_DIR/<split>/gan.json       settings, the split, the cells and subjects it was trained on, times (written
                                   last: its presence marks a finished GAN)
    GAN_DIR/<split>/generator.pt   the generator's weights (the moving average of its training), tensors only
    GAN_DIR/<split>/history.csv    discriminator and generator loss every LOG_EVERY steps
    GAN_DIR/<split>/samples.png    generated cells of each class beside real training cells
    GAN_DIR/<split>/quality.json   written by `alnet gan quality`: KID and the two-sample test

One GAN per split: a run that mixes generated cells into a split's training side takes that split's GAN, which
never saw the split's validation or test cells (`check_gan_for_split`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .networks import RESOLUTIONS, Generator

MAX_JSON_BYTES = 64 * 2**20  # gan.json of the full C-NMC training set (10,661 names) is under 1 MiB
MAX_WEIGHTS_BYTES = 2**30
GAN_JSON, GENERATOR, HISTORY, SAMPLES, QUALITY = "gan.json", "generator.pt", "history.csv", "samples.png", \
    "quality.json"


class GanError(ValueError):
    """A GAN folder alnet cannot use; the message names the file and the fix."""


@dataclass
class TrainedGan:
    """A finished GAN of one split, as read from its folder."""

    folder: Path
    record: dict  # gan.json
    generator: Generator  # evaluation mode, CPU

    @property
    def gan_id(self) -> str:
        return self.record["gan_id"]

    @property
    def split(self) -> str:
        return self.record["split"]

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    @property
    def seen_subjects(self) -> set[str]:
        return set(self.record["trained_on"]["subjects"])

    @property
    def seen_names(self) -> set[str]:
        return set(self.record["trained_on"]["names"])


def split_folder(gan_dir: Path | str, split: str) -> Path:
    return Path(gan_dir) / split


def finished_splits(gan_dir: Path | str) -> list[str]:
    gan_dir = Path(gan_dir)
    if not gan_dir.is_dir():
        return []
    return sorted(p.name for p in gan_dir.iterdir() if p.is_dir() and not p.is_symlink() and (p / GAN_JSON).is_file())


def _read_capped(path: Path, limit: int, fix: str) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise GanError(f"{path}: missing or not a regular file; {fix}")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise GanError(f"{path}: larger than {limit // 2**20} MiB, not a file alnet wrote; {fix}")
    return data


def _checked_record(record, path: Path, fix: str) -> dict:
    def fail(what: str):
        raise GanError(f"{path}: {what}; {fix}")

    if not isinstance(record, dict):
        fail("not a GAN record")
    settings = record.get("settings")
    trained_on = record.get("trained_on")
    if not isinstance(settings, dict) or not isinstance(trained_on, dict):
        fail("no settings or trained_on entry")
    if settings.get("resolution") not in RESOLUTIONS:
        fail(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}")
    for key, top in (("width", 512), ("z_dim", 1024)):
        value = settings.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            fail(f"{key} must be a whole number from 1 to {top}")
    for key in ("subjects", "names"):
        values = trained_on.get(key)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            fail(f"trained_on.{key} must be a list of text")
    for key in ("gan_id", "split", "protocol"):
        if not isinstance(record.get(key), str) or not record[key].isprintable() or len(record[key]) > 100:
            fail(f"{key} must be short printable text")
    return record


def read_gan(folder: Path | str) -> TrainedGan:
    """A finished GAN (gan.json + generator.pt), checked: sizes capped, JSON only, weights as tensors only (a file
    cannot run code when it is opened), shapes as the record says."""
    folder = Path(folder)
    fix = "pass a folder written by `alnet gan train`"
    path = folder / GAN_JSON
    try:
        record = json.loads(_read_capped(path, MAX_JSON_BYTES, fix).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise GanError(f"{path}: not JSON; {fix}") from None
    record = _checked_record(record, path, fix)
    settings = record["settings"]
    weights = folder / GENERATOR
    _read_capped_size(weights, MAX_WEIGHTS_BYTES, fix)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        generator = Generator(settings["resolution"], settings["width"], settings["z_dim"])
        generator.load_state_dict(state["state_dict"])
    except Exception as err:  # unpickling refused, wrong keys or shapes: all mean "not this GAN's weights"
        raise GanError(f"{weights}: not the generator gan.json describes ({type(err).__name__}); {fix}") from None
    return TrainedGan(folder, record, generator.eval())


def _read_capped_size(path: Path, limit: int, fix: str) -> None:
    if path.is_symlink() or not path.is_file():
        raise GanError(f"{path}: missing or not a regular file; {fix}")
    if path.stat().st_size > limit:
        raise GanError(f"{path}: larger than {limit // 2**20} MiB, not a file alnet wrote; {fix}")


def write_atomically(path: Path, write) -> None:
    """`write(temporary path)`, then rename into place: a killed process never leaves a half-written file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def class_counts(n: int, labels: np.ndarray) -> dict[int, int]:
    """n cells split between the classes in the shares of `labels` (largest remainder), e.g. generated cells in
    the class shares of the training side they join."""
    classes, counts = np.unique(np.asarray(labels).astype(int), return_counts=True)
    exact = counts * n / counts.sum()
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    return {int(c): int(t) for c, t in zip(classes, take)}


@torch.no_grad()
def generate(generator: Generator, labels: np.ndarray, seed: int, size: int | None = None, batch: int = 64,
             device: torch.device | str = "cpu") -> np.ndarray:
    """Generated cells of the given labels as uint8 N×S×S×3 (S: `size`, else the GAN's resolution), the same for
    the same seed. A size other than the GAN's is reached by antialiased bilinear resizing."""
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    noise = torch.Generator().manual_seed(seed)
    size = size or generator.resolution
    generator = generator.to(device).eval()
    out = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), batch):
        y = labels[start:start + batch]
        z = torch.randn(len(y), generator.z_dim, generator=noise)
        images = generator(z.to(device), y.to(device)).float()
        if size != generator.resolution:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                                     align_corners=False)
        images = ((images + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
        out[start:start + len(y)] = images.permute(0, 2, 3, 1).cpu().numpy()
    return out


def round_ratio(ratio: float, n: int) -> int:
    return int(math.floor(ratio * n + 0.5))
