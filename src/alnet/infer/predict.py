"""Prediction on new cell images with a trained checkpoint or an exported ONNX model.

Images are preprocessed exactly as for training (`alnet.data.transforms`: centre crop, resize), decoded in a
few threads (Pillow releases the GIL while decoding), and answered in batches by the model's pipeline
(`alnet.pipeline`: input gate, calibration, review band, test-time augmentation). What the CSV makes of each
answer is decided here: a refused picture gets its status and reason, and no call or probability.
"""

from __future__ import annotations

import glob
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from ..checkpoint import load_trained_model, not_a_file
from ..data.cnmc import IMAGE_SUFFIXES
from ..data.transforms import batch_to_float, load_image
from ..int8 import Int8Error
from ..pipeline import Answer, NetworkOutputs, Pipeline
from ..schema import OnnxMetadata
from ..trust.image_check import ImageCheck
from ..trust.input_gate import InputGate

SMALL_SIDE = 64  # pixels; a cell image this small carries too little detail for the answer to mean much
MAX_BATCH_BYTES = 2**30  # float32 model input per batch: 64 pictures at 224 px take 38 MB, at 4,096 px 12.9 GB


@dataclass(frozen=True)
class Predicted:
    """One picture's answer, with the file it came from and what had to be done to it."""

    path: Path
    answer: Answer
    note: str = ""


def load_pipeline(path: Path | str, precision: str | None = None, accelerator: str = "auto",
                  image_check: ImageCheck | None = ImageCheck(), features: bool = True,
                  int8: bool = False) -> Pipeline:
    """The pipeline of a checkpoint (`Pipeline.from_trained`, which explains the options) or of an ONNX file
    written by `alnet export` (onnxruntime, CPU; its own temperature, review band and feature gate)."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        return Pipeline.from_trained(load_trained_model(path), precision, accelerator, image_check, features, int8)
    if int8:
        raise Int8Error(f"{path}: --int8 applies to a checkpoint; an ONNX model is int8 when it was written by "
                        "`alnet export --int8`, and runs as it is")
    pipeline = _onnx_pipeline(path)
    pipeline.gate = InputGate(image_check, pipeline.gate.features if features else None)
    return pipeline


def _onnx_pipeline(path: Path) -> Pipeline:
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path}: {not_a_file(path, 'ONNX model')}; write one with `alnet export CHECKPOINT "
                                "--onnx FILE`")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # empty, truncated or not ONNX at all: onnxruntime raises its own error types
        raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({type(err).__name__}); pass a model "
                         "written by `alnet export`") from None
    meta = OnnxMetadata.read(session.get_modelmeta().custom_metadata_map, path)
    declared = {o.name: o for o in session.get_outputs()}
    if meta.input_gate is not None:
        width = declared["features"].shape[-1] if "features" in declared else None
        if width != meta.input_gate.mean.numel():
            raise ValueError(f"{path}: its input gate does not fit its `features` output; export the model again "
                             "with `alnet export`")
    beyond_output = declared.get("beyond_range")
    if meta.int8 and (beyond_output is None or beyond_output.type != "tensor(bool)" or len(beyond_output.shape) != 1):
        raise ValueError(f"{path}: an int8 model without a one-per-image boolean beyond_range output, so nothing would "
                         "flag the pictures it clips; export it again with `alnet export --int8`")
    declared_input = session.get_inputs()[0]
    sides = [d for d in declared_input.shape[2:] if isinstance(d, int)]
    if any(side != meta.preprocessing.size for side in sides):
        raise ValueError(f"{path}: its metadata says {meta.preprocessing.size} px pictures, its graph takes "
                         f"{declared_input.shape}; export the model again with `alnet export`")
    input_name = declared_input.name
    names = list(declared)
    # The graph applies its temperature itself (first output); the pipeline applies it to the network's own P(ALL)
    # as for a checkpoint. A graph without that output gives only its answer, taken as it is.
    has_raw = "probability_raw" in declared

    def network(pictures: np.ndarray) -> NetworkOutputs:
        x = batch_to_float(pictures).contiguous().numpy()
        found = dict(zip(names, session.run(None, {input_name: x})))
        beyond = found.get("beyond_range")
        if beyond is not None and np.shape(beyond) != (len(pictures),):
            raise ValueError(f"{path}: its beyond_range output does not give one value per image; export the model "
                             "again with `alnet export --int8`")
        raw = np.asarray(found["probability_raw" if has_raw else names[0]], dtype=np.float32)
        if raw.ndim == 2 and raw.shape[1] == 1:  # N×1, as a bioimage.io-style graph answers
            raw = raw[:, 0]
        return NetworkOutputs(raw, found.get("features"), None if beyond is None else np.asarray(beyond, dtype=bool))

    return Pipeline(network, meta.model, meta.preprocessing, path, meta.calibration if has_raw else None,
                    meta.review, InputGate(None, meta.input_gate), "int8" if meta.int8 else "")


def _images_below(folder: Path) -> list[Path]:
    """Image files below `folder`, never following a directory link (a link to `..` would list the world)."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        found += [Path(parent) / name for name in sorted(files)
                  if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(parent) / name).is_file()]  # no FIFOs
    return found


def _glob_root(pattern: str) -> Path:
    """The part of a glob pattern before its first wildcard: links there were named by the user."""
    fixed = []
    for part in Path(pattern).parts:
        if re.search(r"[*?[]", part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _through_a_directory_link(path: Path, start: Path) -> bool:
    """Whether `path` lies below a linked directory somewhere under `start` (a glob's literal prefix)."""
    return any(parent.is_symlink() for parent in path.parents if parent != start and start in parent.parents)


def expand_paths(items: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Files, folders (searched recursively) and globs → image files; plus what matched no image.

    One rule for all three: only files with an image suffix (IMAGE_SUFFIXES) count, and directory links are
    never followed below a folder or a glob's fixed part."""
    found, missing = [], []
    for item in items:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            matches = _images_below(path)
        elif path.is_file():
            matches = [path] if path.suffix.lower() in IMAGE_SUFFIXES else []
        else:
            start = _glob_root(item)
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True)
                             if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_SUFFIXES
                             and not _through_a_directory_link(Path(m), start))
        found += matches
        if not matches:
            missing.append(item)
    unique: dict[Path, Path] = {}  # one file is one row, however many spellings name it (a.png, ./a.png, /x/a.png)
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values()), missing


def predict_files(pipeline: Pipeline, files: list[Path], batch_size: int = 64, tta: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[Predicted], list[tuple[Path, str]]]:
    """An answer per readable image (`note` says what had to be done to it, e.g. "resized from 5000x20"), and the
    unreadable ones with why: listed, never fatal. Batches hold at most MAX_BATCH_BYTES of model input, whatever
    picture size the model asks for."""
    results, failed = [], []
    batch_size = max(1, min(batch_size, MAX_BATCH_BYTES // (4 * 3 * pipeline.preprocessing.size ** 2)))

    def decode(path: Path):
        try:
            with Image.open(path) as image:
                small = min(image.size) < SMALL_SIDE
            pixels, notes = load_image(path, pipeline.preprocessing)
            if small:
                notes.append(f"very small image (under {SMALL_SIDE} px a side): the answer means little")
            return path, (pixels, "; ".join(notes)), None
        except Exception as err:  # unreadable: listed, never fatal
            return path, None, f"{type(err).__name__}: {err}"

    done = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(files), batch_size):
            decoded = list(pool.map(decode, files[start:start + batch_size]))
            good = [(p, image) for p, image, error in decoded if error is None]
            failed += [(p, error) for p, _, error in decoded if error is not None]
            if good:
                answers = pipeline.answer(np.stack([pixels for _, (pixels, _) in good]), tta=tta)
                results += [Predicted(path, answer, note) for (path, (_, note)), answer in zip(good, answers)]
            done += len(decoded)
            if progress:
                progress(done, len(files))
    return results, failed


def prediction_row(result: Predicted, pipeline: Pipeline, subject: str = "") -> dict:
    """`alnet predict`'s predictions.csv row (`alnet.schema.PREDICTIONS`): a refused picture has its status and
    reason, and no call or probability."""
    answer, answered = result.answer, result.answer.answered
    return {"fold": "", "path": str(result.path), "subject": subject, "label": "",
            "predicted": answer.predicted if answered else "",
            "probability_all": f"{answer.probability_all:.6f}" if answered else "",
            "probability_raw": f"{answer.probability_raw:.6f}" if answered else "",
            "status": answer.status.value, "reason": answer.reason, "model": pipeline.described,
            "checkpoint": str(pipeline.source), "note": result.note}
