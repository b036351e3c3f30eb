"""What every command shares: the consoles, the one error handler, the shared options, progress bars, tables
that never cut a number, and loading a dataset into the cache."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)  # messages, progress, problems
out = Console()  # results: tables and what was written where


def printable(text: str) -> str:
    """Text as it may reach a terminal: control characters from file names (an escape sequence, a carriage return, a
    line break that would forge a line of output) are shown as escapes (\\x1b, \\n), never sent."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def fail(message: str, code: int = 2) -> None:
    """`error: <message>` on stderr and exit: status 2 for a usage or input error, 1 for work that failed."""
    from rich.markup import escape  # a message may hold brackets (pip install 'alnet[mlflow]'): not markup

    console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def say(message: str) -> None:
    """A progress message on stderr, printed as it is (no markup, no wrapping inside paths)."""
    console.print(printable(message), highlight=False, soft_wrap=True, markup=False)


def warn(message: str) -> None:
    """A warning on stderr, in yellow; the message is never taken as markup (file names may hold brackets)."""
    from rich.text import Text

    console.print(Text(printable(message), style="yellow"), highlight=False, soft_wrap=True)


def result(message: str) -> None:
    """A line of the command's result on stdout."""
    out.print(printable(message), highlight=False, soft_wrap=True, markup=False)


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message is already a one-line answer for the user (file + fix)."""
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..data.cache import PrepareError
    from ..data.cnmc import DatasetError
    from ..data.protocols import LeakageError
    from ..models import WeightsError
    from ..train.run import RunError

    return (CheckpointError, ConfigError, DatasetError, PrepareError, LeakageError, WeightsError, RunError,
            FileNotFoundError, ValueError)


def handles_errors(command: Callable) -> Callable:
    """The one error handler: a user-facing failure becomes `error: <message>` and exit status 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:  # a chosen exit status: passes before user_errors() imports the training stack
            raise
        except user_errors() as err:
            fail(str(err))

    return wrapper


# --- options shared by several commands ---------------------------------------------------------------------

DataOption = Annotated[Path, typer.Option("--data", help="C-NMC data root (Kaggle or TCIA layout).")]
CacheOption = Annotated[Optional[Path], typer.Option(
    "--cache", help="Cache folder (default: $ALNET_CACHE, else the user cache).")]
WorkersOption = Annotated[Optional[int], typer.Option(
    "--workers", min=1, max=max(1, len(os.sched_getaffinity(0))),
    help="Decoding processes for the cache (default: one per core).")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
LoggerOption = Annotated[str, typer.Option(
    "--logger", help="Experiment logger beside the CSV log that is always written: csv (only that), tensorboard "
    "(RUN/tensorboard/; pip install 'alnet[tensorboard]') or mlflow (a store in mlruns/ beside the runs; pip "
    "install 'alnet[mlflow]').")]
MlflowUriOption = Annotated[Optional[str], typer.Option(
    "--mlflow-uri", help="With --logger mlflow: a tracking server or store URI instead of the local mlruns/.")]
ConfigOption = Annotated[Optional[str], typer.Option(
    "--config", help="YAML run configuration or a preset: paper, subject.")]
ProtocolOption = Annotated[Optional[str], typer.Option(
    "--protocol", help="subject (default; leave-one-fold-out by subject) or paper (image-level 80/20 per fold, "
    "as published).")]
EpochsOption = Annotated[Optional[int], typer.Option("--epochs", help="Epochs per fold (paper: 140).")]
BatchSizeOption = Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch (default 32).")]
ImageSizeOption = Annotated[Optional[int], typer.Option(
    "--image-size", help="Input side in pixels (paper: 224; ALNet needs at least 136).")]
AugmentOption = Annotated[Optional[bool], typer.Option(
    "--augment/--no-augment", help="Online augmentation (off: frozen baselines train on features computed once).")]
PretrainedOption = Annotated[Optional[bool], typer.Option(
    "--pretrained/--no-pretrained", help="Baselines: start from ImageNet weights (default) or from scratch.")]
FinetuneOption = Annotated[Optional[bool], typer.Option(
    "--finetune/--frozen", help="Baselines: train the backbone too (default: frozen, as in the paper).")]
PrecisionOption = Annotated[Optional[str], typer.Option(
    "--precision", help="auto (bf16 on capable CPUs, AMP on CUDA), 32, bf16, 16.")]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
SyntheticOption = Annotated[Optional[Path], typer.Option(
    "--synthetic", help="A GAN folder (alnet gan train, same protocol and seed): generated cells join each split's "
    "training side, drawn from that split's own GAN (never validation, test or calibration).")]
SyntheticRatioOption = Annotated[Optional[float], typer.Option(
    "--synthetic-ratio", help="With --synthetic: generated cells per real training cell (default 0.5).")]


# --- output ---------------------------------------------------------------------------------------------------

def progress_bar(description: str, disable: bool = False) -> Progress:
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False, disable=disable)


def print_problems(problems, title: str, limit: int = 20) -> None:
    if not problems:
        return
    console.print(f"[yellow]{len(problems)} {title}:[/]")
    for problem in problems[:limit]:
        say(f"  {problem}")
    if len(problems) > limit:
        say(f"  … and {len(problems) - limit} more (all of them: alnet info --problems)")


def print_table(title: str, headers: list[str], rows: list[list[str]], bold_rows: set[int] = frozenset(),
                left: int = 1) -> None:
    """A result table that never cuts a number or a name: at its natural width where the output allows it (a
    pipe or a file has no width), else, in a terminal too narrow for it, one block of `header: value` per row.
    The first `left` columns are left-aligned, the rest (numbers) right-aligned."""
    from rich.text import Text

    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right", no_wrap=True)
    for i, row in enumerate(rows):  # cells as Text: a name from a file is never taken as markup
        table.add_row(*(Text(printable(cell)) for cell in row), style="bold" if i in bold_rows else None)
    width = out.measure(table, options=out.options.update_width(10_000)).maximum  # its natural width
    if width <= out.width:
        out.print(table)
    elif not out.is_terminal:  # a pipe or a file: as wide as the table needs
        narrow = out.width
        out.width = width
        try:
            out.print(table)
        finally:
            out.width = narrow
    else:
        result(title)
        for row in rows:
            result("  " + ", ".join(f"{header}: {value}" for header, value in zip(headers, row) if value != ""))


def check_output(out: Path, force: bool, written_by_us: bool, inputs: tuple[Path, ...] = (),
                 parent_must_exist: bool = True) -> None:
    """Refuse an output path that would destroy something alnet did not write: a link (even with --force: writing
    through it would replace another file), an input, a folder, a file of another kind (unless --force), or one in
    a folder that does not exist. Checked before any work starts."""
    if out.is_symlink():  # --force must not write through a link onto whatever it points at (another run's file)
        fail(f"{out}: is a link (to {os.readlink(out)}); pass the path of a file, not of a link")
    if out.is_dir():
        fail(f"{out}: is a folder; pass a file name")
    if out.exists() and not out.is_file():  # a FIFO or a device: writing would hang or go elsewhere
        fail(f"{out}: is not a regular file (a pipe or a device); pass the path of a file")
    if parent_must_exist and not out.parent.is_dir():
        fail(f"{out.parent}: no such folder for --out; create it first or pick another path")
    if out.exists() and any(Path(i).exists() and os.path.samefile(out, i) for i in inputs):  # hard links too
        fail(f"{out}: is one of the inputs; pick another path")
    if out.exists() and not (force or written_by_us):
        fail(f"{out}: exists and was not written by this command; pass --force to replace it, or pick another path")


# --- data -----------------------------------------------------------------------------------------------------

def scan_dataset(data_root: Path):
    from ..data.cnmc import scan

    return scan(data_root)


def prepare_data(data_root: Path, cache: Optional[Path], workers: Optional[int], preprocessing,
                 strict: bool = False, progress: bool = True):
    """Scan + decode into the cache (with a progress bar unless told not to), listing what was skipped; shared by
    every command that reads a dataset."""
    from ..data.cache import prepare

    dataset = scan_dataset(data_root)
    print_problems(dataset.problems, f"problem(s) in {data_root}")
    if dataset.generated:
        warn(f"{data_root}: {len(dataset.generated)} generated cell(s) (GAN_…) left out: generated cells are never "
             "used as data; to train with them, pass --synthetic GAN_DIR to alnet train")
    if not dataset.cells:
        fail(f"{data_root}: holds only generated cells; pass the folder of the real C-NMC data")
    with progress_bar("decoding images", disable=not progress) as bar:
        task = bar.add_task("decode", total=len(dataset.cells))
        prepared = prepare(dataset.cells, cache, preprocessing, workers, strict,
                           progress=lambda done, total: bar.update(task, completed=done))
        bar.update(task, completed=len(dataset.cells))
    print_problems(prepared.skipped, "image(s) skipped (unreadable)")
    return prepared
