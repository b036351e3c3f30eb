"""The `alnet` command. Thin by design: it parses, calls the modules, and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    help="ALNet for C-NMC 2019 cell images (ALL vs HEM): prepare data, train, evaluate, run the demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _scan(data_root: Path):
    from .data.cnmc import DatasetError, scan

    try:
        return scan(data_root)
    except DatasetError as err:
        fail(str(err))


def _print_problems(problems, title: str, limit: int = 20) -> None:
    if not problems:
        return
    console.print(f"[yellow]{len(problems)} {title}:[/]")
    for problem in problems[:limit]:
        console.print(f"  {problem}", highlight=False, soft_wrap=True)
    if len(problems) > limit:
        console.print(f"  … and {len(problems) - limit} more (all of them: alnet info --problems)")


def progress_bar(description: str):
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def prepare_data(data_root: Path, cache: Optional[Path], size: int, workers: Optional[int], strict: bool,
                 crop: float = 1.0):
    """Scan + prepare with a progress bar; shared by `prepare`, `train`, `evaluate` and `demo`."""
    from .data.preprocess import PrepareError, PrepareParams, prepare

    dataset = _scan(data_root)
    _print_problems(dataset.problems, f"problem(s) in {data_root}")
    with progress_bar("decoding images") as bar:
        task = bar.add_task("decode", total=len(dataset.cells))
        try:
            prepared = prepare(dataset.cells, cache, PrepareParams(size=size, crop=crop), workers, strict,
                               progress=lambda done, total: bar.update(task, completed=done))
        except PrepareError as err:
            fail(str(err))
        bar.update(task, completed=len(dataset.cells))
    prepared.problems = dataset.problems
    return prepared


@app.command()
def info(
    data_root: Path = typer.Argument(..., help="Folder holding a C-NMC dataset (Kaggle or TCIA layout)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    problems: bool = typer.Option(False, "--problems", help="List every problem found, not just the first 20."),
):
    """Summarise a C-NMC dataset: images and subjects per split, fold and class."""
    from .data.cnmc import summarize

    dataset = _scan(data_root)
    summary = summarize(dataset.cells)
    if as_json:
        summary["layout"] = dataset.layout.name
        summary["problems"] = [str(p) for p in dataset.problems]
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"C-NMC dataset at {data_root} ({dataset.layout.name} layout)")
    for column in ("split", "fold", "class", "images", "subjects"):
        table.add_column(column, justify="right" if column in ("images", "subjects") else "left")
    for split, folds in summary["by_split"].items():
        for fold, classes in folds.items():
            for cls, counts in classes.items():
                table.add_row(split, fold, cls, str(counts["images"]), str(counts["subjects"]))
    table.add_row("total", "", "", str(summary["images"]), str(summary["subjects"]), style="bold")
    out.print(table)
    _print_problems(dataset.problems, "problem(s)", limit=len(dataset.problems) if problems else 20)


@app.command("prepare")
def prepare_cmd(
    data_root: Path = typer.Argument(..., help="Folder holding a C-NMC dataset."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: $ALNET_CACHE, else the user cache)."),
    size: int = typer.Option(224, help="Side of the stored square images, in pixels."),
    crop: float = typer.Option(1.0, help="Fraction of the short side kept by the centre crop."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes (default: one per core)."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable image instead of skipping it."),
):
    """Decode every image once (centre crop, resize) into a uint8 cache that training reads from."""
    prepared = prepare_data(data_root, cache, size, workers, strict, crop)
    state = "reused" if prepared.reused else "built"
    out.print(f"{state} cache {prepared.path}: {len(prepared.cells)} images of {size}x{size}, "
              f"{prepared.images.nbytes / 2**20:.0f} MiB", highlight=False, soft_wrap=True)
    for note, count in sorted(prepared.notes.items()):
        out.print(f"  {count} image(s) {note}", highlight=False)
    _print_problems(prepared.skipped, "image(s) skipped (unreadable)")


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Where to write the synthetic dataset (Kaggle layout)."),
    n_subjects: int = typer.Option(6, help="Subjects per class in the training folds."),
    cells_per_subject: int = typer.Option(10, help="Images per subject."),
    folds: int = typer.Option(3, help="Subject-disjoint training folds."),
    prelim_subjects: int = typer.Option(2, help="Subjects per class in the labelled preliminary test set."),
    final_images: int = typer.Option(6, help="Images in the unlabelled final test set."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Write a SYNTHETIC dataset in the exact C-NMC layout (for demos and tests; not real cells)."""
    from .data.synthetic import write_dataset

    write_dataset(out_dir, n_subjects, cells_per_subject, folds, prelim_subjects, final_images, seed)
    out.print(f"wrote a synthetic C-NMC dataset to {out_dir}: {2 * n_subjects * cells_per_subject} training "
              f"images of {2 * n_subjects} subjects in {folds} folds, "
              f"{2 * prelim_subjects * cells_per_subject} preliminary test images, {final_images} final test "
              "images", highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
