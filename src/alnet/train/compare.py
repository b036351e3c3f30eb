"""`alnet compare`: several models under one protocol and seed, tabulated like the paper's Tables 8 and 9."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..data.cache import Prepared
from ..data.protocols import make_splits
from ..metrics import METRICS
from ..models import create_model_from, model_spec, trainable_parameters
from ..schema import read_csv, read_predictions, write_csv, write_text
from ..trust.subjects import paired_difference
from .loggers import Tracking
from .run import RunError, check_devices, check_gans, config_changes, train_run
from .rundir import ComparisonDir, RunDir, foreign_files

WITH_GENERATED = "-with-generated"  # the run folder of a model trained with --synthetic, beside the one without

CSV_COLUMNS = ["model", "trainable_parameters", *METRICS, *(f"{m}_std" for m in METRICS), "prelim_accuracy",
               "training_seconds", "images_per_s", "pretrained", "run_dir"]


def count_trainable(config: RunConfig) -> int | None:
    # The count does not depend on the weights' values: build without reading any. A hybrid trains no weights.
    if model_spec(config.model).hybrid:
        return None
    return trainable_parameters(create_model_from(config, pretrained=False))


def _features_source(name: str, base: RunConfig, comparison: ComparisonDir, done: list[str]) -> str | None:
    """A hybrid's trained backbone: --features-from, else that backbone's run earlier in this comparison."""
    if base.features_from:
        return base.features_from
    earlier = [b for b in model_spec(name).trained_backbones if b in done]
    return str(comparison.run(earlier[0]).path) if earlier else None


def compare(models: list[str], base: RunConfig, prepared: Prepared, out: Path | str, data_root: Path | None = None,
            log: Callable[[str], None] = print, progress: bool = True,
            tracking: Tracking | None = None) -> tuple[list[dict], list[dict]]:
    """Train and test each model; returns (Table 8 rows, Table 9 rows). A finished model's run is kept, so an
    interrupted comparison continues where it stopped. `tracking`: the experiment logger of every run."""
    comparison = ComparisonDir(out)
    foreign = foreign_files(comparison.path)
    if foreign:
        raise RunError(f"{foreign[0]}: not written by alnet compare, and compare would replace it; move it aside or "
                       "compare into another --out")
    check_devices(base)  # before the comparison's folder is made: a refused start leaves nothing behind
    if base.synthetic:  # every split's GAN, checked before the first model trains
        check_gans(base, make_splits(base.protocol, prepared.cells, base.seed, base.val_fraction), prepared.cells)
    comparison.path.mkdir(parents=True, exist_ok=True)
    rows, table9, note = [], [], ""
    for done, name in enumerate(models):
        config = replace(base, model=name, features_from=_features_source(name, base, comparison, models[:done]),
                         synthetic=None)
        config.validate()
        variants = [(name, name, config)]
        # With --synthetic: the same model, splits and seed again, generated cells added to each training side.
        if base.synthetic and not model_spec(name).hybrid:
            variants.append((f"{name}{WITH_GENERATED}", f"{name} + generated cells (ratio {base.synthetic_ratio:g})",
                             replace(config, synthetic=base.synthetic)))
        for folder, label, variant in variants:
            row, fold_rows, note = _run_model(folder, label, variant, prepared, comparison, data_root, log, progress,
                                              tracking, note)
            rows.append(row)
            table9 += fold_rows
    differences = {}
    if base.synthetic:
        for name in models:
            if model_spec(name).hybrid:
                continue
            differences[name] = paired_difference(read_predictions(comparison.run(name).predictions),
                                                  read_predictions(comparison.run(f"{name}{WITH_GENERATED}").predictions),
                                                  seed=base.seed)
        write_text(comparison.generated, json.dumps({"gan_dir": base.synthetic, "ratio": base.synthetic_ratio,
                                                    "difference": differences}, indent=2))
    write_tables(comparison, rows, table9, base.protocol, note, differences)
    return rows, table9


def _run_model(folder: str, label: str, config: RunConfig, prepared: Prepared, comparison: ComparisonDir,
               data_root, log, progress, tracking, note: str) -> tuple[dict, list[dict], str]:
    """Train (or keep, when finished earlier) one model of the comparison: its comparison row, its Table 9 rows."""
    name, run = config.model, comparison.run(folder)
    start = time.perf_counter()
    if run.finished() and run.timing.is_file():
        log(f"{name}: finished earlier, kept ({run})")
        result = run.read_json(run.metrics)
        seconds = run.read_json(run.timing)["training_seconds"]
    else:
        if run.exists():  # an interrupted run of this comparison continues, with the settings it started with
            changed = config_changes(asdict(RunConfig.from_yaml(run.config)), config)
            if changed:
                raise RunError(f"{run}: started with other settings ({'; '.join(changed)}); continue it with "
                               "those, or compare into another --out")
        log(f"{name}: training under the {config.protocol} protocol")
        result = train_run(config, prepared, run.path, data_root=data_root, resume=run.exists(), log=log,
                           progress=progress, tracking=tracking)
        seconds = time.perf_counter() - start
        run.write_json(run.timing, {"training_seconds": seconds})
    passes = 1 if model_spec(name).hybrid else config.epochs  # a hybrid sees each training image once
    trained_images = sum(s["train"]["images"] for s in run.read_json(run.splits)) * passes
    row = {"model": label, "trainable_parameters": count_trainable(config),
           **{m: result["summary"][m]["mean"] for m in METRICS},
           **{f"{m}_std": result["summary"][m]["std"] for m in METRICS},
           "prelim_accuracy": (result.get("prelim") or {}).get("accuracy"),
           "training_seconds": seconds, "images_per_s": trained_images / seconds if seconds else None,
           "pretrained": config.pretrained if model_spec(name).pretrained else None, "run_dir": str(run)}
    return row, table9_rows(label, run, result), result.get("note", note)


def table9_rows(model: str, run: RunDir, result: dict) -> list[dict]:
    """Per test fold: train accuracy of the last epoch and test accuracy (the paper's Table 9), and their mean."""
    history = read_csv(run.history)
    rows = []
    for fold in result["folds"]:
        fold_history = [h for h in history if h["fold"] == fold["fold"]]
        train_accuracy = float(fold_history[-1]["train_accuracy"]) if fold_history else None
        rows.append({"model": model, "fold": fold["fold"], "train_accuracy": train_accuracy,
                     "test_accuracy": fold["accuracy"]})
    if rows:
        rows.append({"model": model, "fold": "mean", "train_accuracy": _mean([r["train_accuracy"] for r in rows]),
                     "test_accuracy": _mean([r["test_accuracy"] for r in rows])})
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_tables(comparison: ComparisonDir, rows: list[dict], table9: list[dict], protocol: str, note: str,
                 differences: dict | None = None) -> None:
    from ..report import paper
    from ..report.html import comparison_rows, write_comparison_report
    from ..report.tables import COMPARISON, number

    write_csv(comparison.csv, rows, CSV_COLUMNS)
    lines = [f"# Model comparison ({protocol} protocol)", "", f"{note}", "",
             "| " + " | ".join(c.header for c in COMPARISON) + " |", "|---" * len(COMPARISON) + "|"]
    lines += ["| " + " | ".join(c.cell(row) for c in COMPARISON) + " |" for _, row in comparison_rows(rows)]
    if table9:
        lines += ["", "## Accuracy per fold (shape of the paper's Table 9)", "",
                  "| model | fold | train accuracy | test accuracy | paper test accuracy | paper AUC |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['fold']} | {number(r['train_accuracy'])} | {number(r['test_accuracy'])} | "
                  f"{number(paper.table9_test_accuracy(r['model'], r['fold']), 4)} | "
                  f"{number(paper.auc(r['model'], r['fold']))} |" for r in table9]
    lines += generated_lines(differences or {})
    lines += ["", "Rows marked paper are the published figures (the paper's image-level split; its parameter counts "
              "are the full ImageNet networks), for reference only.", "",
              "Published results on C-NMC 2019 (the paper's Table 10): "
              + "; ".join(f"{work} {number(acc)}" for work, acc in paper.TABLE_10) + ".", "",
              f"Paper: {paper.CITATION}"]
    write_text(comparison.markdown, "\n".join(lines) + "\n")
    write_comparison_report(comparison, rows, table9, protocol, note)


def generated_lines(differences: dict) -> list[str]:
    """comparison.md's section on generated cells: per model, with minus without, and the interval of the
    difference (subjects resampled, the same draw for both runs)."""
    from ..report.tables import number

    if not differences:
        return []
    lines = ["", "## With generated cells minus without (same model, splits and seed)", "",
             "| model | level | metric | without | with | difference | 95% interval |", "|---|---|---|---|---|---|---|"]
    for model, found in differences.items():
        for level in ("image", "subject"):
            for metric in ("accuracy", "auc"):
                d = found[level][metric]
                lines.append(f"| {model} | {level} | {metric} | {number(d['before'])} | {number(d['after'])} | "
                             f"{d['difference']:+.3f} | [{d['interval']['low']:+.3f}, {d['interval']['high']:+.3f}] |")
    lines += ["", f"Pooled over the test folds: {next(iter(differences.values()))['cells']} cells of "
              f"{next(iter(differences.values()))['subjects']} subjects. Intervals: 1,000 bootstrap resamples of "
              "subjects; an interval that holds 0 shows no difference these subjects can resolve."]
    return lines
