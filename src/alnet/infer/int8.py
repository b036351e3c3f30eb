"""int8 ALNet for CPU inference: calibrated on training cells, rebuilt from the checkpoint when it is used.

How (docs/design.md, "int8 inference"): PyTorch's FX graph-mode post-training quantization with the oneDNN
engine. The BatchNorm layers are first folded into the layer after them (`ALNet.fold_batchnorm`, exact); then
every convolution and dense layer runs in int8 with per-channel weights, and activations stay uint8 between them
(max-pooling and ReLU included). oneDNN uses the CPU's int8 units (AMX-INT8, AVX-512 VNNI) and keeps all 8 bits
of an activation. Measured on the CPUs at hand, PT2E would need torchao and an Inductor compile every time a
model is loaded, and onnxruntime's int8 (the ONNX model `alnet export --int8` writes) was no faster than bf16.

What is stored: after training, histogram observers watch the fp32 model on up to CALIBRATION_IMAGES training
cells (no augmentation), and their state (tensors only) goes into the checkpoint under `int8`. Loading prepares
the same graph, puts the observers back and converts it: no code and no quantized tensor is ever read from a file.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..data.transforms import to_float
from ..trust.features import Penultimate

ENGINE = "onednn"
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32

# torch.ao.quantization warns that it will move to torchao; the API works as documented in the torch we pin.
warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)


class Int8Error(ValueError):
    """A model or checkpoint that cannot run in int8; the message says what to do instead."""


def supports_int8(model: nn.Module) -> bool:
    """Models that can fold their BatchNorm into the next layer (ALNet) have an int8 form."""
    return callable(getattr(model, "fold_batchnorm", None))


def _prepared(model: nn.Module) -> torch.fx.GraphModule:
    """The folded model → (logits, penultimate features) as an FX graph with an observer after each activation."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = ENGINE  # the weights are packed for the engine that will run them
    size = getattr(model, "input_size", 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(Penultimate(model.fold_batchnorm()), get_default_qconfig_mapping(ENGINE),
                          example_inputs=(torch.zeros(2, 3, size, size),))


def _observer_state(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: value for name, value in prepared.state_dict().items() if name.startswith("activation_post_process")}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict:
    """The checkpoint entry for `model`'s int8 form: its activation ranges on `batches` (float N×3×H×W in [0, 1],
    preprocessed as for training, no augmentation)."""
    if not supports_int8(model):
        raise Int8Error(f"{type(model).__name__} has no int8 form; only ALNet has")
    prepared = _prepared(model)
    images = 0
    for batch in batches:
        prepared(batch.float().cpu())
        images += len(batch)
    if images == 0:
        raise Int8Error("no cells to calibrate the int8 model on")
    return {"engine": ENGINE, "images": images,
            "observers": {name: value.detach().clone() for name, value in _observer_state(prepared).items()}}


def calibration_batches(images: torch.Tensor, rows: np.ndarray, seed: int = 0,
                        limit: int = CALIBRATION_IMAGES) -> Iterable[torch.Tensor]:
    """Up to `limit` of `rows` of a uint8 cache (N×H×W×3), drawn at random with `seed`, as float batches."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    for start in range(0, len(rows), CALIBRATION_BATCH):
        yield to_float(images[torch.from_numpy(rows[start:start + CALIBRATION_BATCH])])


def quantized(model: nn.Module, entry: object, source: str = "the checkpoint") -> torch.fx.GraphModule:
    """`model`'s int8 form from its calibration `entry` (`calibrate`'s output as read back from a checkpoint):
    float input N×3×H×W in [0, 1] → (logits, penultimate features), both fp32."""
    from torch.ao.quantization.quantize_fx import convert_fx

    if not supports_int8(model):
        raise Int8Error(f"{source}: {type(model).__name__} has no int8 form; only ALNet has (leave out --int8)")
    if entry is None:
        raise Int8Error(f"{source}: holds no int8 calibration; add one with `alnet quantize {source} --data "
                        "TRAINING_CELLS`")
    prepared = _prepared(model)
    expected = _observer_state(prepared)
    stored = entry.get("observers") if isinstance(entry, dict) else None
    if not isinstance(stored, dict) or entry.get("engine") != ENGINE or set(stored) != set(expected) or not all(
            isinstance(stored[name], torch.Tensor) and stored[name].shape == value.shape
            and stored[name].dtype == value.dtype and bool(torch.isfinite(stored[name]).all())
            for name, value in expected.items()):
        raise Int8Error(f"{source}: its int8 calibration does not fit this model or this version; calibrate it "
                        f"again with `alnet quantize {source} --data TRAINING_CELLS`")
    prepared.load_state_dict({**prepared.state_dict(), **stored})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)

