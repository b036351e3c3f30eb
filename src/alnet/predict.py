"""Prediction on new cell images with a trained checkpoint or an exported ONNX model.

Images are preprocessed exactly as for training (`alnet.data.preprocess.load_image`: centre crop, resize),
decoded in a few threads (Pillow releases the GIL while decoding), and classified in batches.
"""

from __future__ import annotations

import glob
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .data.cnmc import IMAGE_SUFFIXES
from .data.preprocess import PrepareParams, load_image


@dataclass
class Predictor:
    """P(ALL) of uint8 N×H×W×3 batches, from a checkpoint (torch) or an .onnx file (onnxruntime)."""

    source: Path
    model_name: str
    image_size: int
    crop: float
    probabilities: Callable[[np.ndarray], np.ndarray]
    module: object | None = None  # the CellClassifier, when loaded from a checkpoint

    def __call__(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        if not tta:
            return self.probabilities(images)
        # Test-time augmentation: the mean over the four flips (identity, horizontal, vertical, both).
        variants = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
        return np.mean([self.probabilities(np.ascontiguousarray(v)) for v in variants], axis=0)


def load_predictor(path: Path | str, precision: str | None = None) -> Predictor:
    """`precision` overrides the checkpoint's (e.g. "32" for exact fp32 arithmetic)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return _onnx_predictor(path)
    from .engine import load_module, resolve_precision

    module = load_module(path)
    if precision is not None:
        module.config.precision = precision
    module.use_channels_last()
    bf16 = resolve_precision(module.config)[1] == "bf16-mixed" and not torch.cuda.is_available()

    @torch.no_grad()
    def probabilities(images: np.ndarray) -> np.ndarray:
        from .data.augment import to_float

        x = module.to_input(to_float(torch.from_numpy(np.require(images, requirements=["C", "W"]))))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module.probability_all(module.model(x)).float().numpy()

    return Predictor(path, module.config.model, module.config.image_size, module.config.crop, probabilities, module)


def _onnx_predictor(path: Path) -> Predictor:
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model; write one with `alnet export CHECKPOINT --onnx FILE`")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "alnet_preprocessing" not in meta:
        raise ValueError(f"{path}: not an ONNX model written by `alnet export` (no preprocessing metadata)")
    preprocessing = json.loads(meta["alnet_preprocessing"])
    input_name = session.get_inputs()[0].name

    def probabilities(images: np.ndarray) -> np.ndarray:
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return session.run(None, {input_name: x})[0].astype(np.float32)

    return Predictor(path, meta.get("alnet_model", "?"), preprocessing["size"], preprocessing["crop"], probabilities)


def expand_paths(items: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Files, folders (searched recursively for images) and globs → image files; plus what matched nothing."""
    found, missing = [], []
    for item in items:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            found += matches
            if not matches:
                missing.append(item)
    unique = list(dict.fromkeys(found))
    return unique, missing


def predict_files(predictor: Predictor, files: list[Path], batch_size: int = 64, tta: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], list[tuple[Path, str]]]:
    """One row per readable image (path, label, probability_all, model, checkpoint); unreadable ones listed."""
    params = PrepareParams(size=predictor.image_size, crop=predictor.crop)
    rows, failed = [], []

    def decode(path: Path):
        try:
            return path, load_image(path, params)[0], None
        except Exception as err:  # unreadable: listed, never fatal
            return path, None, f"{type(err).__name__}: {err}"

    done = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(files), batch_size):
            decoded = list(pool.map(decode, files[start:start + batch_size]))
            good = [(p, pixels) for p, pixels, error in decoded if error is None]
            failed += [(p, error) for p, _, error in decoded if error is not None]
            if good:
                probabilities = predictor(np.stack([pixels for _, pixels in good]), tta=tta)
                for (path, _), p in zip(good, probabilities):
                    rows.append({"path": str(path), "label": "ALL" if p > 0.5 else "HEM",
                                 "probability_all": f"{float(p):.6f}", "model": predictor.model_name,
                                 "checkpoint": str(predictor.source)})
            done += len(decoded)
            if progress:
                progress(done, len(files))
    return rows, failed
