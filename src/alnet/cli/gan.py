"""`alnet gan train | sample | quality`: generated cells, from one split's training subjects only."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    CacheOption,
    DataOption,
    ProgressOption,
    WorkersOption,
    fail,
    handles_errors,
    prepare_data,
    print_table,
    progress_bar,
    result,
    say,
)

app = typer.Typer(help="Generated cells: train a class-conditional GAN on one split's training subjects, draw "
                  "cells from it, measure how close they are to real ones. Train with them: alnet train "
                  "--synthetic GAN_DIR.", no_args_is_help=True)

GanDirArgument = Annotated[Path, typer.Argument(help="A folder written by `alnet gan train` (one GAN per split).")]
TrainSplitOption = Annotated[Optional[str], typer.Option(
    "--split", help="Train the GAN of one split only: fold_0, fold_1, … or prelim (default: every split of the "
    "protocol).")]
SplitOption = Annotated[Optional[str], typer.Option(
    "--split", help="Which split's GAN: fold_0, fold_1, … or prelim (default: the only one, else fold_0).")]
OWN_FILES = {"gan.json", "generator.pt", "history.csv", "samples.png", "quality.json"}


def _check_split_folder(folder: Path) -> None:
    """A split's folder is alnet's to write only when it is new, or holds nothing but the regular files `gan train`
    writes (a link, pipe or folder under one of their names is refused: never written through, never waited on)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        fail(f"{folder}: is a link or a file; pass a --out folder alnet can write the GAN's folders into")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")
                         and (p.name not in OWN_FILES or p.is_symlink() or not p.is_file()))
        if foreign:
            fail(f"{folder}: holds entries alnet did not write ({', '.join(foreign[:3])}); pick another --out")


def _chosen_split(gan_dir: Path, split: str | None) -> str:
    from ..gan.store import finished_splits

    found = finished_splits(gan_dir)
    if not found:
        fail(f"{gan_dir}: no finished GAN (no <split>/gan.json); train one with alnet gan train --out {gan_dir}")
    if split is None:
        chosen = found[0] if len(found) == 1 else ("fold_0" if "fold_0" in found else found[0])
        if len(found) > 1:
            say(f"{gan_dir}: using the GAN of {chosen} (it has {', '.join(found)}; choose one with --split)")
        return chosen
    if split not in found:
        fail(f"{gan_dir}: no finished GAN for split {split}; it has {', '.join(found)}")
    return split


def _figure(value) -> str:
    """A number of a kept GAN's record as the table shows it ("–" when the record has none)."""
    return f"{value:.0f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


@app.command("train")
@handles_errors
def train(
    data: DataOption,
    out_dir: Annotated[Path, typer.Option("--out", help="GAN folder: one sub-folder per split.")],
    split: TrainSplitOption = None,
    protocol: Annotated[str, typer.Option(help="subject or paper: the splits of `alnet train` with the same "
                                          "protocol and seed.")] = "subject",
    seed: Annotated[int, typer.Option(min=0, help="Random seed (the same as the runs that will use the GAN).")]
    = 0,
    resolution: Annotated[int, typer.Option(help="Side of the generated cells: 64, 128 or 224 px.")] = 64,
    width: Annotated[int, typer.Option(min=1, max=512, help="Channels of the largest feature maps.")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="Training steps (one discriminator and one generator update "
                                       "each).")] = 3000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Real cells per step.")] = 32,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate of both networks.")] = 2e-4,
    cache: CacheOption = None,
    workers: WorkersOption = None,
    progress: ProgressOption = True,
):
    """Train a class-conditional GAN per split on that split's TRAINING cells only (never its validation or test
    subjects); a split whose GAN is already finished is kept."""
    from ..data.protocols import make_splits
    from ..data.transforms import Preprocessing
    from ..gan.store import GAN_JSON, read_gan, split_folder
    from ..gan.training import GanConfig, train_gan

    config = GanConfig(resolution=resolution, width=width, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                       protocol=protocol).validate()
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        fail(f"{out_dir}: is a link or a file; pass a folder for the GANs")
    where, data_at = out_dir.absolute().resolve(), data.absolute().resolve()
    if where.is_relative_to(data_at) or data_at.is_relative_to(where):
        fail(f"{out_dir}: inside the dataset {data} (or holding it); write the GANs somewhere else")
    prepared = prepare_data(data, cache, workers, Preprocessing(size=resolution), progress=progress)
    splits = make_splits(protocol, prepared.cells, seed, config.val_fraction)
    if split is not None:
        splits = [s for s in splits if s.name == split]
        if not splits:
            fail(f"no split {split} under the {protocol} protocol here; choose from "
                 f"{', '.join(s.name for s in make_splits(protocol, prepared.cells, seed, config.val_fraction))}")
    for chosen in splits:
        _check_split_folder(split_folder(out_dir, chosen.name))
    rows = []
    for chosen in splits:
        folder = split_folder(out_dir, chosen.name)
        if (folder / GAN_JSON).is_file():
            record = read_gan(folder).record
            changed = [f"{key} {record['settings'].get(key)!r} → {value!r}" for key, value in asdict(config).items()
                       if record["settings"].get(key) != value]
            if record.get("cache") != prepared.path.name:
                changed.append("the data (files, sizes, dates or labels)")
            if changed:
                fail(f"{folder}: a GAN trained with other settings is there ({'; '.join(changed)}); delete that "
                     "folder to train it again, or pick another --out")
            say(f"{chosen.name}: a finished GAN with these settings is already in {folder}, kept")
        else:
            say(f"{chosen.name}: training a GAN on {len(chosen.train)} training cells "
                f"({len({prepared.cells[i].subject for i in chosen.train})} subjects), {steps} steps at "
                f"{resolution} px")
            with progress_bar(f"GAN {chosen.name}", disable=not progress) as bar:
                task = bar.add_task("steps", total=steps)
                record = train_gan(prepared, chosen, config, folder, data_root=data, log=say,
                                   progress=lambda done, total: bar.update(task, completed=done))
        rows.append([chosen.name, record["gan_id"], str(len(record["trained_on"]["names"])),
                     str(len(record["trained_on"]["subjects"])), _figure(record.get("seconds")),
                     _figure(record.get("images_per_s"))])
    print_table(f"GANs in {out_dir} ({protocol} protocol, seed {seed})",
                ["split", "GAN", "training cells", "subjects", "seconds", "images/s"], rows)
    result(f"train with them: alnet train --data {data} --protocol {protocol} --seed {seed} --synthetic {out_dir}")


@app.command("sample")
@handles_errors
def sample(
    gan_dir: GanDirArgument,
    n: Annotated[int, typer.Option("--n", min=1, max=1_000_000, help="Cells per class.")],
    out_dir: Annotated[Path, typer.Option("--out", help="A new or empty folder: the cells in the Kaggle layout "
                                          "and generated.csv.")],
    split: SplitOption = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the draw (the same seed gives the same cells).")] = 0,
    cell_class: Annotated[str, typer.Option("--class", help="all, hem or both.")] = "both",
    progress: ProgressOption = True,
):
    """Write generated cells as files (GAN_<id>_s<seed>_<n>_all|hem.png, never mistaken for real cells), with a
    manifest. `alnet info` and `verify` count them as generated; training never takes them as data."""
    import shutil

    from ..gan.sample import sample_cells
    from ..gan.store import read_gan
    from ..labels import ALL, HEM

    classes = {"all": (ALL,), "hem": (HEM,), "both": (ALL, HEM)}.get(cell_class.lower())
    if classes is None:
        fail(f"--class {cell_class}: choose all, hem or both")
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        fail(f"{out_dir}: exists and is not an empty folder; pick a new or empty folder for the generated cells")
    chosen = _chosen_split(gan_dir, split)
    gan = read_gan(gan_dir / chosen)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    needed = n * len(classes) * gan.resolution ** 2 * 3  # PNG: at most about the raw size
    if needed > 0.9 * shutil.disk_usage(existing).free:
        fail(f"{out_dir}: {n * len(classes):,} cells need up to {needed / 2**30:.1f} GiB; ask for fewer or free space")
    with progress_bar("generating cells", disable=not progress) as bar:
        task = bar.add_task("cells", total=n * len(classes))
        rows = sample_cells(gan, n, out_dir, seed, classes,
                            progress=lambda done, total: bar.update(task, completed=done))
    result(f"wrote {len(rows):,} generated cells of GAN {gan.gan_id} (split {gan.split}, {gan.resolution} px) to "
           f"{out_dir}, listed in {out_dir / 'generated.csv'}")


@app.command("quality")
@handles_errors
def quality(
    gan_dir: GanDirArgument,
    data: DataOption,
    features_from: Annotated[Path, typer.Option(
        "--features-from", help="An ALNet run directory trained on real cells (same protocol and seed: the split's "
        "own checkpoint is used) or one checkpoint; its penultimate features are compared.")],
    split: SplitOption = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the draw and of the two-sample test's halves.")] = 0,
    cache: CacheOption = None,
    workers: WorkersOption = None,
    progress: ProgressOption = True,
):
    """KID and the two-sample accuracy (0.5 = real and generated cannot be told apart) of a split's GAN, on the
    real cells of subjects it never saw, in the features of an ALNet trained on real cells."""
    from ..checkpoint import load_trained_model
    from ..gan.quality import measure_quality
    from ..gan.store import QUALITY, read_gan
    from ..schema import write_atomically
    from ..train.rundir import RunDir

    chosen = _chosen_split(gan_dir, split)
    gan = read_gan(gan_dir / chosen)
    checkpoint = features_from
    if features_from.is_dir():
        checkpoint = RunDir(features_from).chosen_checkpoint(chosen)
        if checkpoint is None:
            fail(f"{features_from}: no finished fold {chosen}; pass a run trained with the same protocol and seed, "
                 "or one checkpoint")
    target = gan_dir / chosen / QUALITY
    if target.exists() and not target.is_symlink() and not target.is_file():
        fail(f"{target}: is a folder or a pipe; move it away so that the figures can be written")
    trained = load_trained_model(checkpoint)
    if trained.config.get("synthetic"):
        fail(f"{checkpoint}: was trained with generated cells; the quality figures need an ALNet trained on real "
             "cells only")
    prepared = prepare_data(data, cache, workers, trained.preprocessing, progress=progress)
    figures = measure_quality(gan, trained, prepared, seed=seed)
    write_atomically(target, lambda p: p.write_text(json.dumps(figures, indent=2)))
    two = figures["two_sample"]
    print_table(f"GAN {gan.gan_id} ({chosen}) against {figures['real_cells']} real cells of "
                f"{figures['real_subjects']} held-out subjects",
                ["KID", "± std", "two-sample accuracy", "chance"],
                [[f"{figures['kid']:.4f}", f"{figures['kid_std']:.4f}", f"{two['accuracy']:.3f}", "0.500"]], left=0)
    result("KID: 0 when the generated cells' features are distributed as the real ones'; features are standardised "
           "over both sets, so it compares GANs within one feature extractor, not with published FID or KID. "
           "Two-sample accuracy: 0.5 when a classifier cannot tell them apart, 1.0 when it always can.")
    result(f"written to {target}")
