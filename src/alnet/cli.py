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
    help="ALNet for C-NMC 2019 cell images (ALL vs HEM): prepare data, train and evaluate (paper or "
    "subject-level protocol), compare with baselines, explain, tune, predict, export and serve.",
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


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _load_config(config: Optional[str], **overrides):
    from .config import ConfigError, RunConfig

    try:
        if config is None:
            return RunConfig(**{k: v for k, v in overrides.items() if v is not None}).validate()
        path = Path(config)
        if not path.exists() and (CONFIG_DIR / f"{config}.yaml").is_file():  # a preset name: paper, subject
            path = CONFIG_DIR / f"{config}.yaml"
        if not path.is_file():
            fail(f"{config}: no such configuration file; pass a YAML file or a preset name (paper, subject)")
        return RunConfig.from_yaml(path, **overrides)
    except (ConfigError, TypeError) as err:
        fail(str(err))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


SHORT_NAMES = {"accuracy": "acc", "precision": "prec", "recall": "recall", "specificity": "spec", "f1": "F1",
               "weighted_f1": "wF1", "auc": "AUC"}


def print_metrics(result: dict, title: str) -> None:
    from .metrics import METRICS

    table = Table(title=title)
    table.add_column("test set")
    for name in METRICS:
        table.add_column(SHORT_NAMES[name], justify="right")
    table.add_column("images", justify="right")
    for fold in result["folds"]:
        table.add_row(fold["fold"], *(_fmt(fold[m]) for m in METRICS), str(fold["images"]))
    if len(result["folds"]) > 1:
        summary = result["summary"]
        table.add_row("mean", *(_fmt(summary[m]["mean"]) for m in METRICS), "", style="bold")
        table.add_row("std", *(_fmt(summary[m]["std"]) for m in METRICS), "")
    if result.get("prelim"):
        prelim = result["prelim"]
        table.add_row("prelim", *(_fmt(prelim[m]) for m in METRICS), str(prelim["images"]), style="bold")
    out.print(table)
    out.print("acc accuracy, prec precision, recall sensitivity (ALL positive), spec specificity, wF1 weighted F1",
              highlight=False, soft_wrap=True)
    if result.get("note"):
        out.print(f"protocol {result['protocol']}: {result['note']}", highlight=False, soft_wrap=True)


def _run(config, data_root: Path, run_dir: Path, cache, workers, resume: bool, progress: bool = True) -> dict:
    from .data.protocols import LeakageError
    from .experiment import RunError, train_run
    from .models import WeightsError

    prepared = prepare_data(data_root, cache, config.image_size, workers, strict=False, crop=config.crop)
    _print_problems(prepared.skipped, "image(s) skipped (unreadable)")
    try:
        return train_run(config, prepared, run_dir, data_root=data_root, resume=resume, progress=progress,
                         log=lambda message: console.print(message, highlight=False, soft_wrap=True))
    except (RunError, LeakageError, ValueError, WeightsError) as err:
        fail(str(err))


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, help="C-NMC data root (Kaggle or TCIA layout)."),
    config: Optional[str] = typer.Option(None, help="YAML run configuration or a preset: paper, subject."),
    model: Optional[str] = typer.Option(None, help="alnet (default), or a baseline: alexnet, vgg16, googlenet, "
                                        "resnet50."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained",
                                              help="Baselines: start from ImageNet weights (default) or scratch."),
    weights: Optional[Path] = typer.Option(None, help="Baselines: the ImageNet weights file to load."),
    finetune: Optional[bool] = typer.Option(None, "--finetune/--frozen", help="Baselines: train the backbone too."),
    protocol: Optional[str] = typer.Option(None, help="subject (default; leave-one-fold-out by subject) or "
                                            "paper (image-level 80/20 per fold, as published)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per fold (paper: 140)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 32)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (paper: 1e-4)."),
    dropout: Optional[float] = typer.Option(None, help="Dropout before the dense layer (paper: 0.2)."),
    image_size: Optional[int] = typer.Option(None, help="Input side in pixels (paper: 224; at least 136)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Online augmentation."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on capable CPUs, AMP on CUDA), 32, bf16, 16."),
    devices: Optional[int] = typer.Option(None, help="Processes/GPUs (with --strategy ddp)."),
    strategy: Optional[str] = typer.Option(None, help="Lightning strategy, e.g. ddp."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic",
                                                 help="Deterministic algorithms (use with --precision 32)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<protocol>-<time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: $ALNET_CACHE or the user cache)."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes for the cache."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Train a model (ALNet by default) under a protocol and test it: a run directory with metrics, figures."""
    if resume is not None:
        from .config import RunConfig

        data_json = resume / "data.json"
        if data is None and data_json.is_file():
            data = Path(json.loads(data_json.read_text())["root"] or "")

        if not (resume / "config.yaml").is_file():
            fail(f"{resume}: no config.yaml, so nothing to resume; start a new run with --out")
        run_config = RunConfig.from_yaml(resume / "config.yaml")
        run_dir = resume
    else:
        run_config = _load_config(config, model=model, pretrained=pretrained,
                                  weights=str(weights) if weights else None, finetune=finetune,
                                  protocol=protocol, epochs=epochs, batch_size=batch_size, lr=lr,
                                  dropout=dropout, image_size=image_size, augment=augment, precision=precision,
                                  devices=devices, strategy=strategy, seed=seed, deterministic=deterministic)
        if out_dir is None:
            import os
            import time

            # DDP relaunches this command in more processes: they inherit the name chosen here.
            default = Path("runs") / f"{run_config.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
            out_dir = Path(os.environ.setdefault("ALNET_RUN_DIR", str(default)))
        run_dir = out_dir
    if data is None:
        fail("--data is required: pass the folder holding the C-NMC dataset")
    result = _run(run_config, data, run_dir, cache, workers, resume=resume is not None, progress=progress)
    from .experiment import is_main_process

    if is_main_process():  # under DDP every rank gets here; one table is enough
        print_metrics(result, f"{run_config.model}, {result['protocol']} protocol")
        out.print(f"run directory: {run_dir}", highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    target: Path = typer.Argument(..., help="A run directory, or one checkpoint (.ckpt)."),
    data: Path = typer.Option(..., help="C-NMC data root to evaluate on."),
    split: str = typer.Option("auto", help="For a checkpoint: prelim, train or all labelled images "
                              "(auto: prelim when labelled, else train)."),
    include_seen: bool = typer.Option(False, help="For a checkpoint: keep subjects it was trained on "
                                      "(excluded by default: they would inflate every metric)."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes for the cache."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the metrics as JSON here."),
):
    """Re-test a finished run's checkpoints, or test one checkpoint on a dataset."""
    from .experiment import RunError, evaluate_checkpoint, evaluate_run

    try:
        if target.is_dir():
            from .config import RunConfig

            config = RunConfig.from_yaml(target / "config.yaml") if (target / "config.yaml").is_file() else None
            if config is None:
                fail(f"{target}: not a run directory (no config.yaml); pass a run directory or a .ckpt file")
            prepared = prepare_data(data, cache, config.image_size, workers, strict=False, crop=config.crop)
            result = evaluate_run(target, prepared)
            out_file = out_file or target / "evaluation.json"
        else:
            from .engine import load_module

            try:
                module = load_module(target)
            except (FileNotFoundError, ValueError) as err:
                fail(str(err))
            prepared = prepare_data(data, cache, module.config.image_size, workers, strict=False,
                                    crop=module.config.crop)
            result = evaluate_checkpoint(module, prepared, split, include_seen,
                                         log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except RunError as err:
        fail(str(err))
    print_metrics(result, f"evaluation of {target}")
    if out_file is not None:
        out_file.write_text(json.dumps(result, indent=2))
        out.print(f"metrics written to {out_file}", highlight=False, soft_wrap=True)


@app.command()
def compare(
    data: Path = typer.Option(..., help="C-NMC data root."),
    models: str = typer.Option("alnet,alexnet,vgg16,googlenet,resnet50", help="Comma-separated models."),
    config: Optional[str] = typer.Option(None, help="YAML run configuration or a preset: paper, subject."),
    protocol: Optional[str] = typer.Option(None, help="subject (default) or paper."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per fold, for every model."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch."),
    image_size: Optional[int] = typer.Option(None, help="Input side in pixels (224 as in the paper)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="Online augmentation (off: frozen baselines train on features "
                                           "computed once)."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained",
                                              help="Baselines from ImageNet weights (default) or from scratch."),
    finetune: Optional[bool] = typer.Option(None, "--finetune/--frozen", help="Baselines: train the backbone too."),
    precision: Optional[str] = typer.Option(None, help="auto, 32, bf16, 16."),
    seed: Optional[int] = typer.Option(None, help="Random seed, the same for every model."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Where the runs and tables go."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes for the cache."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Train and test several models under one protocol and seed; tables shaped like the paper's 8 and 9."""
    from .compare import compare as run_comparison
    from .data.protocols import LeakageError
    from .experiment import RunError
    from .models import WeightsError, available_models

    names = [m.strip().lower() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in available_models()]
    if unknown or not names:
        fail(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(available_models())}")
    base = _load_config(config, protocol=protocol, epochs=epochs, batch_size=batch_size, image_size=image_size,
                        augment=augment, pretrained=pretrained, finetune=finetune, precision=precision, seed=seed)
    prepared = prepare_data(data, cache, base.image_size, workers, strict=False, crop=base.crop)
    try:
        rows, table9 = run_comparison(names, base, prepared, out_dir, data_root=data, progress=progress,
                                      log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except (RunError, LeakageError, ValueError, WeightsError) as err:
        fail(str(err))
    table = Table(title=f"model comparison, {base.protocol} protocol (mean over test folds)")
    for column in ("model", "params", "recall", "prec", "acc", "F1", "spec", "AUC", "wF1", "time s", "img/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['trainable_parameters']:,}", *(_fmt(r[m]) for m in (
            "recall", "precision", "accuracy", "f1", "specificity", "auc", "weighted_f1")),
            f"{r['training_seconds']:.0f}", f"{r['images_per_s']:.1f}")
    out.print(table)
    out.print(f"tables: {out_dir / 'comparison.csv'}, {out_dir / 'comparison.md'}, {out_dir / 'report.html'}",
              highlight=False, soft_wrap=True)


def _checkpoint_of(target: Path) -> Path:
    """A checkpoint file, or the final model of a run directory (prelim, else fold_0)."""
    from .experiment import chosen_checkpoint

    if target.is_file():
        return target
    for fold in ("prelim", "fold_0"):
        chosen = chosen_checkpoint(target, fold)
        if chosen is not None:
            return chosen
    fail(f"{target}: neither a checkpoint file nor a finished run directory; pass a .ckpt or a run directory")


@app.command()
def explain(
    target: Path = typer.Argument(..., help="A run directory (its final model) or a checkpoint (.ckpt)."),
    image: Path = typer.Argument(..., help="A cell image in any format Pillow reads."),
    show_feature_maps: bool = typer.Option(False, "--feature-maps", help="Write feature maps (paper's Fig. 5)."),
    show_gradcam: bool = typer.Option(False, "--gradcam", help="Write a Grad-CAM overlay for the ALL output."),
    layer: Optional[list[str]] = typer.Option(None, help="Layer name(s) to show (default: the first and sixth "
                                              "layer; for Grad-CAM a late convolution)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the PNGs go (default explain-<image>/)."),
):
    """Show what a trained model computes on one image: feature maps and/or Grad-CAM."""
    from .engine import load_module
    from .explain import default_feature_layers, feature_maps, gradcam, image_tensor, plot_feature_maps

    if not (show_feature_maps or show_gradcam):
        fail("nothing to show: add --feature-maps and/or --gradcam")
    try:
        module = load_module(_checkpoint_of(target))
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    try:
        pixels, x = image_tensor(image, module.config.image_size, module.config.crop)
    except Exception as err:
        fail(f"{image}: cannot read this image ({type(err).__name__}: {err}); pass a cell image Pillow can open")
    out_dir = out_dir or Path(f"explain-{image.stem}")
    import torch

    with torch.no_grad():
        probability = float(module.probability_all(module.model.eval()(x))[0])
    out.print(f"{image}: P(ALL) = {probability:.3f} → {'ALL' if probability > 0.5 else 'HEM'} "
              f"({module.config.model})", highlight=False, soft_wrap=True)
    written = []
    try:
        if show_feature_maps:
            layers = layer or default_feature_layers(module.model)
            written += plot_feature_maps(feature_maps(module.model, x, layers), out_dir)
        if show_gradcam:
            written.append(gradcam(module.model, module.config.model, pixels, x, out_dir,
                                   layer[0] if layer and not show_feature_maps else None))
    except ValueError as err:
        fail(str(err))
    for path in written:
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def tune(
    data: Path = typer.Option(..., help="C-NMC data root; only its training folds are used."),
    grid: Path = typer.Option(Path("configs/grid.yaml"), help="Search space (see configs/grid.yaml)."),
    sampler: str = typer.Option("grid", help="grid (every combination, as the paper) or tpe."),
    trials: Optional[int] = typer.Option(None, help="Trials for --sampler tpe (default 20)."),
    config: Optional[str] = typer.Option(None, help="Base configuration (YAML or preset) under the grid."),
    image_size: Optional[int] = typer.Option(None, help="Input side in pixels."),
    seed: Optional[int] = typer.Option(None, help="Random seed (sampler and validation subjects)."),
    out_dir: Path = typer.Option(Path("runs/tune"), "--out", help="Study folder: study.db, trials.csv, best.yaml."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes for the cache."),
    progress: bool = typer.Option(False, help="Show a progress bar per trial."),
):
    """Grid (or TPE) search scored on validation subjects; resumable; writes the best configuration as YAML."""
    from .config import ConfigError
    from .tune import read_grid
    from .tune import tune as run_tune

    try:
        read_grid(grid)
    except ConfigError as err:
        fail(str(err))
    base = _load_config(config, image_size=image_size, seed=seed)
    prepared = prepare_data(data, cache, base.image_size, workers, strict=False, crop=base.crop)
    try:
        best, score, complete = run_tune(grid, prepared, out_dir, base, sampler, trials, progress=progress,
                                         log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except ConfigError as err:
        fail(str(err))
    table = Table(title=f"{len(complete)} finished trial(s), best first (validation accuracy)")
    names = list(complete[0].params)
    for column in ("trial", *names, "val acc"):
        table.add_column(column, justify="right")
    for t in sorted(complete, key=lambda t: -t.value):
        table.add_row(str(t.number), *(str(t.params[n]) for n in names), f"{t.value:.3f}")
    out.print(table)
    out.print(f"best validation accuracy {score:.3f}; configuration written to {out_dir / 'best.yaml'} "
              f"(train with: alnet train --data {data} --config {out_dir / 'best.yaml'})", highlight=False,
              soft_wrap=True)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A checkpoint (.ckpt) or an exported model (.onnx)."),
    paths: list[str] = typer.Argument(..., help="Image files, folders or globs (any size and format Pillow reads)."),
    out_file: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV with one row per image."),
    tta: bool = typer.Option(False, help="Average over flips (test-time augmentation)."),
    batch_size: int = typer.Option(64, help="Images per batch."),
):
    """Classify new cell images: path, label (ALL/HEM), P(ALL), model and checkpoint per row."""
    import csv

    from .predict import expand_paths, load_predictor, predict_files

    files, missing = expand_paths(paths)
    for item in missing:
        console.print(f"[yellow]{item}: matches no file; skipped[/]", highlight=False, soft_wrap=True)
    if not files:
        fail("no images to classify; pass image files, folders or globs")
    try:
        predictor = load_predictor(model)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    with progress_bar("classifying") as bar:
        task = bar.add_task("predict", total=len(files))
        rows, failed = predict_files(predictor, files, batch_size, tta,
                                     progress=lambda done, total: bar.update(task, completed=done))
    with open(out_file, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "probability_all", "model", "checkpoint"])
        writer.writeheader()
        writer.writerows(rows)
    n_all = sum(r["label"] == "ALL" for r in rows)
    out.print(f"{len(rows)} image(s) classified ({n_all} ALL, {len(rows) - n_all} HEM) → {out_file}",
              highlight=False, soft_wrap=True)
    _print_problems([f"{path}: cannot decode ({error}); skipped" for path, error in failed], "unreadable file(s)")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (.ckpt) written by `alnet train`."),
    onnx: Path = typer.Option(..., help="Where to write the ONNX model."),
):
    """Write an ONNX model (dynamic batch axis; outputs P(ALL)) with its preprocessing in the metadata."""
    from .export import export_onnx

    try:
        path = export_onnx(checkpoint, onnx)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    out.print(f"wrote {path}: input `image` float32 N×3×H×W in [0, 1], output `probability_all`; run it with "
              f"`alnet predict {path} IMAGES…`", highlight=False, soft_wrap=True)


@app.command()
def serve(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (.ckpt) or an exported model (.onnx)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, help="Port."),
):
    """Serve the model: a page at /, POST /predict, GET /health, OpenAPI docs at /docs."""
    import uvicorn

    from .serve import create_app

    try:
        application = create_app(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    out.print(f"serving {checkpoint} at http://{host}:{port}/ (API docs at /docs)", highlight=False, soft_wrap=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where the synthetic data, cache and run go."),
    epochs: int = typer.Option(10, help="Epochs per fold."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Generate a small SYNTHETIC dataset, prepare it, train ALNet (subject protocol), evaluate, summarise."""
    import shutil
    import time

    from .config import RunConfig
    from .data.synthetic import write_dataset

    start = time.perf_counter()
    data = out_dir / "synthetic-data"
    if not (data / "C-NMC_Leukemia").is_dir():
        console.print(f"writing a synthetic C-NMC dataset to {data} (synthetic cells, not real microscopy)")
        write_dataset(data, n_subjects=8, cells_per_subject=10, prelim_subjects=2, final_images=4, seed=0)
    run_dir = out_dir / "run"
    if run_dir.exists():
        console.print(f"replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    # Small data, few steps: batches of 16 and faster BatchNorm statistics than Keras' 0.99 (which needs a few
    # hundred steps before evaluation-mode outputs settle); everything else is the paper's.
    config = RunConfig(protocol="subject", epochs=epochs, batch_size=16, bn_momentum=0.5).validate()
    result = _run(config, data, run_dir, out_dir / "cache", None, resume=False, progress=progress)
    print_metrics(result, "ALNet demo on SYNTHETIC cells, subject-level protocol")
    out.print(f"run directory: {run_dir} (metrics.json, predictions.csv, history.csv, figures/); "
              f"took {time.perf_counter() - start:.0f} s", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
