"""Commands that train and test: `train`, `evaluate`, `compare`, `tune`, `demo`."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    AugmentOption,
    BatchSizeOption,
    CacheOption,
    ConfigOption,
    DataOption,
    EpochsOption,
    FinetuneOption,
    ImageSizeOption,
    LoggerOption,
    MlflowUriOption,
    PrecisionOption,
    PretrainedOption,
    ProgressOption,
    ProtocolOption,
    SeedOption,
    SyntheticOption,
    SyntheticRatioOption,
    WorkersOption,
    check_output,
    fail,
    handles_errors,
    prepare_data,
    print_table,
    result,
    say,
)
from .gate import GateOption, NoGateOption, image_check_from


def print_metrics(metrics: dict, title: str) -> None:
    """metrics.json's content as a table: one row per test set, mean and std over folds, the prelim set."""
    from ..report.tables import METRIC_COLUMNS, SHORT_NAMES_LEGEND, number

    rows = [[f["fold"], *(c.cell(f) for c in METRIC_COLUMNS), str(f["images"])] for f in metrics["folds"]]
    bold = set()
    if len(metrics["folds"]) > 1:
        summary = metrics["summary"]
        bold.add(len(rows))
        rows.append(["mean", *(number(summary[c.key]["mean"]) for c in METRIC_COLUMNS), ""])
        rows.append(["std", *(number(summary[c.key]["std"]) for c in METRIC_COLUMNS), ""])
    if metrics.get("prelim"):
        prelim = metrics["prelim"]
        bold.add(len(rows))
        rows.append(["prelim", *(c.cell(prelim) for c in METRIC_COLUMNS), str(prelim["images"])])
    print_table(title, ["test set", *(c.short for c in METRIC_COLUMNS), "images"], rows, bold)
    result(SHORT_NAMES_LEGEND)
    _print_trust(metrics)
    for entry in [*metrics["folds"], *([metrics["prelim"]] if metrics.get("prelim") else [])]:
        gate = entry.get("input_gate") or {}
        if gate.get("rejected"):
            reasons = ", ".join(f"{n} {kind}" for kind, n in gate["reasons"].items())
            result(f"{entry['fold']}: the input gate refused {gate['rejected']} of {gate['images']} test cells "
                   f"({reasons}); they stay in the metrics")
    if metrics.get("note"):
        result(f"protocol {metrics['protocol']}: {metrics['note']}")


def _print_trust(metrics: dict) -> None:
    """Calibration before → after, subject-level figures with their subject-bootstrap intervals, review."""
    from rich.markup import escape

    from ..report.trust import trust_table, uncalibrated_note

    header, rows = trust_table(metrics)
    if rows:
        print_table("calibration, subjects and review", header, [[escape(c) for c in row] for row in rows])
    note = uncalibrated_note(metrics)
    if note:
        result(note)


def _is_metrics_json(path: Path) -> bool:
    """A metrics file alnet wrote (evaluate's --out): a JSON object with `protocol` and `folds`."""
    import json

    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 2**26:  # never opens a pipe
            return False
        content = json.loads(path.read_text())
        return isinstance(content, dict) and {"protocol", "folds"} <= set(content)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def _tracking(logger: str, mlflow_uri: str | None):
    """The experiment logger asked for, checked (known, extra installed) before any image is decoded."""
    from ..train.loggers import Tracking

    return Tracking(logger.strip().lower(), mlflow_uri).check()


def _train(config, data: Path, run_dir: Path, cache, workers, resume: bool, progress: bool, tracking=None) -> dict:
    from ..train.run import train_run

    prepared = prepare_data(data, cache, workers, config.preprocessing, progress=progress)
    return train_run(config, prepared, run_dir, data_root=data, resume=resume, progress=progress, log=say,
                     tracking=tracking)


@handles_errors
def train(
    data: Annotated[Optional[Path], typer.Option(help="C-NMC data root (Kaggle or TCIA layout).")] = None,
    config: ConfigOption = None,
    model: Annotated[Optional[str], typer.Option(
        help="alnet (default), a baseline: alexnet, vgg16, googlenet, resnet50, or a hybrid of frozen features and "
             "a scikit-learn classifier: BACKBONE[,BACKBONE…]+[pca+]svm|rf|knn, e.g. resnet50+svm, vgg16+pca+rf, "
             "alexnet,resnet50+svm (features concatenated).")] = None,
    features_from: Annotated[Optional[Path], typer.Option(
        help="Hybrids with an alnet backbone: the trained alnet run directory (same protocol and seed: each fold "
             "uses its own checkpoint) or one checkpoint, whose penultimate features are used.")] = None,
    pretrained: PretrainedOption = None,
    weights: Annotated[Optional[Path], typer.Option(help="Baselines: the ImageNet weights file to load.")] = None,
    finetune: FinetuneOption = None,
    protocol: ProtocolOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (paper: 1e-4).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout before the dense layer (paper: 0.2).")] = None,
    image_size: ImageSizeOption = None,
    augment: AugmentOption = None,
    precision: PrecisionOption = None,
    devices: Annotated[Optional[int], typer.Option(help="Processes/GPUs (with --strategy ddp).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Lightning strategy, e.g. ddp.")] = None,
    seed: SeedOption = None,
    deterministic: Annotated[Optional[bool], typer.Option(
        "--deterministic/--no-deterministic", help="Deterministic algorithms (use with --precision 32).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Run directory (default runs/<protocol>-<time>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue the run in this directory from its last checkpoint.")] = None,
    synthetic: SyntheticOption = None,
    synthetic_ratio: SyntheticRatioOption = None,
    cache: CacheOption = None,
    workers: WorkersOption = None,
    logger: LoggerOption = "csv",
    mlflow_uri: MlflowUriOption = None,
    progress: ProgressOption = True,
):
    """Train a model (ALNet by default) under a protocol and test it: a run directory with metrics, figures."""
    from ..config import RunConfig
    from ..train.rundir import RunDir, default_run_dir
    from ..train.trainer import is_main_process

    if resume is not None:
        run = RunDir(resume)
        if not run.exists():
            fail(f"{resume}: no config.yaml, so nothing to resume; start a new run with --out")
        settings = {"--config": config, "--model": model, "--pretrained": pretrained, "--weights": weights,
                    "--finetune": finetune, "--features-from": features_from, "--protocol": protocol,
                    "--epochs": epochs, "--batch-size": batch_size, "--lr": lr, "--dropout": dropout,
                    "--image-size": image_size, "--augment": augment, "--seed": seed, "--synthetic": synthetic,
                    "--synthetic-ratio": synthetic_ratio, "--out": out_dir}
        given = [name for name, value in settings.items() if value is not None]
        if given:
            fail(f"--resume continues {resume} with the settings in its config.yaml, so {', '.join(given)} would "
                 f"be ignored; leave {'it' if len(given) == 1 else 'them'} out, or start a new run without --resume")
        runtime = {"precision": precision, "devices": devices, "strategy": strategy, "deterministic": deterministic}
        run_config = replace(RunConfig.from_yaml(run.config),  # where and how fast: a resume may change these
                             **{key: value for key, value in runtime.items() if value is not None})
        data = data or run.data_root()
        run_dir = resume
    else:
        run_config = RunConfig.load(config, model=model, pretrained=pretrained,
                                    weights=str(weights) if weights else None, finetune=finetune,
                                    features_from=str(features_from) if features_from else None,
                                    protocol=protocol, epochs=epochs, batch_size=batch_size, lr=lr,
                                    dropout=dropout, image_size=image_size, augment=augment, precision=precision,
                                    devices=devices, strategy=strategy, seed=seed, deterministic=deterministic,
                                    synthetic=str(synthetic.absolute()) if synthetic else None,
                                    synthetic_ratio=synthetic_ratio)
        run_dir = out_dir or default_run_dir(run_config.protocol)
        _check_synthetic(run_config, synthetic_ratio)
    if data is None:
        fail("--data is required: pass the folder holding the C-NMC dataset")
    tracking = _tracking(logger, mlflow_uri)
    metrics = _train(run_config, data, run_dir, cache, workers, resume=resume is not None, progress=progress,
                     tracking=tracking)
    if is_main_process():  # under DDP every rank gets here; one table is enough
        print_metrics(metrics, f"{run_config.model}, {metrics['protocol']} protocol")
        result(f"run directory: {run_dir}")


@handles_errors
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory, or one checkpoint (.ckpt).")],
    data: Annotated[Path, typer.Option(help="C-NMC data root to evaluate on.")],
    split: Annotated[str, typer.Option(help="For a checkpoint: prelim, train or all labelled images (auto: prelim "
                                       "when labelled, else train).")] = "auto",
    include_seen: Annotated[bool, typer.Option(help="For a checkpoint: keep subjects it was trained on (excluded "
                                               "by default: they would inflate every metric).")] = False,
    cache: CacheOption = None,
    workers: WorkersOption = None,
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the metrics as JSON here (default for a run: RUN/evaluation.json).")] = None,
    force: Annotated[bool, typer.Option(help="Replace --out even if it is not an alnet metrics file.")] = False,
    progress: ProgressOption = True,
    gate: GateOption = None,
    no_gate: NoGateOption = False,
):
    """Re-test a finished run's checkpoints, or test one checkpoint on a dataset.

    The input gate screens every test cell as `predict` would; the metrics still cover every cell, and each test
    set's `input_gate` says how many the gate refused and why."""
    from ..config import RunConfig
    from ..train.evaluate import checkpoint_pipeline, evaluate_checkpoint, evaluate_run
    from ..train.rundir import RunDir

    image_check = image_check_from(gate, no_gate)
    run = RunDir(target) if target.is_dir() else None
    if run is not None and not run.exists():
        fail(f"{target}: not a run directory (no config.yaml); pass a run directory or a .ckpt file")
    out_file = out_file or (run.evaluation if run is not None else None)
    if out_file is not None:  # checked before the work, not after (RUN/evaluation.json too: a link, a folder)
        check_output(out_file, force, _is_metrics_json(out_file), inputs=(target,))
    if run is not None:
        config = RunConfig.from_yaml(run.config)
        metrics = evaluate_run(run.path, prepare_data(data, cache, workers, config.preprocessing, progress=progress),
                               image_check, gate=not no_gate)
    else:
        pipeline = checkpoint_pipeline(target, image_check, gate=not no_gate)
        prepared = prepare_data(data, cache, workers, pipeline.preprocessing, progress=progress)
        metrics = evaluate_checkpoint(pipeline, prepared, split, include_seen, log=say)
    print_metrics(metrics, f"evaluation of {target}")
    if out_file is not None:
        import json

        from ..schema import write_text

        write_text(out_file, json.dumps(metrics, indent=2))
        result(f"metrics written to {out_file}")


@handles_errors
def compare(
    data: DataOption,
    models: Annotated[str, typer.Option(help=(
        "Models separated by commas, or by semicolons or spaces when one is an ensemble of concatenated features "
        "(\"alnet; resnet50+svm; alexnet,resnet50+svm\"). Hybrids: BACKBONE[,BACKBONE…]+[pca+]svm|rf|knn; an "
        "alnet backbone takes the features of the alnet trained earlier in the same comparison."))]
    = "alnet,alexnet,vgg16,googlenet,resnet50",
    features_from: Annotated[Optional[Path], typer.Option(
        help="Hybrids with an alnet backbone: a trained alnet run directory (default: this comparison's alnet).")]
    = None,
    config: ConfigOption = None,
    protocol: ProtocolOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = None,
    image_size: ImageSizeOption = None,
    augment: AugmentOption = None,
    pretrained: PretrainedOption = None,
    finetune: FinetuneOption = None,
    precision: PrecisionOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed, the same for every model.")] = None,
    synthetic: SyntheticOption = None,
    synthetic_ratio: SyntheticRatioOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the runs and tables go.")] = Path("runs/compare"),
    cache: CacheOption = None,
    workers: WorkersOption = None,
    logger: LoggerOption = "csv",
    mlflow_uri: MlflowUriOption = None,
    progress: ProgressOption = True,
):
    """Train and test several models under one protocol and seed; tables shaped like the paper's 8 and 9."""
    from ..config import RunConfig
    from ..models import available_models, is_model, split_model_list
    from ..report.html import comparison_rows
    from ..report.tables import COMPARISON
    from ..train.compare import compare as run_comparison
    from ..train.rundir import ComparisonDir

    names = split_model_list(models)
    unknown = [m for m in names if not is_model(m)]
    if unknown or not names:
        fail(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(available_models())} or "
             "hybrids such as resnet50+svm")
    base = RunConfig.load(config, protocol=protocol, epochs=epochs, batch_size=batch_size, image_size=image_size,
                          augment=augment, pretrained=pretrained, finetune=finetune, precision=precision, seed=seed,
                          features_from=str(features_from) if features_from else None,
                          synthetic=str(synthetic.absolute()) if synthetic else None, synthetic_ratio=synthetic_ratio)
    _check_synthetic(base, synthetic_ratio)
    tracking = _tracking(logger, mlflow_uri)
    prepared = prepare_data(data, cache, workers, base.preprocessing, progress=progress)
    rows, _ = run_comparison(names, base, prepared, out_dir, data_root=data, progress=progress, log=say,
                             tracking=tracking)
    listed = comparison_rows(rows)
    print_table(f"model comparison, {base.protocol} protocol (mean over test folds; paper rows as published)",
                [c.short for c in COMPARISON], [[c.cell(row) for c in COMPARISON] for _, row in listed],
                bold_rows={i for i, (cls, _) in enumerate(listed) if cls == ""})
    comparison = ComparisonDir(out_dir)
    tables = [comparison.csv, comparison.markdown, comparison.report]
    if synthetic:
        _print_generated(comparison)
        tables.append(comparison.generated)
    result(f"tables: {', '.join(map(str, tables))}")


def _check_synthetic(config, ratio_given: float | None) -> None:
    """--synthetic-ratio needs --synthetic; a GAN folder named in a YAML file is kept as an absolute path, so that
    a resume from another folder finds the same GANs."""
    if ratio_given is not None and not config.synthetic:
        fail("--synthetic-ratio needs --synthetic GAN_DIR (the GANs to draw the generated cells from)")
    if config.synthetic:
        config.synthetic = str(Path(config.synthetic).absolute())


def _print_generated(comparison) -> None:
    """The paired difference with minus without generated cells, as compare wrote it."""
    import json

    found = json.loads(comparison.generated.read_text())["difference"]
    rows = [[model, level, metric, f"{d['before']:.3f}", f"{d['after']:.3f}", f"{d['difference']:+.3f}",
             f"[{d['interval']['low']:+.3f}, {d['interval']['high']:+.3f}]"]
            for model, levels in found.items() for level in ("image", "subject")
            for metric, d in levels[level].items()]
    print_table("with generated cells minus without (same splits and seed; 95% interval resampling subjects)",
                ["model", "level", "metric", "without", "with", "difference", "interval"], rows, left=3)
    first = next(iter(found.values()), None)
    if first:  # why these can differ from the table above, which averages the folds
        result(f"pooled over every test fold's cells ({first['cells']} cells of {first['subjects']} subjects), so "
               "they can differ from the means over folds above; an interval holding 0 is no difference these "
               "subjects can resolve")


@handles_errors
def tune(
    data: Annotated[Path, typer.Option(help="C-NMC data root; only its training folds are used.")],
    grid: Annotated[str, typer.Option(help="Search space: a YAML file or the packaged preset `grid` (the paper's "
                                      "grid; see alnet/configs/grid.yaml).")] = "grid",
    sampler: Annotated[str, typer.Option(help="grid (every combination, as the paper) or tpe.")] = "grid",
    trials: Annotated[Optional[int], typer.Option(help="Trials for --sampler tpe (default 20).")] = None,
    config: Annotated[Optional[str], typer.Option(
        help="Base configuration (YAML or preset) under the grid.")] = None,
    image_size: ImageSizeOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (sampler and validation subjects).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Study folder: study.db, trials.csv, best.yaml.")]
    = Path("runs/tune"),
    storage: Annotated[Optional[str], typer.Option(
        help="Share the study between workers (several machines, or several runs on one): an optuna storage URL "
        "(postgresql://USER:PASSWORD@HOST/DB, mysql+pymysql://…) or journal:FILE on a shared file system. Start "
        "`alnet tune` with the same --storage, grid and settings on each machine: every grid point runs once, a "
        "point whose worker died runs again, and each worker writes the same results to its --out. Default: "
        "OUT/study.db (this machine only).")] = None,
    cache: CacheOption = None,
    workers: WorkersOption = None,
    logger: LoggerOption = "csv",
    mlflow_uri: MlflowUriOption = None,
    progress: ProgressOption = False,
):
    """Grid (or TPE) search scored on validation subjects; resumable; writes the best configuration as YAML."""
    from ..config import RunConfig
    from ..train.study import check_storage
    from ..train.tune import read_grid
    from ..train.tune import tune as run_tune

    read_grid(grid)  # a bad grid (or storage) is refused before any image is decoded
    check_storage(storage)
    tracking = _tracking(logger, mlflow_uri)
    base = RunConfig.load(config, image_size=image_size, seed=seed)
    prepared = prepare_data(data, cache, workers, base.preprocessing, progress=progress)
    best, score, complete = run_tune(grid, prepared, out_dir, base, sampler, trials, progress=progress, log=say,
                                     storage=storage, tracking=tracking)
    names = list(complete[0].params)
    rows = [[str(t.number), *(str(t.params[n]) for n in names), f"{t.value:.3f}"]
            for t in sorted(complete, key=lambda t: -t.value)]
    print_table(f"{len(complete)} finished trial(s), best first (validation accuracy)",
                ["trial", *names, "val acc"], rows, left=0)
    result(f"best validation accuracy {score:.3f}; configuration written to {out_dir / 'best.yaml'} "
           f"(train with: alnet train --data {data} --config {out_dir / 'best.yaml'})")


@handles_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the synthetic data, cache and run go.")]
    = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(help="Epochs per fold.")] = 10,
    progress: ProgressOption = True,
):
    """Generate a small SYNTHETIC dataset, prepare it, train ALNet (subject protocol), evaluate, summarise."""
    import shutil

    from ..config import RunConfig
    from ..data.synthetic import write_dataset
    from ..train.rundir import RunDir

    start = time.perf_counter()
    data = out_dir / "synthetic-data"
    run = RunDir(out_dir / "run")
    if run.path.exists() and not (run.exists() and run.data_root() == data.resolve()):  # before writing data
        fail(f"{run}: exists and is not this demo's earlier run; move it away or pick another --out")
    if not (data / "C-NMC_Leukemia").is_dir():
        say(f"writing a synthetic C-NMC dataset to {data} (synthetic cells, not real microscopy)")
        write_dataset(data, n_subjects=8, cells_per_subject=10, prelim_subjects=2, final_images=4, seed=0)
    if run.path.exists():  # this demo's own earlier run (checked above)
        say(f"replacing the previous demo run in {run}")
        shutil.rmtree(run.path)
    # Small data, few steps: batches of 16 and faster BatchNorm statistics than Keras' 0.99 (which needs a few
    # hundred steps before evaluation-mode outputs settle); everything else is the paper's.
    config = RunConfig(protocol="subject", epochs=epochs, batch_size=16, bn_momentum=0.5).validate()
    metrics = _train(config, data, run.path, out_dir / "cache", None, resume=False, progress=progress)
    print_metrics(metrics, "ALNet demo on SYNTHETIC cells, subject-level protocol")
    result(f"run directory: {run} (metrics.json, predictions.csv, history.csv, figures/, report.html); "
           f"took {time.perf_counter() - start:.0f} s")

