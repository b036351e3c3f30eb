"""Commands that look at and prepare data: `info`, `prepare`, `synth`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    CacheOption,
    ProgressOption,
    WorkersOption,
    fail,
    handles_errors,
    out,
    prepare_data,
    print_problems,
    print_table,
    result,
    scan_dataset,
)

DataRoot = Annotated[Path, typer.Argument(help="Folder holding a C-NMC dataset (Kaggle or TCIA layout).")]


@handles_errors
def info(
    data_root: DataRoot,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    problems: Annotated[bool, typer.Option("--problems", help="List every problem found, not just the first 20.")]
    = False,
):
    """Summarise a C-NMC dataset: images and subjects per split, fold and class."""
    from ..data.cnmc import summarize

    dataset = scan_dataset(data_root)
    summary = summarize(dataset.cells)
    if as_json:
        summary["layout"] = dataset.layout.name
        summary["problems"] = [str(p) for p in dataset.problems]
        out.print_json(json.dumps(summary))
        return
    rows = [[split, fold, cls, str(counts["images"]), str(counts["subjects"])]
            for split, folds in summary["by_split"].items()
            for fold, classes in folds.items()
            for cls, counts in classes.items()]
    rows.append(["total", "", "", str(summary["images"]), str(summary["subjects"])])
    print_table(f"C-NMC dataset at {data_root} ({dataset.layout.name} layout)",
                ["split", "fold", "class", "images", "subjects"], rows, bold_rows={len(rows) - 1}, left=3)
    print_problems(dataset.problems, "problem(s)", limit=len(dataset.problems) if problems else 20)


@handles_errors
def prepare(
    data_root: DataRoot,
    cache: CacheOption = None,
    size: Annotated[int, typer.Option(min=32, max=4096, help="Side of the stored square images, in pixels.")] = 224,
    crop: Annotated[float, typer.Option(min=0.05, max=1.0,
                                        help="Fraction of the short side kept by the centre crop.")] = 1.0,
    workers: WorkersOption = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of skipping it.")] = False,
    progress: ProgressOption = True,
):
    """Decode every image once (centre crop, resize) into a uint8 cache that training reads from."""
    from ..data.transforms import Preprocessing

    prepared = prepare_data(data_root, cache, workers, Preprocessing(size=size, crop=crop), strict, progress)
    state = "reused" if prepared.reused else "built"
    result(f"{state} cache {prepared.path}: {len(prepared.cells)} images of {size}x{size}, "
           f"{prepared.images.nbytes / 2**20:.0f} MiB")
    for note, count in sorted(prepared.notes.items()):
        result(f"  {count} image(s) {note}")


@handles_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the synthetic dataset (Kaggle layout).")],
    n_subjects: Annotated[int, typer.Option(help="Subjects per class in the training folds.")] = 6,
    cells_per_subject: Annotated[int, typer.Option(help="Images per subject.")] = 10,
    folds: Annotated[int, typer.Option(help="Subject-disjoint training folds.")] = 3,
    prelim_subjects: Annotated[int, typer.Option(help="Subjects per class in the labelled preliminary test set.")]
    = 2,
    final_images: Annotated[int, typer.Option(help="Images in the unlabelled final test set.")] = 6,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Write a SYNTHETIC dataset in the exact C-NMC layout (for demos and tests; not real cells)."""
    from ..data.synthetic import write_dataset

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # never mix into real data
        fail(f"{out_dir}: exists and is not an empty folder; pick a new or empty folder for the synthetic dataset")
    write_dataset(out_dir, n_subjects, cells_per_subject, folds, prelim_subjects, final_images, seed)
    result(f"wrote a synthetic C-NMC dataset to {out_dir}: {2 * n_subjects * cells_per_subject} training "
           f"images of {2 * n_subjects} subjects in {folds} folds, {2 * prelim_subjects * cells_per_subject} "
           f"preliminary test images, {final_images} final test images")
