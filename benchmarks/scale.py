"""C-NMC at full scale on this machine: prepare, one training epoch, one full evaluation, peak memory, and the
wall time of the paper and subject protocols extrapolated from them.

Without --data it builds a C-NMC-sized set in the Kaggle layout: three subject-disjoint training folds of
3,527, 3,581 and 3,553 images (10,661; 68 % ALL, as in C-NMC) and 1,867 preliminary test images, 450×450 BMP.
Cells are drawn once per template (`alnet.data.synthetic`) and hard-linked (copied where links are not
possible) under the names of 73 + 28 subjects: every file is still opened and decoded by `prepare`, so the
work is that of the real set. With --data DIR it measures a real copy instead.

Prints one JSON line: images, prepare_s, prepare_images_per_s, cache_gb, train_epoch_s, train_images_per_s,
evaluate_s, evaluate_images_per_s, peak_rss_gb (this process: the cache in memory plus training),
prepare_peak_rss_gb (the decoding workers), and paper_protocol_h / subject_protocol_h: each protocol's wall
time on this machine (its presets' epochs and splits, from the measured rates).
Usage: python benchmarks/scale.py [--data DIR] [--fraction 1.0] [--workers N] [--batch-size 32] [--keep DIR]
"""

import argparse
import csv
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train import timed_trainer  # benchmarks/train.py, beside this script

from alnet.config import RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import LABELS_CSV, scan
from alnet.data.protocols import make_splits
from alnet.data.synthetic import write_dataset
from alnet.data.transforms import Preprocessing
from alnet.device import resolve_precision
from alnet.memory import keep_freed_memory
from alnet.pipeline import cache_batches, torch_network
from alnet.train.batches import CellData, tensors
from alnet.train.module import build_module
from alnet.train.trainer import quiet_lightning

FOLDS = (3527, 3581, 3553)  # C-NMC training folds (images)
PRELIM = 1867
ALL_SHARE = 7272 / 10661
SUBJECTS_PER_FOLD = (16, 9)  # ALL, HEM: about C-NMC's 47 + 26 training subjects
PRELIM_SUBJECTS = (13, 15)


def _place(template: Path, target: Path) -> None:
    try:
        os.link(template, target)
    except OSError:
        shutil.copyfile(template, target)


def build_cnmc_sized(out: Path, fraction: float) -> Path:
    """A C-NMC-sized synthetic set under `out` (see the module's docstring)."""
    templates = write_dataset(out / "templates", n_subjects=12, cells_per_subject=12, prelim_subjects=0,
                              final_images=0, seed=0)
    pools = {cls: sorted(templates.rglob(f"*_{cls}.bmp")) for cls in ("all", "hem")}
    training = out / "C-NMC_Leukemia" / "training_data"
    next_subject = {"all": 1, "hem": 1}

    def write_subjects(folder: Path, cls: str, count: int, subjects: int, name=None) -> list[tuple[str, Path]]:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for i in range(count):
            subject = next_subject[cls] + i % subjects
            prefix = "" if cls == "all" else "H"
            original = f"UID_{prefix}{subject}_{i // subjects + 1}_1_{cls}.bmp"
            target = folder / (name(len(written)) if name else original)
            _place(pools[cls][i % len(pools[cls])], target)
            written.append((original, target))
        next_subject[cls] += subjects
        return written

    for fold, size in enumerate(FOLDS):
        size = max(4, round(size * fraction))
        n_all = round(size * ALL_SHARE)
        for cls, count, subjects in (("all", n_all, SUBJECTS_PER_FOLD[0]), ("hem", size - n_all, SUBJECTS_PER_FOLD[1])):
            write_subjects(training / f"fold_{fold}" / cls, cls, count, subjects)
    prelim = out / "C-NMC_Leukemia" / "validation_data" / "C-NMC_test_prelim_phase_data"
    size = max(4, round(PRELIM * fraction))
    n_all = round(size * ALL_SHARE)
    rows = []
    for cls, count, subjects in (("all", n_all, PRELIM_SUBJECTS[0]), ("hem", size - n_all, PRELIM_SUBJECTS[1])):
        start = len(rows)
        numbered = write_subjects(prelim, cls, count, subjects, name=lambda k, s=start: f"{s + k + 1}.bmp")
        for original, target in numbered:
            rows.append((original, target.name, int(cls == "all")))
    with open(prelim.parent / LABELS_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Patient_ID", "new_names", "labels"])
        writer.writerows(rows)
    shutil.rmtree(out / "templates")
    return out


def protocol_hours(preset: str, cells, train_rate: float, eval_rate: float) -> float:
    """Wall time of a whole run of `preset` from the measured rates: every split's epochs of training (doubled
    where the preset doubles offline) and validation, and its test."""
    config = RunConfig.load(preset)
    seconds = 0.0
    for split in make_splits(config.protocol, cells, config.seed, config.val_fraction):
        per_epoch = len(split.train) * (2 if config.double_offline else 1) / train_rate + len(split.val) / eval_rate
        seconds += config.epochs * per_epoch + len(split.test) / eval_rate
    return seconds / 3600


def _gb(kilobytes: int) -> float:
    return round(kilobytes / 2**20, 2)  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a real C-NMC root; default: a C-NMC-sized synthetic set")
    parser.add_argument("--fraction", type=float, default=1.0, help="scale the synthetic set (a quick try)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep", type=Path, help="build the synthetic set and cache here and keep them")
    args = parser.parse_args()
    keep_freed_memory()  # as every alnet command does (alnet.memory)
    quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        root = args.data or build_cnmc_sized(work / "data", args.fraction)
        cells = [c for c in scan(root).cells if c.label is not None]  # training folds and the preliminary set
        start = time.perf_counter()
        prepared = prepare(cells, work / "cache", Preprocessing(size=224), workers=args.workers)
        prepare_s = time.perf_counter() - start
        cache_bytes = (prepared.path / "images.npy").stat().st_size
        prepare_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

        config = RunConfig.load("subject", batch_size=args.batch_size, epochs=1)
        path = resolve_precision(config.precision, config.accelerator)
        images, labels = tensors(prepared)
        train_rows = np.array([i for i, c in enumerate(prepared.cells) if c.split == "train"])
        all_rows = np.arange(len(prepared.cells))
        module = build_module(config, [])
        trainer, timer = timed_trainer(path, epochs=1)
        data = CellData(images, labels, train_rows, [], all_rows, config)
        trainer.fit(module, datamodule=data)
        start = time.perf_counter()  # the test pass as a run makes it: the pipeline's network over uint8 batches
        network = torch_network(module.model, path, config.head)
        for batch in cache_batches(images, all_rows):
            network(batch)
        evaluate_s = time.perf_counter() - start
        train_rate, eval_rate = len(train_rows) / timer.seconds[0], len(all_rows) / evaluate_s
        print(json.dumps({
            "images": len(prepared.cells), "training_images": len(train_rows), "synthetic": args.data is None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "precision": path.lightning, "batch_size": args.batch_size,
            "prepare_s": round(prepare_s, 1), "prepare_images_per_s": round(len(prepared.cells) / prepare_s, 1),
            "cache_gb": round(cache_bytes / 2**30, 2),
            "train_epoch_s": round(timer.seconds[0], 1), "train_images_per_s": round(train_rate, 1),
            "evaluate_s": round(evaluate_s, 1), "evaluate_images_per_s": round(eval_rate, 1),
            "peak_rss_gb": _gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
            "prepare_peak_rss_gb": _gb(prepare_rss),
            "paper_protocol_h": round(protocol_hours("paper", prepared.cells, train_rate, eval_rate), 1),
            "subject_protocol_h": round(protocol_hours("subject", prepared.cells, train_rate, eval_rate), 1),
        }))


if __name__ == "__main__":
    main()
