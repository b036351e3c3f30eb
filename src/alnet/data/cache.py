"""Decode every image once into a cache on disk: one uint8 array + an index.

Training then reads whole batches from that array (docs/design.md, "Speed by design"): no image decoding inside
the epoch loop. Each image goes through `transforms.load_image`, the same preprocessing prediction uses.

A cache lives in `<cache dir>/<key>/` with `images.npy` (N×S×S×3 uint8) and `index.json` (one entry per row,
the images that could not be decoded, the conversions made). The key hashes the file list, sizes, mtimes,
labels, the preprocessing parameters and FORMAT_VERSION, so any change builds a new cache. A cache is built in
a temporary folder and renamed into place when complete: a killed run never leaves one that loads as valid,
and existing caches are never touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .cnmc import Cell, Problem
from .transforms import Preprocessing, load_image

FORMAT_VERSION = 1
KEY_LENGTH = 24  # hex digits of a cache key, the name of a finished cache folder
TMP_MARK = ".tmp-"  # a build in progress: `.<key>.tmp-<host>-<pid>`, renamed to `<key>` when complete
SPACE_MARGIN = 64 * 2**20  # bytes kept free beyond the array (index, compaction of skipped rows)


class PrepareError(Exception):
    """Preparation cannot go on; the message is one line naming the file and the fix."""


@dataclass
class Prepared:
    """The cache of one dataset: `images[i]` is the picture of `cells[i]`."""

    images: np.ndarray
    cells: list[Cell]
    skipped: list[Problem]
    notes: dict[str, int]  # e.g. {"converted from L to RGB": 3, "resized from 600x600": 1}
    preprocessing: Preprocessing
    path: Path
    reused: bool = False


def default_cache_dir() -> Path:
    """--cache, else $ALNET_CACHE, else the user's cache folder — never the (often read-only) data folder."""
    if os.environ.get("ALNET_CACHE"):
        return Path(os.environ["ALNET_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("alnet"))


def cache_key(cells: list[Cell], preprocessing: Preprocessing) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT_VERSION, asdict(preprocessing)]).encode())
    for cell in cells:
        stat = cell.path.stat()
        digest.update(
            f"{cell.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{cell.label}|{cell.subject}|{cell.fold}|"
            f"{cell.split}\n".encode()
        )
    return digest.hexdigest()[:KEY_LENGTH]


def _decode_chunk(job: tuple[str, list[tuple[int, str]], Preprocessing]) -> list[tuple[int, str | None, list]]:
    """Worker: decode a chunk of images straight into the shared memory-mapped array."""
    array_path, items, preprocessing = job
    images = np.load(array_path, mmap_mode="r+")
    results = []
    for row, path in items:
        try:
            images[row], notes = load_image(Path(path), preprocessing)
            results.append((row, None, notes))
        except Exception as err:  # truncated, corrupt or not an image at all: reported, never fatal here
            results.append((row, f"{type(err).__name__}: {err}", []))
    images.flush()
    return results


def _check_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PrepareError(
            f"{cache_dir}: cannot write the cache there ({err.strerror or err}); pass --cache DIR or set "
            "ALNET_CACHE to a writable folder"
        ) from None


def _build_folder(cache_dir: Path, key: str) -> Path:
    """Where this process builds the cache of `key` before renaming it into place (`_remove_stale_builds` reads
    the same name back)."""
    return cache_dir / f".{key}{TMP_MARK}{socket.gethostname()}-{os.getpid()}"


def _remove_stale_builds(cache_dir: Path) -> None:
    """Remove the temporary folders of this machine's builds whose process is gone (killed, or the machine went
    down). Only folders named exactly as `prepare` names them, and started on this host (a cache folder may be
    shared between machines), are touched."""
    pattern = re.compile(rf"^\.[0-9a-f]{{{KEY_LENGTH}}}{re.escape(TMP_MARK)}{re.escape(socket.gethostname())}-(\d+)$")
    for folder in cache_dir.iterdir():
        match = pattern.match(folder.name)
        if match and folder.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_free_space(cache_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    if free < needed + SPACE_MARGIN:
        raise PrepareError(f"{cache_dir}: not enough free space for the cache (needs {needed / 2**20:.0f} MiB, "
                           f"{free / 2**20:.0f} MiB free); free some space or pass --cache DIR on another disk")


def _reserve(path: Path) -> None:
    """Allocate the whole array on disk now: a full disk shows here as ENOSPC, not later as SIGBUS in a worker
    writing through its memory map."""
    with open(path, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)


def load_cache(path: Path | str) -> Prepared:
    """Open a finished cache folder (the one `prepare` returned)."""
    path = Path(path)
    index_path = path / "index.json"
    if not index_path.is_file():
        raise PrepareError(f"{path}: not a finished alnet cache (no index.json); run `alnet prepare` again")
    try:
        index = json.loads(index_path.read_text())
        if index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {index.get('format_version')}, not {FORMAT_VERSION}")
        images = np.load(path / "images.npy", mmap_mode="r", allow_pickle=False)
        cells = [Cell(Path(c["path"]), c["label"], c["subject"], c["fold"], c["split"]) for c in index["cells"]]
        skipped = [Problem(Path(p["path"]), p["message"]) for p in index["skipped"]]
        if images.shape[0] != len(cells):
            raise ValueError(f"{images.shape[0]} images for {len(cells)} index entries")
        preprocessing = Preprocessing(**index["params"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PrepareError(f"{path}: a damaged cache ({type(err).__name__}: {err}); delete this folder and run "
                           "`alnet prepare` again") from None
    return Prepared(images, cells, skipped, index["notes"], preprocessing, path, reused=True)


def prepare(
    cells: list[Cell],
    cache_dir: Path | str | None = None,
    preprocessing: Preprocessing = Preprocessing(),
    workers: int | None = None,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Prepared:
    """Build (or reuse) the uint8 cache of `cells`. Unreadable images are skipped and listed, or with
    `strict` stop the run (PrepareError) without touching any cache already on disk."""
    if not cells:
        raise PrepareError("no images to prepare")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        key = cache_key(cells, preprocessing)
    except OSError as err:
        raise PrepareError(f"{err.filename}: cannot read the file ({err.strerror}); check the dataset") from None
    final = cache_dir / key
    if (final / "index.json").is_file():
        try:
            return load_cache(final)
        except PrepareError:  # damaged after it was built (a cut copy, a full disk): built again below
            shutil.rmtree(final, ignore_errors=True)
    _check_writable(cache_dir)
    _remove_stale_builds(cache_dir)
    shape = (len(cells), preprocessing.size, preprocessing.size, 3)
    _check_free_space(cache_dir, int(np.prod(shape)))

    workers = workers or len(os.sched_getaffinity(0))
    tmp = _build_folder(cache_dir, key)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        array_path = tmp / "images.npy"
        images = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=shape)
        del images  # workers write through their own maps
        _reserve(array_path)
        chunk = max(16, min(128, len(cells) // (workers * 8) or 1))
        jobs = [(str(array_path), [(i, str(c.path)) for i, c in enumerate(cells[s:s + chunk], start=s)],
                 preprocessing) for s in range(0, len(cells), chunk)]
        failures: dict[int, str] = {}
        notes: Counter = Counter()
        done = 0

        def collect(results):
            nonlocal done
            for row, error, row_notes in results:
                if error is not None:
                    if strict:
                        raise PrepareError(f"{cells[row].path}: cannot decode ({error}); replace or remove the file "
                                           "(or drop --strict to skip it)")
                    failures[row] = error
                notes.update(row_notes)
            done += len(results)
            if progress:
                progress(done, len(cells))

        if workers <= 1 or len(cells) < 64:
            for job in jobs:
                collect(_decode_chunk(job))
        else:
            # A pool of processes that reports a worker's death (BrokenProcessPool) instead of waiting forever.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                try:
                    for future in as_completed([pool.submit(_decode_chunk, job) for job in jobs]):
                        collect(future.result())
                except BrokenProcessPool:
                    raise PrepareError(f"{cache_dir}: a decoding process died (out of memory or disk?); nothing "
                                       "was kept: free some memory or space, or run with --workers 1") from None
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise

        kept = [i for i in range(len(cells)) if i not in failures]
        if failures:  # compact: the array holds only images that decoded
            full = np.load(array_path, mmap_mode="r")
            compact = np.lib.format.open_memmap(tmp / "compact.npy", mode="w+", dtype=np.uint8,
                                                shape=(len(kept),) + full.shape[1:])
            _reserve(tmp / "compact.npy")  # a full disk: ENOSPC here, not SIGBUS while copying
            for start in range(0, len(kept), 1024):
                compact[start:start + 1024] = full[kept[start:start + 1024]]
            compact.flush()
            del full, compact
            os.replace(tmp / "compact.npy", array_path)
        index = {
            "format_version": FORMAT_VERSION,
            "params": asdict(preprocessing),
            "cells": [{"path": str(cells[i].path), "label": cells[i].label, "subject": cells[i].subject,
                       "fold": cells[i].fold, "split": cells[i].split} for i in kept],
            "skipped": [{"path": str(cells[i].path),
                         "message": f"cannot decode ({error}); replace or remove the file; skipped"}
                        for i, error in sorted(failures.items())],
            "notes": dict(notes),
        }
        (tmp / "index.json").write_text(json.dumps(index))  # written last: its presence marks a finished cache
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PrepareError(f"{cache_dir}: the disk is full ({err.strerror}); nothing was kept: free some space "
                               "or pass --cache DIR on another disk") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prepared = load_cache(final)
    prepared.reused = False
    return prepared
