"""`alnet gan train`: one class-conditional GAN per split, on that split's training cells only.

The loop is the standard one for a hinge-loss GAN with a spectrally normalised discriminator: one discriminator
step and one generator step per batch, Adam with β1 = 0 (no momentum fighting the game), DiffAugment on every image
the discriminator sees, and a moving average of the generator's weights as the generator that is kept (it gives
visibly steadier samples than the last step's weights). Real cells also get flips and quarter turns, which leave
a cell a cell. On a GPU it runs in bf16 with channels-last tensors, as training does; on the CPU in fp32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.cache import Prepared
from ..data.cnmc import Cell
from ..data.protocols import Split
from ..data.transforms import to_float
from ..labels import ALL, HEM
from ..schema import GAN_HISTORY_FIELDS, write_atomically, write_csv
from .networks import MAX_PARAMETERS, RESOLUTIONS, Discriminator, Generator, diff_augment, parameter_count
from .store import GAN_JSON, GENERATOR, HISTORY, SAMPLES, class_counts, generate

LOG_EVERY = 25  # steps between two rows of history.csv
EMA_DECAY = 0.999


@dataclass
class GanConfig:
    resolution: int = 64  # 64, 128 or 224 pixels
    width: int = 32  # channels of the largest feature maps (the smallest have 8×)
    z_dim: int = 128
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-4
    seed: int = 0
    protocol: str = "subject"  # the splits are those of `alnet train` with the same protocol, seed, val_fraction
    val_fraction: float = 0.15

    def validate(self) -> "GanConfig":
        checks = [(self.resolution in RESOLUTIONS, f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}"),
                  (1 <= self.width <= 512, "width must be from 1 to 512"),
                  (1 <= self.z_dim <= 1024, "z_dim must be from 1 to 1024"),
                  (self.seed >= 0, "seed must be 0 or more"),
                  (self.resolution not in RESOLUTIONS
                   or parameter_count(self.resolution, self.width, self.z_dim) <= MAX_PARAMETERS,
                   f"width {self.width} at {self.resolution} px is more than {MAX_PARAMETERS:,} parameters; "
                   "lower --width"),
                  (self.steps >= 1 and self.batch_size >= 2, "steps must be at least 1 and batch size at least 2"),
                  (self.lr > 0, "lr must be positive"),
                  (self.protocol in ("subject", "paper"), "protocol must be 'subject' or 'paper'")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


def _augment_real(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips and quarter turns (one draw per batch): a cell turned or mirrored is still a cell."""
    turns = int(torch.randint(4, (1,), generator=generator))
    x = torch.rot90(x, turns, dims=(2, 3))
    return x.flip(3) if bool(torch.randint(2, (1,), generator=generator)) else x


@torch.no_grad()
def _update_average(average: Generator, current: Generator, decay: float) -> None:
    for a, c in zip(average.parameters(), current.parameters()):
        a.lerp_(c, 1 - decay)
    for a, c in zip(average.buffers(), current.buffers()):  # BatchNorm statistics: the current ones
        a.copy_(c)


def train_step(generator: Generator, discriminator: Discriminator, optimizers, real: torch.Tensor,
               labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One discriminator update (real above +1, generated below -1: the hinge loss) and one generator update
    (raise the discriminator's score of its cells), on one batch of real cells in [-1, 1]; the losses, unsynced."""
    z_dim = generator.z_dim
    fake = generator(torch.randn(len(labels), z_dim, device=real.device), labels).detach()
    d_real = discriminator(diff_augment(real), labels).float()
    d_fake = discriminator(diff_augment(fake), labels).float()
    d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    optimizers[1].zero_grad(set_to_none=True)
    d_loss.backward()
    optimizers[1].step()
    fake = generator(torch.randn(len(labels), z_dim, device=real.device), labels)
    g_loss = -discriminator(diff_augment(fake), labels).float().mean()
    optimizers[0].zero_grad(set_to_none=True)
    g_loss.backward()
    optimizers[0].step()
    return {"d_loss": d_loss, "g_loss": g_loss, "d_real": d_real, "d_fake": d_fake}


def make_optimizers(generator: Generator, discriminator: Discriminator, lr: float) -> list[torch.optim.Adam]:
    """Adam with β1 = 0 for both (no momentum fighting the game), generator first."""
    return [torch.optim.Adam(m.parameters(), lr=lr, betas=(0.0, 0.99)) for m in (generator, discriminator)]


def subjects_of(cells: list[Cell], rows) -> list[str]:
    return sorted({cells[i].subject for i in rows if cells[i].subject is not None})


def train_gan(prepared: Prepared, split: Split, config: GanConfig, folder: Path | str,
              data_root: Path | str | None = None, log: Callable[[str], None] = print,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """Train the GAN of `split` on its training rows of `prepared` (a cache at the GAN's resolution) and write it to
    `folder` (`store`'s layout); returns gan.json's content."""
    config.validate()
    if prepared.preprocessing.size != config.resolution:
        raise ValueError(f"the cache holds {prepared.preprocessing.size} px images; the GAN needs "
                         f"{config.resolution} px")
    cells, rows = prepared.cells, np.asarray(split.train)
    if len(rows) < 2:
        raise ValueError(f"{split.name}: {len(rows)} training cell(s); a GAN needs at least 2")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    torch.manual_seed(config.seed)
    draw = torch.Generator().manual_seed(config.seed)
    images = torch.from_numpy(np.ascontiguousarray(prepared.images[rows])).to(device)
    labels = torch.tensor([cells[i].label for i in rows], dtype=torch.long, device=device)

    generator = Generator(config.resolution, config.width, config.z_dim).to(device)
    discriminator = Discriminator(config.resolution, config.width).to(device)
    if on_gpu:
        generator, discriminator = (m.to(memory_format=torch.channels_last) for m in (generator, discriminator))
    average = copy.deepcopy(generator).eval()
    optimizers = make_optimizers(generator, discriminator, config.lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    history, start = [], time.perf_counter()
    for step in range(1, config.steps + 1):
        index = torch.randint(len(rows), (config.batch_size,), generator=draw).to(device)
        real = _augment_real(to_float(images[index]) * 2 - 1, draw)
        with autocast:
            losses = train_step(generator, discriminator, optimizers, real, labels[index])
        # A short warm-up of the average: early on it follows the generator closely.
        _update_average(average, generator, min(EMA_DECAY, (1 + step) / (10 + step)))
        if step % LOG_EVERY == 0 or step == config.steps:  # the only synchronisation with a GPU: every 25 steps
            losses = {name: float(value.detach().mean()) for name, value in losses.items()}
            history.append({"step": step, **{k: f"{v:.5f}" for k, v in losses.items()},
                            "seconds": f"{time.perf_counter() - start:.2f}"})
            if not all(np.isfinite(v) for v in losses.values()):
                raise ValueError(f"{split.name}: the GAN's losses became NaN at step {step}; lower --lr")
        if progress:
            progress(step, config.steps)
    seconds = time.perf_counter() - start

    average = average.float().to("cpu").to(memory_format=torch.contiguous_format)
    state = {k: v.contiguous() for k, v in average.state_dict().items()}
    write_atomically(folder / GENERATOR, lambda p: torch.save({"state_dict": state}, p))
    write_csv(folder / HISTORY, history, GAN_HISTORY_FIELDS)
    write_atomically(folder / SAMPLES, lambda p: write_samples(
        average, prepared.images[rows], labels.cpu().numpy(), p, config.seed,
        f"{split.name}: generated (left) and real training cells (right)"))
    record = {
        "gan_id": hashlib.sha256((folder / GENERATOR).read_bytes()).hexdigest()[:8],
        "split": split.name, "protocol": config.protocol, "note": split.note,
        "settings": asdict(config),
        "trained_on": {"images": int(len(rows)), "all": int((labels == ALL).sum()), "hem": int((labels == HEM).sum()),
                       "subjects": subjects_of(cells, rows), "names": sorted(cells[i].path.name for i in rows)},
        # What it never saw: the split's validation and test subjects (a run checks them against its own split).
        "held_out_subjects": subjects_of(cells, np.r_[split.val, split.test]),
        "data": str(Path(data_root).resolve()) if data_root else None, "cache": prepared.path.name,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "precision": "bf16" if on_gpu else "32",
        "seconds": seconds, "images_per_s": config.steps * config.batch_size / seconds,
    }
    write_atomically(folder / GAN_JSON, lambda p: p.write_text(json.dumps(record, indent=2)))  # marks it finished
    log(f"{split.name}: GAN {record['gan_id']} trained in {seconds:.0f} s "
        f"({record['images_per_s']:.0f} images/s), written to {folder}")
    return record


def write_samples(generator: Generator, real: np.ndarray, real_labels: np.ndarray, path: Path, seed: int,
                  title: str, per_class: int = 8) -> None:
    """A grid: per class, a row of generated cells beside a row of real training cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 3.6), squeeze=False)
    rng = np.random.default_rng(seed)
    for row, (label, name) in enumerate(((ALL, "ALL"), (HEM, "HEM"))):
        generated = generate(generator, np.full(per_class, label), seed=seed + row)
        of_class = np.flatnonzero(real_labels == label)
        shown = real[rng.choice(of_class, size=min(per_class, len(of_class)), replace=False)] if len(of_class) \
            else np.zeros((0, *generated.shape[1:]), np.uint8)
        for column, (pictures, what) in enumerate(((generated, "generated"), (shown, "real"))):
            ax = axes[row, column]
            strip = np.concatenate(list(pictures), axis=1) if len(pictures) else np.zeros((8, 8, 3), np.uint8)
            ax.imshow(strip)
            ax.set_title(f"{name}, {what}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def generated_labels(n: int, train_labels: np.ndarray) -> np.ndarray:
    """n labels in the class shares of a training side, ALL first."""
    counts = class_counts(n, train_labels)
    return np.concatenate([np.full(counts.get(label, 0), label, dtype=np.int64) for label in (ALL, HEM)])
