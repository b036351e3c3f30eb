"""Commands that use a trained model: `predict`, `explain`, `export`, `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    check_output,
    console,
    fail,
    handles_errors,
    print_problems,
    printable,
    progress_bar,
    result,
    say,
    warn,
)
from .gate import GateOption, NoGateOption, image_check_from

CALIBRATION_IMAGES = 256  # as alnet.int8 (not imported here: --help stays fast)
FEW_CALIBRATION_IMAGES = 32  # fewer calibration cells than this get a warning
MAX_CALIBRATION_IMAGES = 4096  # held as uint8: 600 MB at 224 px
Int8Option = Annotated[bool, typer.Option(
    "--int8", help="Run the checkpoint's int8 form on the CPU (ALNet): about 2× faster than bf16; P(ALL) moves by "
    "a few hundredths; pictures beyond the calibrated ranges go through the network without int8 (`alnet "
    "quantize`, docs/design.md).")]


def _checkpoint_of(target: Path) -> Path:
    """A checkpoint file, or the model that stands for a run directory (its final model, else fold 0's)."""
    from ..checkpoint import not_a_file
    from ..train.rundir import RunDir

    if target.is_file():
        return target
    chosen = RunDir(target).final_checkpoint()
    if chosen is None:
        what = (not_a_file(target) if target.is_symlink() and not target.exists() else
                "neither a checkpoint file nor a finished run directory")
        fail(f"{target}: {what}; pass a .ckpt or a run directory")
    return chosen


@handles_errors
def explain(
    target: Annotated[Path, typer.Argument(help="A run directory (its final model) or a checkpoint (.ckpt).")],
    image: Annotated[Path, typer.Argument(help="A cell image in any format Pillow reads.")],
    show_feature_maps: Annotated[bool, typer.Option(
        "--feature-maps", help="Write feature maps (paper's Fig. 5).")] = False,
    show_gradcam: Annotated[bool, typer.Option(
        "--gradcam", help="Write a Grad-CAM overlay for the ALL output.")] = False,
    layer: Annotated[Optional[list[str]], typer.Option(
        help="Layer name(s) to show (default: the model's first and sixth layer; for Grad-CAM its late "
        "convolution).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Where the PNGs go (default explain-<image>/); a PNG of the same name is replaced only when "
        "explain wrote it, or with --force.")] = None,
    force: Annotated[bool, typer.Option(help="Replace PNGs in --out that explain did not write.")] = False,
    gate: GateOption = None,
    no_gate: NoGateOption = False,
):
    """Show what a trained model computes on one image: feature maps and/or Grad-CAM.

    The input gate runs first, as in `predict`: a picture it refuses (not one cell on black, or unlike the training
    cells) is still shown, with the reason, and its P(ALL) is marked as not counting."""
    from ..infer.explain import (
        GRADCAM_FILE,
        default_feature_layers,
        feature_maps,
        feature_maps_file,
        gradcam,
        plot_feature_maps,
        read_image,
        written_by_explain,
    )
    from ..infer.predict import load_pipeline
    from ..labels import Status

    if not (show_feature_maps or show_gradcam):
        fail("nothing to show: add --feature-maps and/or --gradcam")
    checkpoint = _checkpoint_of(target)
    pipeline = load_pipeline(checkpoint, accelerator="cpu", image_check=image_check_from(gate, no_gate),
                             features=not no_gate)
    trained = pipeline.trained
    try:
        pixels = read_image(image, trained.preprocessing)
    except Exception as err:
        fail(f"{image}: cannot read this image ({type(err).__name__}: {err}); pass a cell image Pillow can open")
    out_dir = out_dir or Path(f"explain-{image.stem}")
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"{out_dir}: exists and is not a folder; pass a folder for --out")
    layers = (layer or default_feature_layers(trained.name)) if show_feature_maps else []
    for name in [feature_maps_file(each) for each in layers] + ([GRADCAM_FILE] if show_gradcam else []):
        # checked before any work, as every output of alnet
        check_output(out_dir / name, force, written_by_explain(out_dir / name), inputs=(image,),
                      parent_must_exist=False)
    answer = pipeline.answer(pixels[None])[0]
    if not answer.answered:
        result(f"{image}: refused by the input gate: {answer.reason}. What the network computes on it is shown, but "
               f"its P(ALL) = {answer.probability_all:.3f} does not count ({trained.name}, {checkpoint})")
    else:
        result(f"{image}: P(ALL) = {answer.probability_all:.3f} → {answer.predicted}"
               + (f" (review: {answer.reason})" if answer.status is Status.REVIEW else "")
               + f" ({trained.name}, {checkpoint})")
    written = []
    if show_feature_maps:
        written += plot_feature_maps(feature_maps(trained.model, pixels, layers), out_dir)
    if show_gradcam:
        written.append(gradcam(trained.model, trained.name, pixels, out_dir,
                               layer[0] if layer and not show_feature_maps else None))
    for path in written:
        result(f"wrote {path}")


def _is_ours(path: Path, headers) -> bool:
    """Whether `path` starts with one of the CSV headers alnet writes (this version's or an earlier one's)."""
    from ..schema import header_of

    return header_of(path) in [list(h) for h in headers]


@handles_errors
def predict(
    model: Annotated[Path, typer.Argument(help="A checkpoint (.ckpt) or an exported model (.onnx).")],
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders or globs (BMP, PNG, JPEG, TIFF of any size; folders are searched "
        "recursively, directory links are not followed).")],
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", help="CSV with one row per image, default predictions.csv (an existing file is replaced only if it "
        "is a predictions CSV written by alnet, or with --force); with --format isbi the submission file, default "
        "isbi_valid.predict.")] = None,
    tta: Annotated[bool, typer.Option(help="Average over flips (test-time augmentation).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    force: Annotated[bool, typer.Option(
        help="Replace --out (and subjects.csv) even if it is not a CSV this command wrote.")] = False,
    output_format: Annotated[str, typer.Option(
        "--format", help="csv (one row per image) or isbi: the C-NMC challenge's submission file, one 0/1 line per "
        "image of the final test set in the order 1.bmp … N.bmp, refused images listed in <out>.refused.csv.")]
    = "csv",
    by_subject: Annotated[bool, typer.Option(
        "--by-subject", help="Also write subjects.csv next to --out: per subject the cells, those called ALL, "
        "the share called ALL with its 95% Wilson interval, the mean P(ALL), the subject's call and the cells "
        "rejected or flagged for review. Subjects come from C-NMC file names (UID_<subject>_…) or --subjects."
    )] = False,
    subjects_map: Annotated[Optional[Path], typer.Option(
        "--subjects", help="A CSV with columns path,subject (relative paths from the CSV's folder) naming each "
        "image's subject; implies --by-subject.")] = None,
    gate: GateOption = None,
    no_gate: NoGateOption = False,
    int8: Int8Option = False,
):
    """Classify new cell images: per row the path, the call (`predicted`: ALL/HEM), calibrated P(ALL) and the
    network's own, the status (ok; review when the answer is too close to call or --tta flips disagree, the call
    still given; rejected by the input gate, no call) with its reason, model, checkpoint and a note.

    An input gate runs first: a picture that is not one cell on a black background, or whose features lie far
    from the cells the model was trained on, gets status `rejected`, the reason in words and no call.
    Exits with status 1 when an input could not be classified (the last line says how many)."""
    from ..infer import isbi
    from ..infer.predict import expand_paths, load_pipeline, predict_files, prediction_row
    from ..labels import ALL, NAMES, Status
    from ..schema import (
        EARLIER_PREDICTION_HEADERS,
        EARLIER_SUBJECT_HEADERS,
        PREDICTION_FIELDS,
        SUBJECT_FIELDS,
        write_csv,
    )
    from ..trust.subjects import SUBJECTS_CSV, read_subject_map, subject_of, subject_rows

    if output_format not in ("csv", "isbi"):
        fail(f"--format {output_format}: unknown; pass csv or isbi")
    submission = output_format == "isbi"
    out_file = out_file or Path("isbi_valid.predict" if submission else "predictions.csv")
    files, missing = expand_paths(paths)
    for item in missing:
        reason = "not an image file (BMP, PNG, JPEG or TIFF)" if Path(item).is_file() else "matches no image file"
        warn(f"{item}: {reason}; skipped")
    if not files:
        fail("no images to classify; pass image files, folders or globs")
    by_subject = by_subject or subjects_map is not None
    if submission:
        if by_subject:
            fail("--by-subject writes subjects.csv beside a predictions CSV; use it with --format csv")
        files = isbi.submission_order(files)  # names checked before the model runs
        # 0/1 lines have no header to tell alnet's file from a user's list of true labels: any file needs --force.
        check_output(out_file, force, False, tuple(files))
        side = isbi.refused_csv_of(out_file)
        check_output(side, force, isbi.is_refused_csv(side), tuple(files))
    else:
        check_output(out_file, force, _is_ours(out_file, [PREDICTION_FIELDS, *EARLIER_PREDICTION_HEADERS]),
                     tuple(files))
    subjects_out = out_file.parent / SUBJECTS_CSV
    if by_subject:
        if out_file.name == SUBJECTS_CSV:
            fail(f"{out_file}: --by-subject writes {SUBJECTS_CSV} beside --out; give --out another name")
        check_output(subjects_out, force, _is_ours(subjects_out, [SUBJECT_FIELDS, *EARLIER_SUBJECT_HEADERS]),
                     tuple(files))
    mapping = read_subject_map(subjects_map) if subjects_map is not None else None
    pipeline = load_pipeline(model, image_check=image_check_from(gate, no_gate), features=not no_gate, int8=int8)
    with progress_bar("classifying") as bar:
        task = bar.add_task("predict", total=len(files))
        results, failed = predict_files(pipeline, files, batch_size, tta,
                                        progress=lambda done, total: bar.update(task, completed=done))
    print_problems([f"{path}: cannot decode ({error}); skipped" for path, error in failed], "unreadable file(s)")
    fallbacks = sum(r.answer.int8_fallback for r in results)
    if fallbacks:
        console.print(f"{fallbacks} image(s) reached the end of a range the int8 form was calibrated on and went "
                      "through the network without int8 (before the input gate's feature check)",
                      highlight=False, soft_wrap=True, markup=False)
    if not results:
        fail(f"none of the {len(files)} image(s) could be classified; {out_file} was not written", code=1)
    if submission:
        try:
            lines, refused = isbi.submission_lines(results, files, failed)
        except isbi.SubmissionError as err:
            fail(f"{err}; {out_file} was not written", code=1)
        side = isbi.write_submission(lines, refused, out_file)
        result(f"{len(lines)} image(s) 1 … {len(lines)} → {out_file} ({lines.count('1')} ALL, {lines.count('0')} "
               f"HEM); {len(refused)} refused by the input gate, written with the model's call and listed in {side}")
        return
    rows = [prediction_row(r, pipeline, subject_of(r.path, mapping)) for r in results]
    write_csv(out_file, rows, PREDICTION_FIELDS)
    n_all = sum(r["predicted"] == NAMES[ALL] for r in rows)
    noted = sum(bool(r["note"]) for r in rows)
    review = sum(r["status"] == Status.REVIEW for r in rows)
    refused = sum(r["status"] == Status.REJECTED for r in rows)
    answered = len(rows) - refused
    result(f"{answered} image(s) classified ({n_all} ALL, {answered - n_all} HEM"
           + (f"; {review} flagged for review" if review else "")
           + (f"; {noted} with a note" if noted else "") + ")"
           + (f", {refused} refused as not a cell (see `reason`)" if refused else "") + f" → {out_file}"
           + (f"; {len(failed)} could not be read" if failed else ""))
    if by_subject:
        per_subject = subject_rows(rows)
        write_csv(subjects_out, per_subject, SUBJECT_FIELDS)
        unknown = sum(not r["subject"] for r in rows)
        if unknown:
            warn(f"{unknown} image(s) with no subject (not named UID_<subject>_… "
                 f"{'and not in ' + str(subjects_map) if mapping is not None else 'and no --subjects'}"
                 "): counted under (unknown)")
        result(f"{len(per_subject)} subject(s) → {subjects_out}")
    if failed:
        raise typer.Exit(code=1)


@handles_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.ckpt) written by `alnet train`.")],
    onnx: Annotated[Path, typer.Option(help="Where to write the ONNX model.")],
    force: Annotated[bool, typer.Option(help="Replace an existing file at --onnx.")] = False,
    int8: Annotated[bool, typer.Option(
        "--int8", help="Write the checkpoint's int8 form (ALNet) as a QDQ graph: int8 weights, uint8 activations.")]
    = False,
):
    """Write an ONNX model (dynamic batch axis; outputs P(ALL), calibrated and the network's own, and the penultimate
    features) with its preprocessing, calibration, review band and input gate in the metadata."""
    from ..infer.export import export_onnx

    check_output(onnx, force, written_by_us=False, inputs=(checkpoint,), parent_must_exist=False)
    path = export_onnx(checkpoint, onnx, int8=int8)
    result(f"wrote {path}{' (int8)' if int8 else ''}: input `image` float32 N×3×H×W in [0, 1], outputs "
           f"`probability_all`, `probability_raw`, `features`{', `beyond_range`' if int8 else ''}; run it with "
           f"`alnet predict {path} IMAGES…`")
    if int8:
        console.print("the int8 graph cannot fall back to the network without int8: `alnet predict` refuses the "
                      "pictures it flags in `beyond_range` (activations at the end of a calibrated range), which "
                      "`alnet predict CHECKPOINT --int8` would still answer", highlight=False, soft_wrap=True,
                      markup=False)


@handles_errors
def quantize(
    target: Annotated[Path, typer.Argument(help="An ALNet checkpoint (.ckpt) or a run directory (its final model).")],
    data: Annotated[list[str], typer.Option(
        "--data", help="Cell images to calibrate on: the cells the model was trained on (files, folders searched "
        "recursively, or globs; repeat for several).")],
    limit: Annotated[int, typer.Option(min=1, max=MAX_CALIBRATION_IMAGES, help="Most images to use, drawn at random.")]
    = CALIBRATION_IMAGES,
    seed: Annotated[int, typer.Option(help="Seed of that draw.")] = 0,
):
    """Calibrate the int8 form of a trained ALNet on its training cells and store it in the checkpoint.

    Training does this already (on up to 256 training cells); use it for a checkpoint without an int8 calibration,
    or to calibrate on other cells. The checkpoint (a link's target) is rewritten in one step: a crash leaves the
    old file whole."""
    import numpy as np
    import torch

    from ..checkpoint import add_to_checkpoint, load_trained_model, writable_checkpoint
    from ..data.transforms import load_image
    from ..infer.predict import expand_paths
    from ..int8 import calibrate, supports_int8
    from ..schema import INT8_KEY

    checkpoint = _checkpoint_of(target)
    trained = load_trained_model(checkpoint)
    if not supports_int8(trained.model):
        fail(f"{checkpoint}: {trained.name} has no int8 form, only ALNet has; pass an ALNet checkpoint")
    rewritten = writable_checkpoint(checkpoint)  # refused before the work, not after
    if target.is_dir() and not rewritten.is_relative_to(target.resolve()):  # a run directory from elsewhere
        fail(f"{checkpoint}: leads out of {target} (to {rewritten}); pass that checkpoint itself to rewrite it")
    files, missing = expand_paths(data)
    print_problems([f"{item}: matches no image file; skipped" for item in missing], "--data item(s) without images")
    if not files:
        fail("no cell images to calibrate on; pass the training cells with --data")
    chosen = np.random.default_rng(seed).permutation(len(files))[:limit]
    images = np.empty((len(chosen), trained.preprocessing.size, trained.preprocessing.size, 3), dtype=np.uint8)
    read, unreadable = 0, []
    with progress_bar("reading cells") as bar:
        task = bar.add_task("read", total=len(chosen))
        for index in chosen:
            try:
                images[read] = load_image(files[index], trained.preprocessing)[0]
                read += 1
            except Exception as err:  # unreadable: listed, never fatal
                unreadable.append(f"{files[index]}: cannot decode ({type(err).__name__}); skipped")
            bar.update(task, advance=1)
    print_problems(unreadable, "unreadable file(s)")
    if read == 0:
        fail("none of the images could be read; nothing was calibrated")
    if read < FEW_CALIBRATION_IMAGES:
        warn(f"only {read} cell(s) to calibrate on: ranges seen on so few may not cover new cells (those are then "
             f"answered without int8); {CALIBRATION_IMAGES} training cells are usual")
    entry = calibrate(trained.model, torch.from_numpy(images[:read]))
    add_to_checkpoint(checkpoint, {INT8_KEY: entry})
    result(f"calibrated the int8 form of {checkpoint} on {entry['images']} cell(s); use it with `alnet predict "
           f"{checkpoint} IMAGES… --int8`, `alnet serve {checkpoint} --int8` or `alnet export {checkpoint} --int8`")


def _run_of(checkpoint: Path):
    """The run directory a checkpoint lives in (RUN/checkpoints/<fold>/x.ckpt), or None."""
    from ..train.rundir import RunDir

    parents = checkpoint.resolve().parents
    run = RunDir(parents[2]) if len(parents) > 2 else None
    return run if run is not None and run.exists() else None


def _test_image_of(run) -> Path | None:
    """A cell the run tested on (its predictions.csv), if one is still on disk: a C-NMC image (a training cell's
    name, or a test set's number) under the data root the run recorded. A run directory from elsewhere may name
    any file, and the image goes into a package that is shared."""
    import csv

    from ..data.cnmc import IMAGE_SUFFIXES, DatasetError, locate, parse_name

    def a_cell(path: Path) -> bool:
        try:
            return path.stem.isdigit() or bool(parse_name(path.name))
        except ValueError:
            return False

    root = run.data_root() if run is not None and run.predictions.is_file() else None
    if root is None or not root.is_absolute() or root.resolve() == Path(root.anchor):
        return None  # alnet records an absolute data root, never the file system's
    try:
        locate(root)  # a C-NMC layout, not any folder
        root = root.resolve()
        with open(run.predictions, newline="") as handle:
            for row in csv.DictReader(handle):
                path = Path(row.get("path") or "")
                if (path.suffix.lower() in IMAGE_SUFFIXES and a_cell(path) and path.is_file()
                        and path.resolve().is_relative_to(root)):
                    return path
    except (OSError, csv.Error, UnicodeDecodeError, ValueError, DatasetError):  # not as alnet writes them
        return None
    return None


@handles_errors
def package(
    target: Annotated[Path, typer.Argument(help="A checkpoint (.ckpt) or a run directory (its final model).")],
    out_dir: Annotated[Path, typer.Option("--out", help="The package folder to write (new or empty).")],
    image: Annotated[Optional[Path], typer.Option(
        help="A cell image for the test input and the cover (default: a C-NMC test cell of the checkpoint's run, "
        "under the data root it recorded).")]
    = None,
    zip_archive: Annotated[bool, typer.Option("--zip", help="Also write the package as OUT.zip.")] = False,
    author: Annotated[Optional[list[str]], typer.Option(
        help="Author of the trained model (repeat for several; default: alnet user).")] = None,
    maintainer: Annotated[Optional[list[str]], typer.Option(
        help="GitHub user name of a maintainer (bioimage.io asks for one; bioimageio.spec checks it online).")]
    = None,
    licence: Annotated[str, typer.Option("--license", help="SPDX licence of the package.")] = "CC-BY-4.0",
):
    """Write a bioimage.io model package: rdf.yaml (format 0.5), ONNX and TorchScript weights, test tensors,
    a Grad-CAM cover and the model card."""
    from ..checkpoint import load_trained_model
    from ..infer.package import FILES, build_package
    from ..report.model_card import checkpoint_card

    checkpoint = _checkpoint_of(target)
    trained = load_trained_model(checkpoint)  # first: a checkpoint that cannot be read is named in one line
    run = _run_of(checkpoint)
    if image is None:
        image = _test_image_of(run)
        if image is None:
            fail(f"{checkpoint}: no test image of its run is on disk; pass a cell image with --image")
        say(f"test input and cover: {printable(str(image))} (a test image of {printable(str(run.path))})")
    card = checkpoint_card(checkpoint, trained.config, run, trained.calibration)
    out = build_package(checkpoint, out_dir, image, card, authors=author, licence=licence, zip_archive=zip_archive,
                        maintainers=maintainer or [])
    result(f"wrote the bioimage.io package {out}/ ({', '.join(FILES.values())})"
           + (f" and {out.with_suffix('.zip')}" if zip_archive else ""))
    result("validate it (pip install 'alnet[bioimage]'): python -c \"from bioimageio.spec import load_description; "
           f"print(load_description('{out / FILES['rdf']}', perform_io_checks=True).validation_summary.status)\"")


@handles_errors
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.ckpt) or an exported model (.onnx).")],
    host: Annotated[str, typer.Option(
        help="Address to bind (loopback by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    max_batch: Annotated[int, typer.Option(
        min=1, max=256, help="Most images per forward pass: concurrent requests share one (1: one at a time).")]
    = 16,
    max_wait_ms: Annotated[float, typer.Option(
        min=0, max=1000, help="Most milliseconds a forming batch waits for requests still being decoded.")] = 5.0,
    gate: GateOption = None,
    no_gate: NoGateOption = False,
    int8: Int8Option = False,
):
    """Serve the model: a page at /, POST /predict, GET /health, OpenAPI docs at /docs.

    A picture the input gate refuses (not one cell on black, or unlike the training cells) is answered with
    422 and {"error", "reason"}, never with a call."""
    import uvicorn

    from ..infer.serve import create_app, port_in_use, uvicorn_settings

    if port_in_use(host, port):
        fail(f"{host}:{port} is already in use (another server?); stop it or pick another --port")
    application = create_app(checkpoint, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             image_check=image_check_from(gate, no_gate), features=not no_gate, int8=int8)
    result(f"serving {checkpoint}{' (int8)' if int8 else ''} at http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(application, host=host, port=port, **uvicorn_settings())
