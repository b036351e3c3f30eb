"""Prediction on new cell images with a trained checkpoint or an exported ONNX model.

Images are preprocessed exactly as for training (`alnet.data.transforms`: centre crop, resize), decoded in a
few threads (Pillow releases the GIL while decoding), and classified in batches. The input gate runs first
(`alnet.trust`): an image that is not one cell on black, or whose features lie far from the training cells', is
refused with a reason and gets no label. P(ALL) is calibrated with the model's temperature (when it has one),
the network's own kept beside it, and an answer too close to call is flagged for review (`alnet.trust.review`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import threading
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
from ..trust.features import FeatureGate, Penultimate
from ..trust.gate import ImageCheck
from ..trust.knowledge import checked_review
from ..trust.review import OK, statuses
from ..trust.screen import REJECTED, InputGate
from .int8 import Int8Error, quantized

ONNX_METADATA = {"model": "alnet_model", "preprocessing": "alnet_preprocessing",  # keys `alnet export` writes
                 "calibration": "alnet_calibration", "review": "alnet_review", "input_gate": "alnet_input_gate",
                 "int8": "alnet_int8"}
# One row per image. probability_all is calibrated (when the model is), probability_raw the network's own;
# status is ok, review (the label is still given) or rejected (the input gate refused the image: no label or
# probabilities); reason says why.
PREDICTION_FIELDS = ["path", "label", "probability_all", "probability_raw", "status", "reason", "model", "checkpoint",
                     "note"]
EARLIER_PREDICTION_FIELDS = (["path", "label", "probability_all", "model", "checkpoint", "note"],  # still ours
                             ["path", "label", "probability_all", "model", "checkpoint", "note", "status", "reason"])
SMALL_SIDE = 64  # pixels; a cell image this small carries too little detail for the answer to mean much
# Why an int8 ONNX model refuses a picture it may have clipped (the checkpoint answers those without int8).
BEYOND_INT8_RANGES = ("unlike the cells the model was trained on: its activations leave the ranges this int8 model "
                      "was calibrated on, and an ONNX file cannot fall back to the network without int8 (use the "
                      "checkpoint with --int8, or the full-precision export)")


@dataclass
class Answers:
    """What a predictor says about a batch: calibrated and raw P(ALL), and per image (status, reason)."""

    probability_all: np.ndarray
    probability_raw: np.ndarray
    statuses: list[tuple[str, str]]


@dataclass
class Predictor:
    """P(ALL) of uint8 N×H×W×3 batches, from a checkpoint (torch) or an .onnx file (onnxruntime).

    `outputs(images)` gives (calibrated P(ALL), raw P(ALL), penultimate features or None, and per image whether
    its activations left the ranges an int8 ONNX model was calibrated on, or None); without a calibration the two
    probabilities are equal."""

    source: Path
    model_name: str
    preprocessing: Preprocessing
    outputs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]
    trained: TrainedModel | None = None  # the network, when loaded from a checkpoint (Grad-CAM needs it)
    review: dict | None = None  # the review band ({"half_width": …}), when the model has one
    gate: InputGate = InputGate()  # what refuses images that are not cells
    variant: str = ""  # how the network runs when that changes its answers slightly: "int8"
    fallbacks: int = 0  # int8: pictures answered without int8 (the checkpoint's precision): beyond its ranges

    @property
    def described(self) -> str:
        """The model as prediction rows and the service name it: `alnet`, `alnet (int8)`."""
        return f"{self.model_name} ({self.variant})" if self.variant else self.model_name

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated P(ALL) of one batch, no test-time augmentation, no input gate."""
        return self.outputs(images)[0]

    def __call__(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        return self.answer(images, tta, gate=False).probability_all

    def answer(self, images: np.ndarray, tta: bool = False, gate: bool = True, answer_refused: bool = False,
               images_checked: bool = False) -> Answers:
        """Calibrated and raw P(ALL) and (status, reason) of each image. The input gate comes first: the image
        check runs before the model, which sees only the images it let through (all of them with
        `answer_refused`, for a file that needs an answer for every image, e.g. a challenge submission), then
        the feature check. A refused image is `rejected` and its probabilities are NaN unless `answer_refused`;
        an accepted one is `review` when its calibrated P(ALL) lies in the review band or, with `tta` (the mean
        over the four flips: identity, horizontal, vertical, both), when the flips disagree; else `ok`.
        `images_checked`: the image check already passed these (the service runs it while decoding)."""
        reasons = self.gate.image_reasons(images) if gate and not images_checked else [None] * len(images)
        keep = np.array([answer_refused or reason is None for reason in reasons], dtype=bool)
        calibrated = np.full(len(images), np.nan, dtype=np.float32)
        raw = np.full(len(images), np.nan, dtype=np.float32)
        flags = [(OK, "")] * len(images)
        if keep.any():
            kept = np.ascontiguousarray(images[keep])
            kept_calibrated, kept_raw, features, beyond = self.outputs(kept)
            variants = None
            if tta:
                flips = [kept[:, :, ::-1], kept[:, ::-1], kept[:, ::-1, ::-1]]
                fallbacks = self.fallbacks  # a picture is counted once, not once per flip
                each = [self.outputs(np.ascontiguousarray(v)) for v in flips]
                self.fallbacks = fallbacks
                variants = np.stack([kept_calibrated, *(c for c, *_ in each)])
                kept_calibrated = variants.mean(axis=0)
                kept_raw = np.mean([kept_raw, *(r for _, r, *_ in each)], axis=0)
                if beyond is not None:  # a flip the int8 file would clip is as unanswerable as the picture
                    beyond = np.logical_or.reduce([beyond, *(b for *_, b in each)])
            calibrated[keep], raw[keep] = kept_calibrated, kept_raw
            for i, flag in zip(np.flatnonzero(keep),
                               statuses(kept_calibrated, (self.review or {}).get("half_width"), variants)):
                flags[i] = flag
            if gate:
                for i, reason in zip(np.flatnonzero(keep), self.gate.feature_reasons(features)):
                    reasons[i] = reasons[i] or reason
                for i in np.flatnonzero(keep)[beyond] if beyond is not None else ():
                    reasons[i] = reasons[i] or BEYOND_INT8_RANGES
        # The gate's verdict comes before review: a refused image is not a cell to look at more closely.
        flags = [(REJECTED, reason) if reason else flag for reason, flag in zip(reasons, flags)]
        if not answer_refused:
            refused = [reason is not None for reason in reasons]
            calibrated[refused], raw[refused] = np.nan, np.nan
        return Answers(calibrated, raw, flags)


def _floats(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 N×H×W×3 batch (any view, e.g. a flipped one) → the float N×3×H×W model input on `device`
    (sent as uint8, a quarter of the bytes, and converted there)."""
    return to_float(torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device))


def load_predictor(path: Path | str, precision: str | None = None, accelerator: str = "auto",
                   image_check: ImageCheck | None = ImageCheck(), features: bool = True,
                   int8: bool = False) -> Predictor:
    """`precision` overrides the checkpoint's (e.g. "32" for exact fp32 arithmetic); `accelerator` "auto" runs
    a checkpoint on the GPU when there is one (bf16 AMP, channels-last), "cpu" keeps it on the CPU; `int8` runs
    the checkpoint's int8 form on the CPU instead (`alnet.infer.int8`). The input gate: the image check with
    `image_check`'s thresholds (None: none), and the model's feature check unless `features` is off."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if int8:
            raise Int8Error(f"{path}: --int8 applies to a checkpoint; an ONNX model is int8 when it was written by "
                            "`alnet export --int8`, and runs as it is")
        predictor = _onnx_predictor(path)
    else:
        predictor = _torch_predictor(path, precision, accelerator, int8)
    predictor.gate = InputGate(image_check, predictor.gate.features if features else None)
    return predictor


def _torch_predictor(path: Path, precision: str | None, accelerator: str, int8: bool) -> Predictor:
    trained = load_trained_model(path)
    int8_network = quantized(trained.model, trained.int8, str(path), trained.name) if int8 else None
    # The precision the run trained with unless told otherwise, on the device this machine offers (the CPU for
    # int8, whose kernels are CPU kernels: the fallback without int8 runs there too).
    runs_as = resolve_precision(precision or trained.config.get("precision", "auto"), "cpu" if int8 else accelerator)
    device = torch.device(runs_as.device_type)
    model = trained.model.to(device)
    network = Penultimate(model.to(memory_format=torch.channels_last) if runs_as.channels_last else model)

    def full_precision(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with runs_as.autocast():
            logits, features = network(runs_as.input(x))
        return logits.float(), features.float()

    counting = threading.Lock()  # guards predictor.fallbacks

    def int8_with_fallback(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8, except for pictures whose activations reached an end of a calibrated range: those without int8."""
        logits, features, beyond = int8_network.checked(x)
        if beyond.any():
            logits[beyond], features[beyond] = full_precision(x[beyond])
            with counting:
                predictor.fallbacks += int(beyond.sum())
        return logits, features

    @torch.no_grad()
    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
        logits, features = (int8_with_fallback if int8 else full_precision)(_floats(images, device))
        raw = trained.probability_all(logits).float()
        calibrated = apply_temperature_torch(raw, trained.temperature)
        return calibrated.cpu().numpy(), raw.cpu().numpy(), features.cpu().numpy(), None

    predictor = Predictor(path, trained.name, trained.preprocessing, outputs, trained, trained.review,
                          InputGate(None, trained.input_gate), "int8" if int8 else "")
    return predictor


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
    feature_gate = None
    if ONNX_METADATA["input_gate"] in meta:
        try:
            feature_gate = FeatureGate.from_json(meta[ONNX_METADATA["input_gate"]])
        except ValueError as err:
            raise ValueError(f"{path}: {err} in its metadata; export the model again with `alnet export`") from None
        declared = {o.name: o for o in session.get_outputs()}
        width = declared["features"].shape[-1] if "features" in declared else None
        if width != feature_gate.mean.numel():
            raise ValueError(f"{path}: its input gate does not fit its `features` output; export the model again "
                             "with `alnet export`")
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    int8 = meta.get(ONNX_METADATA["int8"], "").startswith("yes")
    beyond_output = next((o for o in session.get_outputs() if o.name == "beyond_range"), None)
    if int8 and (beyond_output is None or beyond_output.type != "tensor(bool)" or len(beyond_output.shape) != 1):
        raise ValueError(f"{path}: an int8 model without a one-per-image boolean beyond_range output, so nothing would "
                         "flag the pictures it clips; export it again with `alnet export --int8`")

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        x = _floats(images).contiguous().numpy()
        found = dict(zip(names, session.run(None, {input_name: x})))
        calibrated = found[names[0]].astype(np.float32)  # the first output is P(ALL) as the model answers it
        beyond = found.get("beyond_range")
        if beyond is not None and np.shape(beyond) != (len(images),):
            raise ValueError(f"{path}: its beyond_range output does not give one value per image; export the model "
                             "again with `alnet export --int8`")
        return (calibrated, found.get("probability_raw", calibrated).astype(np.float32), found.get("features"),
                None if beyond is None else np.asarray(beyond, dtype=bool).reshape(-1))

    return Predictor(path, meta.get(ONNX_METADATA["model"], "?"), preprocessing, outputs, review=review,
                     gate=InputGate(None, feature_gate),
                     variant="int8" if int8 else "")


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
                answers = predictor.answer(np.stack([pixels for _, (pixels, _) in good]), tta=tta,
                                           answer_refused=answer_refused)
                for (path, (_, note)), p, raw, (status, reason) in zip(
                        good, answers.probability_all, answers.probability_raw, answers.statuses):
                    answered = answer_refused or status != REJECTED
                    rows.append({"path": str(path), "label": name_of(p) if answered else "",
                                 "probability_all": f"{float(p):.6f}" if answered else "",
                                 "probability_raw": f"{float(raw):.6f}" if answered else "", "status": status,
                                 "reason": reason, "model": predictor.described, "checkpoint": str(predictor.source),
                                 "note": note})
            done += len(decoded)
            if progress:
                progress(done, len(files))
    return rows, failed
