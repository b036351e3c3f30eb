"""Check a C-NMC copy file by file against the published list of the Kaggle copy (docs/design.md, "Checking a
copy").

The list (`cnmc-kaggle-sha256.csv.gz`, package data beside this module) holds the path, sha256 and size of every
file of the Kaggle copy: 10,661 training images, 1,867 preliminary test images and their labels CSV, 2,586 final
test images. Files are matched by where they sit, not by their full path, so the Kaggle layout, the TCIA
layout and a root pointed at any folder of either match the same way: a training image by fold, class folder
and name; a test image by its test folder and name; the labels CSV by name.

The walk never leaves DATA: directory links are not followed, file links only when they point inside DATA,
and anything that is not a regular file (FIFO, device, socket) is listed as skipped, never opened. Hashing
runs in a bounded pool of threads (hashlib and file reads release the GIL), reading each file in chunks; a
file whose size already differs is not read at all.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .cnmc import GENERATED_NAME, LABELS_CSV, DatasetError

MANIFEST = "cnmc-kaggle-sha256.csv.gz"
MANIFEST_COLUMNS = ["path", "sha256", "size"]
TCIA_TRAINING = "c-nmc_training_data"  # the TCIA layout's training folder; Kaggle's is training_data
OTHER = ("other", "")  # found files that sit in no folder of the dataset

# Statuses of one file, in the order the report shows them.
MATCH, MISSING, CHANGED, UNREADABLE, EXTRA = "match", "missing", "changed", "unreadable", "extra"
GENERATED = "generated"  # a cell written by `alnet gan sample` (its name says so): counted apart, never a failure
STATUSES = (MATCH, MISSING, CHANGED, UNREADABLE, EXTRA, GENERATED)
FAILING = (MISSING, CHANGED, UNREADABLE)  # any of these makes the copy fail the check

_FOLD = re.compile(r"^fold_(\d+)$", re.IGNORECASE)
_CLASSES = {"all": "ALL", "hem": "HEM"}
_TEST_FOLDERS = {"c-nmc_test_prelim_phase_data": "prelim", "c-nmc_test_final_phase_data": "final"}


@dataclass(frozen=True)
class Expected:
    path: str  # as in the list: C-NMC_Leukemia/…
    sha256: str
    size: int


@dataclass(frozen=True)
class FileCheck:
    """One file of the list or of the copy, and what the check found."""
    status: str  # one of STATUSES
    group: tuple[str, str]  # (split, class): ("fold_0", "ALL"), ("prelim", "images"), ("final", "images"), …
    name: str  # the list's path for listed files, the path below DATA for extra ones
    found: Path | None = None
    expected_size: int | None = None
    found_size: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Verification:
    root: Path
    quick: bool  # names and sizes only
    tcia: bool  # the copy is in the TCIA layout: differences are from the Kaggle copy, not necessarily damage
    checks: list[FileCheck] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status in FAILING for c in self.checks)

    def counts(self) -> dict[tuple[str, str], Counter]:
        """Per (split, class), in the list's order: `expected` plus one count per status."""
        counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for check in self.checks:
            counts[check.group][check.status] += 1
            if check.status not in (EXTRA, GENERATED):
                counts[check.group]["expected"] += 1
        return dict(sorted(counts.items(), key=lambda item: _group_order(item[0])))

    def total(self) -> Counter:
        return sum(self.counts().values(), Counter())

    def with_status(self, status: str) -> list[FileCheck]:
        return [c for c in self.checks if c.status == status]


def _group_order(group: tuple[str, str]) -> tuple:
    split, cls = group
    order = {"prelim": 1, "final": 2, "other": 3}
    return (order.get(split, 0), split, cls)


def group_of(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, class) of a file from its last path components, the same for either layout; None when the file
    sits in no folder of the dataset."""
    if not parts:
        return None
    if parts[-1].lower() == LABELS_CSV.lower():
        return ("prelim", "labels CSV")
    parent = parts[-2].lower() if len(parts) >= 2 else ""
    if parent in _CLASSES and len(parts) >= 3 and (fold := _FOLD.match(parts[-3])):
        return (f"fold_{int(fold.group(1))}", _CLASSES[parent])
    if parent in _TEST_FOLDERS:
        return (_TEST_FOLDERS[parent], "images")
    return None


def read_manifest(text: bytes | None = None) -> list[Expected]:
    """The published list of the Kaggle copy (package data), or a list in the same format given as gzip bytes."""
    if text is None:
        text = resources.files(__package__).joinpath(MANIFEST).read_bytes()
    with io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(text)), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != MANIFEST_COLUMNS:
            raise DatasetError(f"{MANIFEST}: expected the columns {','.join(MANIFEST_COLUMNS)}; reinstall alnet")
        return [Expected(row["path"], row["sha256"], int(row["size"])) for row in reader]


def _key(parts: tuple[str, ...]) -> tuple[tuple[str, str], str] | None:
    group = group_of(parts)
    return (group, parts[-1]) if group else None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def walk(root: Path) -> tuple[list[tuple[Path, Path, int]], list[Skipped]]:
    """Every regular file below `root` as (path, the file to read, size), and what was skipped and why. Directory
    links are not followed; a file link is read only when it points at a regular file inside `root`."""
    files, skipped = [], []

    def on_error(err: OSError) -> None:
        skipped.append(Skipped(Path(err.filename or root), f"cannot list this folder ({err.strerror}); "
                                                           "check its permissions"))

    for folder, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        here = Path(folder)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                skipped.append(Skipped(here / name, "a link to a folder, not followed; put the files themselves "
                                                    "in DATA"))
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            try:
                info = path.lstat()
                target = path
                if stat.S_ISLNK(info.st_mode):
                    target = path.resolve()
                    if not _inside(target, root):
                        skipped.append(Skipped(path, "a link out of DATA, not followed"))
                        continue
                    info = target.stat()
            except OSError as err:
                skipped.append(Skipped(path, f"cannot be read ({err.strerror})"))
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append(Skipped(path, "not a regular file (FIFO, device or socket), not opened"))
                continue
            files.append((path, target, info.st_size))
    return files, skipped


def sha256_of(path: Path) -> str:
    """sha256 of one regular file, read in chunks. Opened without following a last link and without blocking,
    and checked again once open, so a file swapped for a FIFO after the walk is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(0, "no longer a regular file")
        return hashlib.file_digest(f, "sha256").hexdigest()


def _bounded_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items in `workers` threads, results as they finish; at most 2 × workers in flight at once."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set = set()
        for item in items:
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
            pending.add(pool.submit(fn, item))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in done)


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def verify(root: Path, quick: bool = False, workers: int | None = None,
           progress: Callable[[int, int], None] | None = None,
           manifest: list[Expected] | None = None) -> Verification:
    """Compare the copy at `root` with the list: each listed file is a match, missing, changed (another size or,
    unless `quick`, another sha256) or unreadable; each file of the copy the list does not hold is extra."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory; pass the folder that holds the C-NMC copy")
    root = root.resolve()
    expected_files = read_manifest() if manifest is None else manifest
    files, skipped = walk(root)

    found: dict[tuple, list[tuple[Path, Path, int]]] = defaultdict(list)
    checks: list[FileCheck] = []
    tcia = False
    for path, target, size in files:
        parts = path.relative_to(root).parts
        tcia = tcia or any(p.lower() == TCIA_TRAINING for p in parts)
        key = _key(parts)
        if key is None:
            checks.append(FileCheck(EXTRA, OTHER, str(path.relative_to(root)), path, found_size=size,
                                    note="not in a folder of the dataset"))
        else:
            found[key].append((path, target, size))

    to_hash: list[tuple[Expected, tuple, Path, Path, int]] = []
    for entry in expected_files:
        key = _key(tuple(entry.path.split("/")))
        if key is None:  # the list names only dataset files; anything else would be a broken list
            raise DatasetError(f"{MANIFEST}: {entry.path} is in no folder of the dataset; reinstall alnet")
        copies = found.pop(key, [])
        if not copies:
            checks.append(FileCheck(MISSING, key[0], entry.path, expected_size=entry.size))
            continue
        path, target, size = copies[0]
        for other, _, other_size in copies[1:]:
            checks.append(FileCheck(EXTRA, key[0], str(other.relative_to(root)), other, found_size=other_size,
                                    note=f"a second copy of {entry.path}"))
        if size != entry.size:
            checks.append(FileCheck(CHANGED, key[0], entry.path, path, entry.size, size,
                                    f"{size:,} bytes, the list says {entry.size:,}"))
        elif quick:
            checks.append(FileCheck(MATCH, key[0], entry.path, path, entry.size, size))
        else:
            to_hash.append((entry, key, path, target, size))
    for key, copies in found.items():  # in a dataset folder, but not in the list
        for path, _, size in copies:
            if GENERATED_NAME.match(path.stem):
                checks.append(FileCheck(GENERATED, key[0], str(path.relative_to(root)), path, found_size=size,
                                        note="a generated cell (alnet gan sample), not part of the dataset"))
            else:
                checks.append(FileCheck(EXTRA, key[0], str(path.relative_to(root)), path, found_size=size,
                                        note="not in the list of the Kaggle copy"))

    def hash_one(job):
        entry, key, path, target, size = job
        try:
            digest = sha256_of(target)
        except OSError as err:
            return FileCheck(UNREADABLE, key[0], entry.path, path, entry.size, size,
                             f"cannot be read ({err.strerror or err}); check its permissions")
        if digest != entry.sha256:
            return FileCheck(CHANGED, key[0], entry.path, path, entry.size, size, "same size, another sha256")
        return FileCheck(MATCH, key[0], entry.path, path, entry.size, size)

    total = len(to_hash)
    if progress:
        progress(0, total)
    for done, check in enumerate(_bounded_map(hash_one, to_hash, workers or default_workers()), 1):
        checks.append(check)
        if progress:
            progress(done, total)
    checks.sort(key=lambda c: (_group_order(c.group), c.name))
    return Verification(root, quick, tcia, checks, skipped)


REPORT_COLUMNS = ["status", "split", "class", "file", "found", "expected_size", "found_size", "note"]


def write_report(verification: Verification, out: Path) -> None:
    """Every file that is not a match, one CSV row each (the terminal shows only the first few)."""
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(REPORT_COLUMNS)
        for c in verification.checks:
            if c.status != MATCH:
                writer.writerow([c.status, c.group[0], c.group[1], c.name, c.found or "",
                                 "" if c.expected_size is None else c.expected_size,
                                 "" if c.found_size is None else c.found_size, c.note])
