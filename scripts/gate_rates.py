"""Measure the input gate: false rejections on the real cells of tests/data/cnmc-mini (image check alone, and
with models trained on synthetic cells and on the real cells) and the share of generated non-cells refused,
per kind. Trains small models itself (136 px, a few epochs on two CPU cores: a few minutes); prints one JSON
line.

    python scripts/gate_rates.py [--epochs 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the non-cell generator the tests use

from noncells import write_non_cells  # noqa: E402

from alnet.config import RunConfig  # noqa: E402
from alnet.data.cache import prepare  # noqa: E402
from alnet.data.cnmc import scan  # noqa: E402
from alnet.data.synthetic import write_dataset  # noqa: E402
from alnet.data.transforms import Preprocessing, load_image  # noqa: E402
from alnet.infer.predict import load_pipeline, predict_files  # noqa: E402
from alnet.train.run import train_run  # noqa: E402
from alnet.train.rundir import RunDir  # noqa: E402
from alnet.trust.image_check import image_reason  # noqa: E402

SIZE = 136


def _train(root: Path, work: Path, protocol: str, epochs: int) -> list[Path]:
    prepared = prepare(scan(root).cells, work / "cache", Preprocessing(size=SIZE))
    config = RunConfig(protocol=protocol, epochs=epochs, image_size=SIZE, batch_size=16, bn_momentum=0.5)
    metrics = train_run(config, prepared, work / "run", progress=False, log=lambda m: None)
    run = RunDir(work / "run")
    folds = [f["fold"] for f in metrics["folds"]] + (["prelim"] if metrics.get("prelim") else [])
    return [run.chosen_checkpoint(fold) for fold in folds]


def _false_rejections(checkpoints: list[Path], cells: list[Path]) -> dict:
    out = {}
    for checkpoint in checkpoints:
        rows, _ = predict_files(load_pipeline(checkpoint), cells)
        refused = [r for r in rows if not r.answer.answered]
        gate = load_pipeline(checkpoint).gate.features
        out[checkpoint.parent.name] = {"rejected": len(refused), "of": len(rows),
                                       "held_out": gate.held_out if gate else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gate-rates-"))
    real_root = ROOT / "tests" / "data" / "cnmc-mini"
    cells = [c.path for c in scan(real_root).cells]
    image_only = sum(image_reason(load_image(c, Preprocessing(size=SIZE))[0]) is not None for c in cells)

    real_checkpoints = _train(real_root, work / "real", "subject", args.epochs)
    synthetic = write_dataset(work / "synthetic-data", n_subjects=8, cells_per_subject=10, prelim_subjects=2,
                              final_images=0, seed=0)
    synthetic_checkpoints = _train(synthetic, work / "synthetic", "subject", args.epochs)

    charts = sorted((work / "real" / "run" / "figures").glob("*.png"))
    non_cells = write_non_cells(work / "non-cells", cells[:4], charts)
    kind_of = {str(path): kind for kind, path in non_cells}
    per_kind = {}
    for name, checkpoints in (("real", real_checkpoints), ("synthetic", synthetic_checkpoints)):
        for checkpoint in checkpoints:
            rows, _ = predict_files(load_pipeline(checkpoint), [p for _, p in non_cells])
            total, refused = Counter(), Counter()
            for row in rows:
                total[kind_of[str(row.path)]] += 1
                refused[kind_of[str(row.path)]] += not row.answer.answered
            per_kind[f"{name}/{checkpoint.parent.name}"] = {
                kind: f"{refused[kind]}/{total[kind]}" for kind in total} | {
                "all": f"{sum(refused.values())}/{sum(total.values())}"}
    image_kind = Counter()
    for kind, path in non_cells:
        image_kind[kind] += image_reason(load_image(path, Preprocessing(size=SIZE))[0]) is not None
    print(json.dumps({
        "real_cells": len(cells), "image_check_false_rejections": image_only,
        "trained_on_real_cells": _false_rejections(real_checkpoints, cells),
        "trained_on_synthetic_cells": _false_rejections(synthetic_checkpoints, cells),
        "non_cells_refused_by_image_check": {k: f"{image_kind[k]}/{n}" for k, n in Counter(
            k for k, _ in non_cells).items()},
        "non_cells_refused_by_the_whole_gate": per_kind,
    }))


if __name__ == "__main__":
    main()
