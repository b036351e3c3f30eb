"""What a checkpoint written by `alnet train` holds, and how to read one for inference.

A checkpoint is Lightning's file: the module's `state_dict` (the model's weights under `model.`), and
`hyper_parameters` with the run's configuration (`config`) and the subjects the model was trained or validated
on (`seen_subjects`). Added after training, in one rewrite: `input_gate` (what the input gate knows of the
training cells), `calibration` (the temperature fitted on validation subjects), `review` (the "needs review"
band) and, for ALNet, `int8` (the activation ranges of its int8 form, `alnet.int8`); `alnet.fitting` writes
them and `alnet.schema` names and checks them. Reading one gives a
plain `nn.Module` in evaluation mode plus what it needs to be used: its preprocessing, the meaning of its
outputs, its calibration, review band, feature gate and int8 calibration. Nothing from the training code is
needed.

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only, so a file cannot run
code when it is opened.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data.transforms import Preprocessing
from .models import ClassifierError, create_model_from, probability_all
from .schema import (
    CALIBRATION_KEY,
    INPUT_GATE_KEY,
    INT8_KEY,
    REVIEW_KEY,
    check_torch_file,
    checked_calibration,
    checked_review,
)
from .trust.feature_check import FeatureGate

MODEL_PREFIX = "model."  # the Lightning module holds the network as `self.model`
# A fine-tuned VGG16's checkpoint, with its optimiser state, is about 1.6 GB; more than this is not alnet's.
MAX_CHECKPOINT_BYTES = 8 * 2**30


class CheckpointError(ValueError):
    """The file is missing or is not a checkpoint of this package; the message names it and what to pass."""


@dataclass
class TrainedModel:
    """A trained network and what it takes to use it."""

    model: nn.Module  # in evaluation mode, fp32, on the CPU
    config: dict  # the run configuration it was trained with
    path: Path
    seen_subjects: list[str] = field(default_factory=list)
    calibration: dict | None = None  # {"temperature": T, …} fitted on validation subjects; None: uncalibrated
    review: dict | None = None  # {"half_width": w, …}: calibrated P(ALL) within w of the threshold → review
    input_gate: FeatureGate | None = None  # the feature-space check fitted on its training cells, if any
    int8: object = None  # the int8 calibration as stored; `alnet.int8.quantized` checks it when it is used

    @property
    def name(self) -> str:
        return self.config["model"]

    @property
    def head(self) -> str:
        return self.config.get("head", "sigmoid")

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.config["image_size"], crop=self.config.get("crop", 1.0))

    @property
    def temperature(self) -> float | None:
        return self.calibration["temperature"] if self.calibration else None

    def probability_all(self, logits: torch.Tensor) -> torch.Tensor:
        """The network's own (uncalibrated) P(ALL)."""
        return probability_all(logits, self.head)


def not_a_file(path: Path, kind: str = "checkpoint") -> str:
    """What a path that is not a readable file is, for a one-line error: "no such {kind}" when nothing is there."""
    return ("not a regular file" if path.exists() else
            "a link to nothing (or a loop of links)" if path.is_symlink() else f"no such {kind}")


def read_checkpoint(path: Path | str) -> dict:
    """The checkpoint's content (tensors and plain containers only), or a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {not_a_file(path)}; pass a .ckpt from RUN_DIR/checkpoints/<fold>/")
    try:
        check_torch_file(path, MAX_CHECKPOINT_BYTES)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}; not a checkpoint alnet wrote, nothing was loaded") from None
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error below says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["hyper_parameters"]["config"]["model"]
        checkpoint["state_dict"].items()
    except Exception as err:
        raise CheckpointError(f"{path}: not an alnet checkpoint ({type(err).__name__}); pass a .ckpt written by "
                              "`alnet train`") from None
    return checkpoint


def model_weights(checkpoint: dict) -> dict:
    """The network's weights in a checkpoint's content (the Lightning module's `model.` entries)."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def load_trained_model(path: Path | str) -> TrainedModel:
    """A checkpoint → its network (weights loaded, evaluation mode) and configuration."""
    from .config import ConfigError, RunConfig

    path = Path(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    try:
        config = RunConfig(**hparams["config"]).validate()
        # The checkpoint holds every weight: build the model without reading ImageNet weights first.
        model = create_model_from(config, pretrained=False)
        model.load_state_dict(model_weights(checkpoint))
        seen = hparams.get("seen_subjects") or []
        if not (isinstance(seen, list) and all(isinstance(subject, str) for subject in seen)):
            raise TypeError("seen_subjects is not a list of subject ids")
        calibration = checked_calibration(checkpoint.get(CALIBRATION_KEY))
        review = checked_review(checkpoint.get(REVIEW_KEY))
        gate = checkpoint.get(INPUT_GATE_KEY) or {}
        feature_gate = FeatureGate.from_state(gate["features"]) if isinstance(gate, dict) and gate.get(
            "features") else None
        if feature_gate is not None and feature_gate.mean.numel() != model.num_features:
            raise ValueError(f"input gate for {feature_gate.mean.numel()} features, model has {model.num_features}")
    except ClassifierError as err:  # a hybrid's classifier refused by the trusted-types check
        raise CheckpointError(f"{path}: {err}") from None
    except (ConfigError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as err:
        raise CheckpointError(f"{path}: not an alnet checkpoint this version can read ({type(err).__name__}); "
                              "pass a .ckpt written by `alnet train`") from None
    return TrainedModel(model.float().eval(), hparams["config"], path, list(seen), calibration, review, feature_gate,
                        checkpoint.get(INT8_KEY))


def writable_checkpoint(path: Path | str) -> Path:
    """The file `add_to_checkpoint` would rewrite (a link's target), or a one-line CheckpointError when it may not:
    its mode says read-only (root could write it anyway; the mode is the user's wish), or its file system is."""
    path = Path(path).resolve()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; pass a .ckpt from RUN_DIR/checkpoints/<fold>/")
    if not path.stat().st_mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        raise CheckpointError(f"{path}: read-only (its permissions or its file system); make it writable or work "
                              "on a copy")
    return path


def add_to_checkpoint(path: Path | str, entries: dict) -> None:
    """Store each of `entries` (top-level key → plain containers and tensors, e.g. `input_gate`, `calibration`,
    `review`, `int8`) in a checkpoint in one rewrite, atomically: a new file, created exclusively beside it, is
    renamed over it, so a reader never sees half a checkpoint and a crash leaves the old one whole. A link is
    followed (its target is rewritten, the link stays); a read-only file is refused, and the file keeps its
    permissions."""
    path = writable_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint.update(entries)
    cannot_write = (f"{path}: cannot write the updated checkpoint beside it ({{}}); make its folder writable or work "
                    "on a copy")
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CheckpointError(cannot_write.format(type(err).__name__)) from None
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(checkpoint, out)
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:  # torch.save reports some write failures as a RuntimeError
        raise CheckpointError(cannot_write.format(type(err).__name__)) from None
    finally:
        temporary.unlink(missing_ok=True)
