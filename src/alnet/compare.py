"""`alnet compare`: several models under one protocol and seed, tabulated like the paper's Tables 8 and 9."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import RunConfig
from .data.preprocess import Prepared
from .engine import model_kwargs
from .experiment import train_run
from .metrics import METRICS
from .models import create_model, trainable_parameters

COLUMNS = ["model", "trainable_parameters", *METRICS, *(f"{m}_std" for m in METRICS), "prelim_accuracy",
           "training_seconds", "images_per_s", "pretrained", "run_dir"]


def count_trainable(config: RunConfig) -> int:
    # The count does not depend on the weights' values: build without loading any.
    return trainable_parameters(create_model(config.model, **{**model_kwargs(config), **(
        {"pretrained": False} if config.model != "alnet" else {})}))


def compare(models: list[str], base: RunConfig, prepared: Prepared, out: Path, data_root: Path | None = None,
            log: Callable[[str], None] = print, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Train and test each model; returns (Table 8 rows, Table 9 rows for ALNet). A finished model's run is
    kept, so an interrupted comparison continues where it stopped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, table9, note = [], [], ""
    for name in models:
        config = replace(base, model=name).validate()
        run_dir = out / name
        timing = run_dir / "timing.json"
        start = time.perf_counter()
        if (run_dir / "metrics.json").is_file() and timing.is_file():
            log(f"{name}: finished earlier, kept ({run_dir})")
            result = json.loads((run_dir / "metrics.json").read_text())
            seconds = json.loads(timing.read_text())["training_seconds"]
        else:
            log(f"{name}: training under the {config.protocol} protocol")
            result = train_run(config, prepared, run_dir, data_root=data_root,
                               resume=(run_dir / "config.yaml").is_file(), log=log, progress=progress)
            seconds = time.perf_counter() - start
            timing.write_text(json.dumps({"training_seconds": seconds}))
        splits = json.loads((run_dir / "splits.json").read_text())
        trained_images = sum(s["train"]["images"] for s in splits) * config.epochs
        row = {"model": name, "trainable_parameters": count_trainable(config),
               **{m: result["summary"][m]["mean"] for m in METRICS},
               **{f"{m}_std": result["summary"][m]["std"] for m in METRICS},
               "prelim_accuracy": (result.get("prelim") or {}).get("accuracy"),
               "training_seconds": seconds, "images_per_s": trained_images / seconds if seconds else None,
               "pretrained": config.pretrained if name != "alnet" else None, "run_dir": str(run_dir)}
        rows.append(row)
        note = result.get("note", note)
        if name == "alnet":
            table9 = alnet_table9(run_dir, result)
    write_tables(out, rows, table9, base.protocol, note)
    return rows, table9


def alnet_table9(run_dir: Path, result: dict) -> list[dict]:
    """Per fold: train accuracy of the kept epoch and test accuracy (the paper's Table 9)."""
    with open(run_dir / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    rows = []
    for fold in result["folds"]:
        fold_history = [h for h in history if h["fold"] == fold["fold"]]
        train_accuracy = float(fold_history[-1]["train_accuracy"]) if fold_history else None
        rows.append({"fold": fold["fold"], "train_accuracy": train_accuracy, "test_accuracy": fold["accuracy"]})
    if rows:
        rows.append({"fold": "mean", "train_accuracy": _mean([r["train_accuracy"] for r in rows]),
                     "test_accuracy": _mean([r["test_accuracy"] for r in rows])})
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_tables(out: Path, rows: list[dict], table9: list[dict], protocol: str, note: str) -> None:
    from .report.html import PAPER_ALNET, number, paper_fold_accuracy, write_comparison_report

    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Model comparison ({protocol} protocol)", "", f"{note}", "",
             "| model | trainable parameters | recall | precision | accuracy | F1 | specificity | AUC | weighted F1 "
             "| training time (s) | images/s |", "|---" * 11 + "|"]
    for r in rows:
        metrics = " | ".join(number(r[m]) for m in ("recall", "precision", "accuracy", "f1", "specificity", "auc",
                                                       "weighted_f1"))
        lines.append(f"| {r['model']} | {r['trainable_parameters']:,} | {metrics} | "
                     f"{number(r['training_seconds'], 0)} | {number(r['images_per_s'], 1)} |")
        if r["model"] == "alnet":
            lines.append(f"| ALNet, paper (image-level split) | {PAPER_ALNET['trainable_parameters']:,} | – | – | "
                         f"{PAPER_ALNET['mean_accuracy']:.3f} | – | – | – | – | – | – |")
    if table9:
        lines += ["", "## ALNet accuracy per fold (shape of the paper's Table 9)", "",
                  "| fold | train accuracy | test accuracy | paper test accuracy |", "|---|---|---|---|"]
        for r in table9:
            lines.append(f"| {r['fold']} | {number(r['train_accuracy'])} | {number(r['test_accuracy'])} | "
                         f"{number(paper_fold_accuracy(r['fold']))} |")
    lines += ["", "Paper rows are the published ALNet figures (image-level split), for reference only."]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    write_comparison_report(out, rows, table9, protocol, note)
