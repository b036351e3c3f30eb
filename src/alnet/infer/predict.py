"""Prediction on new cell images with a trained checkpoint or an exported ONNX model.

Images are preprocessed exactly as for training (`alnet.data.transforms`: centre crop, resize), decoded in a
few threads (Pillow releases the GIL while decoding), and classified in batches.
"""

from __future__ import annotations

import glob
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from ..checkpoint import TrainedModel, load_trained_model
from ..data.cnmc import IMAGE_SUFFIXES
from ..data.transforms import Preprocessing, load_image, to_float
from ..device import resolve_precision
from ..labels import name_of
from ..trust.calibration import apply_temperature_torch
from ..trust.knowledge import checked_review
from ..trust.review import statuses

# keys `alnet export` writes
ONNX_METADATA = {"model": "alnet_model", "preprocessing": "alnet_preprocessing", "calibration": "alnet_calibration",
                 "review": "alnet_review"}
# One row per image. probability_all is calibrated (when the model is), probability_raw the network's own;
# status is ok or review (the label is still given), reason says why.
PREDICTION_FIELDS = ["path", "label", "probability_all", "probability_raw", "status", "reason", "model", "checkpoint",
                     "note"]
EARLIER_PREDICTION_FIELDS = (["path", "label", "probability_all", "model", "checkpoint", "note"],)  # still ours
SMALL_SIDE = 64  # pixels; a cell image this small carries too little detail for the answer to mean much


@dataclass
class Answers:
    """What a predictor says about a batch: calibrated and raw P(ALL), and per image (status, reason)."""

    probability_all: np.ndarray
    probability_raw: np.ndarray
    statuses: list[tuple[str, str]]


@dataclass
class Predictor:
    """P(ALL) of uint8 N×H×W×3 batches, from a checkpoint (torch) or an .onnx file (onnxruntime).

    `outputs(images)` gives (calibrated P(ALL), raw P(ALL)); without a calibration the two are equal."""

    source: Path
    model_name: str
    preprocessing: Preprocessing
    outputs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    trained: TrainedModel | None = None  # the network, when loaded from a checkpoint (Grad-CAM needs it)
    review: dict | None = None  # the review band ({"half_width": …}), when the model has one

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated P(ALL) of one batch, no test-time augmentation."""
        return self.outputs(images)[0]

    def __call__(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        return self.answer(images, tta).probability_all

    def answer(self, images: np.ndarray, tta: bool = False) -> Answers:
        """Calibrated and raw P(ALL) and the review status of each image; with `tta`, the mean over the four
        flips (identity, horizontal, vertical, both), and flips that disagree send the image to review."""
        if not tta:
            calibrated, raw = self.outputs(images)
            variants = None
        else:
            flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
            each = [self.outputs(np.ascontiguousarray(v)) for v in flips]
            variants = np.stack([c for c, _ in each])
            calibrated, raw = variants.mean(axis=0), np.mean([r for _, r in each], axis=0)
        return Answers(calibrated, raw, statuses(calibrated, (self.review or {}).get("half_width"), variants))


def _floats(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 N×H×W×3 batch (any view, e.g. a flipped one) → the float N×3×H×W model input on `device`
    (sent as uint8, a quarter of the bytes, and converted there)."""
    return to_float(torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device))


def load_predictor(path: Path | str, precision: str | None = None, accelerator: str = "auto") -> Predictor:
    """`precision` overrides the checkpoint's (e.g. "32" for exact fp32 arithmetic); `accelerator` "auto" runs
    a checkpoint on the GPU when there is one (bf16 AMP, channels-last), "cpu" keeps it on the CPU."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return _onnx_predictor(path)
    trained = load_trained_model(path)
    # The precision the run trained with unless told otherwise, on the device this machine offers.
    runs_as = resolve_precision(precision or trained.config.get("precision", "auto"), accelerator)
    device = torch.device(runs_as.device_type)
    model = trained.model.to(device)
    if runs_as.channels_last:
        model = model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = runs_as.input(_floats(images, device))
        with runs_as.autocast():
            raw = trained.probability_all(model(x)).float()
        calibrated = raw if trained.temperature is None else apply_temperature_torch(raw, trained.temperature)
        return calibrated.cpu().numpy(), raw.cpu().numpy()

    return Predictor(path, trained.name, trained.preprocessing, outputs, trained, trained.review)


def _onnx_predictor(path: Path) -> Predictor:
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model; write one with `alnet export CHECKPOINT --onnx FILE`")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # empty, truncated or not ONNX at all: onnxruntime raises its own error types
        raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({type(err).__name__}); pass a model "
                         "written by `alnet export`") from None
    meta = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA["preprocessing"] not in meta:
        raise ValueError(f"{path}: not an ONNX model written by `alnet export` (no preprocessing metadata)")
    try:
        preprocessing = Preprocessing.from_json(meta[ONNX_METADATA["preprocessing"]])
    except ValueError as err:
        raise ValueError(f"{path}: {err} in its metadata; export the model again with `alnet export`") from None
    try:
        review = checked_review(json.loads(meta[ONNX_METADATA["review"]])) if ONNX_METADATA["review"] in meta else None
    except (TypeError, ValueError, RecursionError) as err:  # JSON nested thousands deep is a RecursionError
        raise ValueError(f"{path}: unreadable review band in its metadata ({type(err).__name__}); export the "
                         "model again with `alnet export`") from None
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = _floats(images).contiguous().numpy()
        found = dict(zip(names, session.run(None, {input_name: x})))
        calibrated = found[names[0]].astype(np.float32)  # the first output is P(ALL) as the model answers it
        return calibrated, found.get("probability_raw", calibrated).astype(np.float32)

    return Predictor(path, meta.get(ONNX_METADATA["model"], "?"), preprocessing, outputs, review=review)


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
    return list(dict.fromkeys(found)), missing


def predict_files(predictor: Predictor, files: list[Path], batch_size: int = 64, tta: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], list[tuple[Path, str]]]:
    """One row per readable image (PREDICTION_FIELDS; `note` says what had to be done to the image, e.g.
    "resized from 5000x20"); unreadable ones listed."""
    rows, failed = [], []

    def decode(path: Path):
        try:
            with Image.open(path) as image:
                small = min(image.size) < SMALL_SIDE
            pixels, notes = load_image(path, predictor.preprocessing)
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
                answers = predictor.answer(np.stack([pixels for _, (pixels, _) in good]), tta=tta)
                for (path, (_, note)), p, raw, (status, reason) in zip(
                        good, answers.probability_all, answers.probability_raw, answers.statuses):
                    rows.append({"path": str(path), "label": name_of(p), "probability_all": f"{float(p):.6f}",
                                 "probability_raw": f"{float(raw):.6f}", "status": status, "reason": reason,
                                 "model": predictor.model_name, "checkpoint": str(predictor.source), "note": note})
            done += len(decoded)
            if progress:
                progress(done, len(files))
    return rows, failed
