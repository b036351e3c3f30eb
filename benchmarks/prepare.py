"""Throughput of `alnet prepare` (cold cache) against a plain single-process PIL loop over the same files.

Prints one JSON line: prepare_images_per_s, baseline_images_per_s, ratio (and the setting). (Decoding runs no
model, so this benchmark has no FLOP-based efficiency; the others do, via benchmarks/efficiency.py.)
Usage: python benchmarks/prepare.py [--data DIR] [--images 2000] [--workers N]
Without --data it writes a synthetic C-NMC set of --images images to a temporary folder first.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.synthetic import write_dataset
from alnet.data.transforms import RESAMPLE, Preprocessing


def plain_pil_loop(paths, size):
    """What a first script does: open, centre crop, resize, to array — one image after another."""
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        out.append(np.asarray(image.resize((size, size), RESAMPLE)))
    return np.stack(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = write_dataset(Path(tmp) / "synthetic", n_subjects=args.images // 20, cells_per_subject=10,
                                 prelim_subjects=0, final_images=0)
        cells = scan(data).select(split="train")
        paths = [c.path for c in cells]
        for path in paths:  # same starting point for both: files in the page cache
            path.read_bytes()

        start = time.perf_counter()
        plain_pil_loop(paths, args.size)
        baseline = len(paths) / (time.perf_counter() - start)

        start = time.perf_counter()
        prepared = prepare(cells, Path(tmp) / "cache", Preprocessing(size=args.size), workers=args.workers)
        ours = len(prepared.cells) / (time.perf_counter() - start)
        assert not prepared.reused
    print(json.dumps({
        "images": len(paths), "size": args.size, "workers": args.workers or len(os.sched_getaffinity(0)),
        "prepare_images_per_s": round(ours, 1), "baseline_images_per_s": round(baseline, 1),
        "ratio": round(ours / baseline, 2),
    }))


if __name__ == "__main__":
    main()
