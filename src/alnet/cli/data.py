"""Commands that look at and prepare data: `info`, `prepare`, `synth`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    CacheOption,
    ProgressOption,
    WorkersOption,
    check_output,
    fail,
    handles_errors,
    out,
    prepare_data,
    print_problems,
    print_table,
    progress_bar,
    result,
    say,
    scan_dataset,
)

SYNTHETIC_IMAGE_BYTES = 610_000  # one image `synth` writes: a 450×450 BMP, 608,454 bytes with its header

DataRoot = Annotated[Path, typer.Argument(help="Folder holding a C-NMC dataset (Kaggle or TCIA layout).")]


@handles_errors
def info(
    data_root: DataRoot,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    problems: Annotated[bool, typer.Option("--problems", help="List every problem found, not just the first 20.")]
    = False,
):
    """Summarise a C-NMC dataset: images and subjects per split, fold and class. (`alnet verify DATA` checks
    its files against the published list of the Kaggle copy.)"""
    from ..data.cnmc import summarize

    dataset = scan_dataset(data_root)
    summary = summarize(dataset.cells)
    if dataset.generated:  # a split of their own, never counted with the data
        summary["by_split"].update(summarize(dataset.generated)["by_split"])
        summary["generated"] = len(dataset.generated)
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
    say(f"to check every file against the published list of the Kaggle copy: alnet verify {data_root}")


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
    n_subjects: Annotated[int, typer.Option(min=1, max=10_000, help="Subjects per class in the training folds.")]
    = 6,
    cells_per_subject: Annotated[int, typer.Option(min=1, max=1_000, help="Images per subject.")] = 10,
    folds: Annotated[int, typer.Option(min=1, max=10, help="Subject-disjoint training folds.")] = 3,
    prelim_subjects: Annotated[int, typer.Option(
        min=0, max=10_000, help="Subjects per class in the labelled preliminary test set.")] = 2,
    final_images: Annotated[int, typer.Option(min=0, max=100_000, help="Images in the unlabelled final test set.")]
    = 6,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Write a SYNTHETIC dataset in the exact C-NMC layout (for demos and tests; not real cells)."""
    import shutil

    from ..data.synthetic import write_dataset

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # never mix into real data
        fail(f"{out_dir}: exists and is not an empty folder; pick a new or empty folder for the synthetic dataset")
    images = 2 * (n_subjects + prelim_subjects) * cells_per_subject + final_images
    needed = images * SYNTHETIC_IMAGE_BYTES
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > 0.9 * free:
        fail(f"{out_dir}: {images:,} images need about {needed / 2**30:.1f} GiB and {existing} has "
             f"{free / 2**30:.1f} GiB free; ask for fewer subjects or cells, or free some space")
    write_dataset(out_dir, n_subjects, cells_per_subject, folds, prelim_subjects, final_images, seed)
    result(f"wrote a synthetic C-NMC dataset to {out_dir}: {2 * n_subjects * cells_per_subject} training "
           f"images of {2 * n_subjects} subjects in {folds} folds, {2 * prelim_subjects * cells_per_subject} "
           f"preliminary test images, {final_images} final test images")


def _written_by_verify(path: Path) -> bool:
    from ..data.verify import REPORT_COLUMNS
    from ..schema import header_of

    return header_of(path) == REPORT_COLUMNS


@handles_errors
def verify(
    data_root: DataRoot,
    quick: Annotated[bool, typer.Option("--quick", help="Compare names and sizes only; read no file.")] = False,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, max=64, help="Files hashed at once (default: one per core, at most 8).")] = None,
    report: Annotated[Optional[Path], typer.Option(
        "--report", help="Also write every file that is not a match (missing, changed, unreadable, extra) to this "
        "CSV.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --report file.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Files named per kind of difference.")] = 20,
    progress: ProgressOption = True,
):
    """Check a C-NMC copy file by file against the published sha256 list of the Kaggle copy (15,114 images + CSV).

    Missing, changed and extra files per split and class; exit status 1 when a listed file is missing or changed.

    Files are matched by folder and name, so a TCIA copy is checked too: its differences are from the Kaggle copy.
    """
    from ..data.verify import CHANGED, EXTRA, GENERATED, MATCH, MISSING, STATUSES, UNREADABLE, write_report
    from ..data.verify import verify as check_copy

    if report is not None:
        if report.absolute().resolve().is_relative_to(data_root.absolute().resolve()):
            fail(f"{report}: inside the dataset being checked; write the report somewhere else")
        check_output(report, force, _written_by_verify(report))
    with progress_bar("hashing files", disable=not progress or quick) as bar:
        task = bar.add_task("hash", total=None)
        verification = check_copy(data_root, quick=quick, workers=workers,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    changed = "differ from Kaggle" if verification.tcia else "changed"
    headers = ["split", "class", "listed", "match", "missing", changed, "unreadable", "extra", "generated"]
    counts = verification.counts()
    rows = [[split, cls, *(f"{c[k]:,}" for k in ("expected", *STATUSES))] for (split, cls), c in counts.items()]
    total = verification.total()
    rows.append(["total", "", *(f"{total[k]:,}" for k in ("expected", *STATUSES))])
    how = "names and sizes" if quick else "sha256 and size"
    print_table(f"{data_root} against the list of the Kaggle copy ({how})", headers, rows,
                bold_rows={len(rows) - 1}, left=2)

    # A group the copy holds nothing of is one line, not thousands of names.
    absent = {group for group, c in counts.items() if c["expected"] and c[MISSING] == c["expected"]}
    if absent:
        result("missing entirely: " + ", ".join(f"{split} {cls} ({counts[(split, cls)][MISSING]:,})"
                                                for split, cls in sorted(absent, key=list(counts).index)))
    for status, label in ((CHANGED, changed), (UNREADABLE, "unreadable"), (MISSING, "missing"), (EXTRA, "extra")):
        checks = [c for c in verification.with_status(status) if status != MISSING or c.group not in absent]
        if not checks or not limit:
            continue
        result(f"{len(checks):,} {label}" + (" (from the folders the copy holds)" if status == MISSING and absent
                                               else "") + ":")
        for check in checks[:limit]:
            where = f" (found as {check.found.relative_to(verification.root)})" if check.found and status != EXTRA \
                else ""
            result(f"  {check.name}{where}{': ' + check.note if check.note else ''}")
        if len(checks) > limit:
            result(f"  … and {len(checks) - limit:,} more" + ("" if report else " (all of them: --report FILE)"))
    print_problems(verification.skipped, "file(s) skipped", limit=max(limit, 1))
    if verification.tcia and total[CHANGED]:
        result(f"this is a TCIA copy: {total[CHANGED]:,} file(s) differ from the Kaggle copy the list describes; "
               "that alone does not mean they are damaged")
    if report is not None:
        write_report(verification, report)
        result(f"wrote {report}")
    if not verification.ok:
        result(f"{total[MATCH]:,} of {total['expected']:,} listed files match; the copy is not the published one"
               f"{' (names and sizes only)' if quick else ''}")
        raise typer.Exit(code=1)
    result(f"all {total['expected']:,} listed files match ({how})"
           + (f"; {total[EXTRA]:,} extra file(s)" if total[EXTRA] else "")
           + (f"; {total[GENERATED]:,} generated cell(s), not part of the dataset" if total[GENERATED] else ""))
