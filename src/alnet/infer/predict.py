"""Prediction on new cell images with a trained checkpoint or an exported ONNX model.

Images are preprocessed exactly as for training (`alnet.data.transforms`: centre crop, resize), decoded in a
few threads (Pillow releases the GIL while decoding), and classified in batches. The input gate runs first
(`alnet.trust`): an image that is not one cell on black, or whose features lie far from the training cells', is
refused with a reason and gets no label.
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
import torch
from PIL import Image

from ..checkpoint import TrainedModel, load_trained_model
from ..data.cnmc import IMAGE_SUFFIXES
from ..data.transforms import Preprocessing, load_image, to_float
from ..device import resolve_precision
from ..labels import name_of
from ..trust.features import FeatureGate, penultimate
from ..trust.gate import ImageCheck
from ..trust.screen import OK, REJECTED, InputGate

ONNX_METADATA = {"model": "alnet_model", "preprocessing": "alnet_preprocessing",  # keys `alnet export` writes
                 "input_gate": "alnet_input_gate"}
# One row per image; a refused one has no label or probability, status `rejected` and a reason.
PREDICTION_FIELDS = ["path", "label", "probability_all", "model", "checkpoint", "note", "status", "reason"]
SMALL_SIDE = 64  # pixels; a cell image this small carries too little detail for the answer to mean much


@dataclass
class Predictor:
    """P(ALL) of uint8 N×H×W×3 batches, from a checkpoint (torch) or an .onnx file (onnxruntime)."""

    source: Path
    model_name: str
    preprocessing: Preprocessing
    outputs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # P(ALL), penultimate features
    trained: TrainedModel | None = None  # the network, when loaded from a checkpoint (Grad-CAM needs it)
    gate: InputGate = InputGate()  # what refuses images that are not cells

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.outputs(images)[0]

    def __call__(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        return self.screen(images, tta, gate=False)[0]

    def screen(self, images: np.ndarray, tta: bool = False, gate: bool = True, answer_refused: bool = False
               ) -> tuple[np.ndarray, list[str | None]]:
        """(P(ALL), the gate's reason or None) per image; a refused image's P(ALL) is NaN unless `answer_refused`
        (a file that needs an answer for every image, e.g. a challenge submission). The image check runs before
        the model, which sees only the images it let through (all of them with `answer_refused`)."""
        reasons = self.gate.image_reasons(images) if gate else [None] * len(images)
        keep = np.array([answer_refused or reason is None for reason in reasons], dtype=bool)
        probabilities = np.full(len(images), np.nan, dtype=np.float32)
        if keep.any():
            kept = images[keep]
            p, features = self.outputs(np.ascontiguousarray(kept))
            if tta:  # the mean over the four flips (identity, horizontal, vertical, both)
                variants = [kept[:, :, ::-1], kept[:, ::-1], kept[:, ::-1, ::-1]]
                p = np.mean([p] + [self.probabilities(np.ascontiguousarray(v)) for v in variants], axis=0)
            probabilities[keep] = p
            if gate:
                for i, reason in zip(np.flatnonzero(keep), self.gate.feature_reasons(features)):
                    reasons[i] = reasons[i] or reason
        if not answer_refused:
            probabilities[[reason is not None for reason in reasons]] = np.nan
        return probabilities, reasons


def _floats(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 N×H×W×3 batch (any view, e.g. a flipped one) → the float N×3×H×W model input on `device`
    (sent as uint8, a quarter of the bytes, and converted there)."""
    return to_float(torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device))


def load_predictor(path: Path | str, precision: str | None = None, accelerator: str = "auto",
                   image_check: ImageCheck | None = ImageCheck(), features: bool = True) -> Predictor:
    """`precision` overrides the checkpoint's (e.g. "32" for exact fp32 arithmetic); `accelerator` "auto" runs
    a checkpoint on the GPU when there is one (bf16 AMP, channels-last), "cpu" keeps it on the CPU. The input
    gate: the image check with `image_check`'s thresholds (None: none), and the model's feature check unless
    `features` is off."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        predictor = _onnx_predictor(path)
    else:
        predictor = _torch_predictor(path, precision, accelerator)
    predictor.gate = InputGate(image_check, predictor.gate.features if features else None)
    return predictor


def _torch_predictor(path: Path, precision: str | None, accelerator: str) -> Predictor:
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
            logits, features = penultimate(model, x)
            return trained.probability_all(logits).float().cpu().numpy(), features.float().cpu().numpy()

    return Predictor(path, trained.name, trained.preprocessing, outputs, trained, InputGate(None, trained.input_gate))


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
    feature_gate = None
    if ONNX_METADATA["input_gate"] in meta:
        try:
            feature_gate = FeatureGate.from_json(meta[ONNX_METADATA["input_gate"]])
        except ValueError as err:
            raise ValueError(f"{path}: {err} in its metadata; export the model again with `alnet export`") from None
        outputs_declared = session.get_outputs()
        width = outputs_declared[1].shape[-1] if len(outputs_declared) > 1 else None
        if width != feature_gate.mean.numel():
            raise ValueError(f"{path}: its input gate does not fit its `features` output; export the model again "
                             "with `alnet export`")
    input_name = session.get_inputs()[0].name

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = _floats(images).contiguous().numpy()
        results = session.run(None, {input_name: x})
        return results[0].astype(np.float32), (results[1] if len(results) > 1 else None)

    return Predictor(path, meta.get(ONNX_METADATA["model"], "?"), preprocessing, outputs,
                     gate=InputGate(None, feature_gate))


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
                  progress: Callable[[int, int], None] | None = None, answer_refused: bool = False
                  ) -> tuple[list[dict], list[tuple[Path, str]]]:
    """One row per readable image (PREDICTION_FIELDS; `note` says what had to be done to the image, e.g.
    "resized from 5000x20"; an image the input gate refused has status `rejected`, a reason and no label, unless
    `answer_refused` keeps the model's answer beside them); unreadable ones listed."""
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
                probabilities, reasons = predictor.screen(np.stack([pixels for _, (pixels, _) in good]), tta=tta,
                                                          answer_refused=answer_refused)
                for (path, (_, note)), p, reason in zip(good, probabilities, reasons):
                    answered = answer_refused or not reason
                    rows.append({"path": str(path), "label": name_of(p) if answered else "",
                                 "probability_all": f"{float(p):.6f}" if answered else "",
                                 "model": predictor.model_name, "checkpoint": str(predictor.source), "note": note,
                                 "status": REJECTED if reason else OK, "reason": reason or ""})
            done += len(decoded)
            if progress:
                progress(done, len(files))
    return rows, failed
