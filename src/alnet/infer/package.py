"""`alnet package`: a checkpoint → a bioimage.io model package (model description format 0.5), the way
bio-image analysis tools (bioimage.io, bioimageio.core, deepImageJ, ilastik, QuPath) share and run models.

    DIR/rdf.yaml              the model description: axes, preprocessing, output, weights, citations, licence
    DIR/weights.onnx          P(ALL) per image (the `alnet export` graph, output N×1)
    DIR/weights.pt            the same network as TorchScript (needs no alnet code to run)
    DIR/test_input.npy        one cell as the model takes it: uint8 1×3×S×S (after crop and resize)
    DIR/test_output.npy       its expected output: float32 1×1, P(ALL)
    DIR/sample_input.png, DIR/sample_output.tif   the same pair as image files, for viewers
    DIR/cover.png             the cell and its Grad-CAM for ALL
    DIR/model_card.md         the documentation (intended use, data, results, limitations)

The description is written as plain YAML, so packaging needs no bioimage.io library; `bioimageio.spec` validates
the result and `bioimageio.core` runs its test tensors (the `bioimage` extra). Centre crop and resize cannot be
written as spec operations: the description says how to do them, and the test input is already resized. The
uint8 → [0, 1] scaling is the spec's `scale_linear`. A checkpoint that carries a `calibration` (temperature
scaling on the logit of P(ALL), as `alnet train` stores it: {"method": "temperature", "temperature": T, …}) is
packaged with the calibration inside the graph, computed as `alnet predict` and `alnet export` compute it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from ..checkpoint import TrainedModel, load_trained_model, read_checkpoint
from ..data.transforms import as_batch, load_image
from ..labels import THRESHOLD
from ..models import probability_all
from ..schema import checked_calibration
from ..trust.calibration import apply_temperature_torch
from .export import OPSET as ONNX_OPSET
from .export import export_graph

FORMAT_VERSION = "0.5.4"
FILES = {"rdf": "rdf.yaml", "onnx": "weights.onnx", "torchscript": "weights.pt", "test_input": "test_input.npy",
         "test_output": "test_output.npy", "sample_input": "sample_input.png", "sample_output": "sample_output.tif",
         "cover": "cover.png", "documentation": "model_card.md"}
PAPER_DOI, DATASET_DOI = "10.1016/j.combiomed.2022.105894", "10.7937/tcia.2019.dc64i46r"


class PackageError(ValueError):
    """The package cannot be written; the message names the file and what to do."""


@dataclass
class Calibration:
    """The checkpoint's temperature scaling: P(ALL) → σ(logit(P(ALL)) / T)."""

    temperature: float
    description: str


def calibration_of(stored) -> Calibration | None:
    """The calibration a checkpoint stores under `calibration` (`alnet.schema`), or None when it has none
    (nothing stored, or the paper protocol's {"method": "none", "temperature": None}). Any other form is a
    PackageError: never silently packaged uncalibrated."""
    if stored is None:
        return None
    method = stored.get("method", "temperature") if isinstance(stored, dict) else None
    if method == "none" and stored.get("temperature") is None:
        return None
    if method == "temperature":
        try:
            checked = checked_calibration(stored)
        except TypeError as err:
            raise PackageError(f"the checkpoint's calibration is unreadable ({err}); retrain the model or package "
                               "a checkpoint without it") from None
        if checked is not None:
            t = checked["temperature"]
            return Calibration(t, f"temperature scaling, T = {t:.4g}")
    what = f"method {method!r}" if method else type(stored).__name__
    raise PackageError(f"the checkpoint's calibration ({what}) has a form this version cannot put into a package; "
                       "package a checkpoint without it or update alnet")


class PackagedNetwork(nn.Module):
    """The packaged graph: [0, 1] images N×3×S×S → P(ALL) N×1 (calibrated when a calibration is given, by the
    function `alnet predict` and `alnet export` use), with the channel axis bioimage.io needs."""

    def __init__(self, model: nn.Module, head: str, calibration: Calibration | None):
        super().__init__()
        self.model, self.head = model, head
        self.temperature = calibration.temperature if calibration else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_temperature_torch(probability_all(self.model(x), self.head), self.temperature).unsqueeze(1)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_onnx(network: nn.Module, size: int, path: Path) -> None:
    # The same torch.export-based exporter as `alnet export` (opset 18): bioimage.io's ONNX weights take any
    # opset, and onnxruntime runs the package's test tensors to the same output as the TorchScript weights.
    export_graph(network, size, path, output_names=("probability_all",))


def _write_torchscript(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    # TorchScript is deprecated in PyTorch but is the weight format bioimage.io consumers run without the model's
    # source code (a state dict would need alnet's classes).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
        traced = torch.jit.trace(network, example, check_trace=False)
    traced.save(str(path))


def _write_cover(trained: TrainedModel, pixels: np.ndarray, probability: float, path: Path) -> None:
    """The cell and its Grad-CAM side by side (2:1, as bioimage.io shows covers)."""
    from .explain import gradcam_overlay, side_by_side

    overlay, _ = gradcam_overlay(trained.model, trained.name, pixels)
    side_by_side(pixels, overlay, ("cell (model input)", f"Grad-CAM for ALL; P(ALL) = {probability:.2f}"), path,
                 height=4, dpi=80)


def _authors(names: list[str]) -> list[dict]:
    return [{"name": name} for name in names]


def describe(trained: TrainedModel, calibration: Calibration | None, shas: dict[str, str], authors: list[str],
             licence: str, maintainers: list[str] = (), name: str | None = None) -> dict:
    """The rdf.yaml content (format 0.5). Pure: file hashes in, description out."""
    p = trained.preprocessing
    output = "calibrated P(ALL)" + f" ({calibration.description})" if calibration else "P(ALL)"
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": name or f"{trained.name} for C-NMC 2019 ALL vs HEM (alnet)",
        "description": (f"Classifies one segmented white-blood-cell image (C-NMC 2019 kind) as ALL (leukemic blast) or "
                        f"HEM (normal); output {output}, ALL when > {THRESHOLD}. Research tool, not a diagnostic "
                        f"device. Input: the image centre-cropped to {p.crop} of its short side and resized to "
                        f"{p.size}x{p.size} (bilinear, antialiased), RGB uint8."),
        "authors": _authors(authors),
        **({"maintainers": [{"github_user": user} for user in maintainers]} if maintainers else {}),
        "cite": [
            {"text": "Jawahar, H, Anbarasi, Gandomi (2022). ALNet: A Cluster Layer Deep Convolutional Neural Network "
                     "for Acute Lymphoblastic Leukemia classification. Computers in Biology and Medicine.",
             "doi": PAPER_DOI},
            {"text": "Gupta, A., & Gupta, R. (2019). ALL Challenge dataset of ISBI 2019 (C-NMC 2019). The Cancer "
                     "Imaging Archive (CC BY 3.0).", "doi": DATASET_DOI},
        ],
        "license": licence,
        "tags": ["classification", "2d", "leukemia", "white-blood-cell", "c-nmc-2019", "microscopy", "pytorch",
                 "onnx"],
        "documentation": FILES["documentation"],
        "covers": [FILES["cover"]],
        "timestamp": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [{
            "id": "image",
            "description": f"RGB cell image, centre-cropped ({p.crop} of the short side) and resized to "
                           f"{p.size}x{p.size}; uint8 0-255",
            "axes": [{"type": "batch"},
                     {"type": "channel", "channel_names": ["red", "green", "blue"]},
                     {"type": "space", "id": "y", "size": p.size},
                     {"type": "space", "id": "x", "size": p.size}],
            "data": {"type": "uint8"},
            "test_tensor": {"source": FILES["test_input"], "sha256": shas["test_input"]},
            "sample_tensor": {"source": FILES["sample_input"], "sha256": shas["sample_input"]},
            # uint8 → float32 in [0, 1]; the closing ensure_dtype keeps the spec from casting back to uint8.
            "preprocessing": [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                              {"id": "scale_linear", "kwargs": {"gain": 1.0 / 255.0, "offset": 0.0}},
                              {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}],
        }],
        "outputs": [{
            "id": "probability_all",
            "description": f"{output} per image; label ALL when > {THRESHOLD}, else HEM",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["probability_all"]}],
            "data": {"type": "float32", "range": [0.0, 1.0]},
            "test_tensor": {"source": FILES["test_output"], "sha256": shas["test_output"]},
            "sample_tensor": {"source": FILES["sample_output"], "sha256": shas["sample_output"]},
        }],
        "weights": {
            "torchscript": {"source": FILES["torchscript"], "sha256": shas["torchscript"],
                            "pytorch_version": torch.__version__.split("+")[0],
                            "comment": "traced from the alnet checkpoint"},
            "onnx": {"source": FILES["onnx"], "sha256": shas["onnx"], "opset_version": ONNX_OPSET,
                     "parent": "torchscript"},
        },
        "config": {"alnet": {"model": trained.name, "head": trained.head, "image_size": p.size, "crop": p.crop,
                             "threshold": THRESHOLD, "calibration": calibration.description if calibration
                             else None, "run_config": trained.config}},
    }


def check_package_folder(out: Path) -> None:
    """Only a new or empty folder: a package never overwrites what is already there."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackageError(f"{out}: exists and is not an empty folder; pick a new or empty folder for --out")


def build_package(checkpoint: Path | str, out: Path | str, image: Path | str, documentation: str,
                  authors: list[str] | None = None, licence: str = "CC-BY-4.0", zip_archive: bool = False,
                  maintainers: list[str] = ()) -> Path:
    """Write the package into the new or empty folder `out` (and `out`.zip with `zip_archive`); returns `out`."""
    out = Path(out)
    check_package_folder(out)
    archive = out.with_suffix(".zip")
    if zip_archive and archive.exists():
        raise PackageError(f"{archive}: already exists; move it away or pick another --out")
    trained = load_trained_model(checkpoint)
    calibration = calibration_of(read_checkpoint(checkpoint).get("calibration"))
    try:
        pixels = load_image(Path(image), trained.preprocessing)[0]
    except Exception as err:
        raise PackageError(f"{image}: cannot read this image ({type(err).__name__}); pass a cell image for "
                           "the test input with --image") from None
    network = PackagedNetwork(trained.model, trained.head, calibration).eval()
    test_input = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # uint8 1×3×S×S, as the spec's axes
    with torch.no_grad():
        expected = network(as_batch(pixels)).float().numpy()
    # Built in a private folder beside `out` and moved into place when complete: a failure leaves nothing behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    work.mkdir()
    try:
        np.save(work / FILES["test_input"], test_input)
        np.save(work / FILES["test_output"], expected.astype(np.float32))
        Image.fromarray(pixels).save(work / FILES["sample_input"])
        Image.fromarray(expected.astype(np.float32), mode="F").save(work / FILES["sample_output"])  # 32-bit float
        _write_onnx(network, trained.preprocessing.size, work / FILES["onnx"])
        _write_torchscript(network, as_batch(pixels), work / FILES["torchscript"])
        _write_cover(trained, pixels, float(expected[0, 0]), work / FILES["cover"])
        (work / FILES["documentation"]).write_text(documentation)
        shas = {key: sha256_of(work / FILES[key]) for key in FILES if key not in ("rdf", "cover", "documentation")}
        rdf = describe(trained, calibration, shas, authors or ["alnet user"], licence, maintainers)
        (work / FILES["rdf"]).write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True))
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        work.rename(out)
    finally:
        if work.is_dir():
            shutil.rmtree(work)
    if zip_archive:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
            for name in FILES.values():
                bundle.write(out / name, name)
    return out

