"""A GAN folder on disk, read back as hostile input, and what is drawn from it.

    GAN_DIR/<split>/gan.json       settings, the split, the cells and subjects it was trained on, times (written
                                   last: its presence marks a finished GAN)
    GAN_DIR/<split>/generator.pt   the generator's weights (the moving average of its training), tensors only
    GAN_DIR/<split>/history.csv    discriminator and generator loss every LOG_EVERY steps
    GAN_DIR/<split>/samples.png    generated cells of each class beside real training cells
    GAN_DIR/<split>/quality.json   written by `alnet gan quality`: KID and the two-sample test

One GAN per split: a run that mixes generated cells into a split's training side takes that split's GAN, which
never saw the split's validation or test cells (`mixing.gan_for_split`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..schema import check_torch_file
from .networks import MAX_PARAMETERS, RESOLUTIONS, Generator, parameter_count

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
    def seen_cells(self) -> set[str]:
        """The cells it learned from, by `cell_key` (a .bmp and a .png copy of one cell are one cell)."""
        return {cell_key(name) for name in self.record["trained_on"]["names"]}


def cell_key(name: str) -> str:
    """A cell's identity across copies of the dataset: its file name without the suffix, in lower case."""
    return Path(name).stem.lower()


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


SPLIT_NAME = re.compile(r"^(fold_[0-9]{1,3}|prelim)$")
GAN_ID = re.compile(r"^[0-9a-f]{8}$")


def _whole(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _checked_record(record, path: Path, fix: str) -> dict:
    def fail(what: str):
        raise GanError(f"{path}: {what}; {fix}")

    if not isinstance(record, dict):
        fail("not a GAN record")
    settings, trained_on = record.get("settings"), record.get("trained_on")
    if not isinstance(settings, dict) or not isinstance(trained_on, dict):
        fail("no settings or trained_on entry")
    if not (_whole(settings.get("resolution"), 0, 10**4) and settings["resolution"] in RESOLUTIONS):
        fail(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}")
    for key, low, top in (("width", 1, 512), ("z_dim", 1, 1024), ("seed", 0, 2**63)):
        if not _whole(settings.get(key), low, top):
            fail(f"settings.{key} must be a whole number from {low} to {top}")
    if not isinstance(settings.get("val_fraction"), float) or not 0 < settings["val_fraction"] < 1:
        fail("settings.val_fraction must be a number in (0, 1)")
    if parameter_count(settings["resolution"], settings["width"], settings["z_dim"]) > MAX_PARAMETERS:
        fail(f"its settings ask for more than {MAX_PARAMETERS:,} parameters")
    for key in ("subjects", "names"):
        values = trained_on.get(key)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            fail(f"trained_on.{key} must be a list of text")
    if not isinstance(record.get("gan_id"), str) or not GAN_ID.match(record["gan_id"]):
        fail("gan_id must be 8 hexadecimal digits")
    if not isinstance(record.get("split"), str) or not SPLIT_NAME.match(record["split"]) \
            or record["split"] != path.parent.name:
        fail(f"split must be the name of its folder ({path.parent.name})")
    if record.get("protocol") not in ("subject", "paper") or settings.get("protocol") != record["protocol"]:
        fail("protocol must be subject or paper, the same in settings")
    return record


def read_gan(folder: Path | str) -> TrainedGan:
    """A finished GAN (gan.json + generator.pt), checked as hostile input: sizes capped (on disk and unpacked),
    JSON only, the network's size bounded before it is built, weights as tensors only (a file cannot run code
    when it is opened), the weights the record's (`gan_id` is their file's sha256), shapes as the record says,
    every value finite."""
    folder = Path(folder)
    fix = "pass a folder written by `alnet gan train`"
    if folder.is_symlink() or not folder.is_dir():
        raise GanError(f"{folder}: not a folder (or a link); {fix}")
    path = folder / GAN_JSON
    try:
        record = json.loads(_read_capped(path, MAX_JSON_BYTES, fix).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, or a number of 5,000 digits
        raise GanError(f"{path}: not JSON alnet wrote; {fix}") from None
    record = _checked_record(record, path, fix)
    settings = record["settings"]
    weights = folder / GENERATOR
    data = _read_capped(weights, MAX_WEIGHTS_BYTES, fix)
    if hashlib.sha256(data).hexdigest()[:8] != record["gan_id"]:
        raise GanError(f"{weights}: not the generator of GAN {record['gan_id']} (its sha256 differs); {fix}")
    try:
        check_torch_file(weights, MAX_WEIGHTS_BYTES)
    except ValueError as err:  # a zip archive that would unpack to more than a generator can be
        raise GanError(f"{weights}: {err}; {fix}") from None
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or set(state) != {"state_dict"}:
            raise ValueError("not {'state_dict': …}")
        generator = Generator(settings["resolution"], settings["width"], settings["z_dim"])
        generator.load_state_dict(state["state_dict"])
    except Exception as err:  # unpickling refused, too big unpacked, wrong keys or shapes: not this GAN's weights
        raise GanError(f"{weights}: not the generator gan.json describes ({type(err).__name__}); {fix}") from None
    if not all(torch.isfinite(t).all() for t in generator.state_dict().values() if t.is_floating_point()):
        raise GanError(f"{weights}: holds values that are not finite (NaN or infinity); {fix}")
    return TrainedGan(folder, record, generator.eval())


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
