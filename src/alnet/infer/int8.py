"""int8 ALNet for CPU inference: calibrated on training cells, rebuilt from the checkpoint when it is used.

How (docs/design.md, "int8 inference"): PyTorch's FX graph-mode post-training quantization with the oneDNN
engine. The BatchNorm layers are first folded into the layer after them (`ALNet.fold_batchnorm`, exact); then
every convolution and dense layer runs in int8 with per-channel weights, and activations stay uint8 between them
(max-pooling and ReLU included). oneDNN uses the CPU's int8 units (AMX-INT8, AVX-512 VNNI) and keeps all 8 bits
of an activation. Measured on the CPUs at hand, PT2E would need torchao and an Inductor compile every time a
model is loaded, and onnxruntime's int8 (the ONNX model `alnet export --int8` writes) was no faster than bf16.

Two details keep the answers close to full precision's:
- the input is quantized exactly: a preprocessed picture is k/255 for uint8 k, so scale 1/255 loses nothing
  (a calibrated range would clip bright pixels of cells brighter than the calibration cells);
- bias correction: rounding shifts the logits and features by a constant on average (about 0.1–0.2 logit for
  ALNet), which is measured on the calibration cells and added back.

What is stored: after training, histogram observers watch the fp32 model on up to CALIBRATION_IMAGES training
cells (no augmentation); their state and the two mean shifts (tensors only) go into the checkpoint under
`int8`. Loading prepares the same graph, puts the observers back and converts it: no code and no quantized
tensor is ever read from a file.
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
INPUT_SCALE = 1 / 255  # a preprocessed picture holds k/255: quantized with this scale, it stays exact

# torch.ao.quantization warns that it will move to torchao; the API works as documented in the torch we pin.
warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)


class Int8Error(ValueError):
    """A model or checkpoint that cannot run in int8; the message says what to do instead."""


class Int8Network(nn.Module):
    """Float images N×3×H×W in [0, 1] → (logits, penultimate features), fp32, computed in int8."""

    def __init__(self, graph: torch.fx.GraphModule, logit_shift: torch.Tensor, feature_shift: torch.Tensor):
        super().__init__()
        self.graph = graph
        self.register_buffer("logit_shift", logit_shift.float())
        self.register_buffer("feature_shift", feature_shift.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.graph(torch.quantize_per_tensor(x, INPUT_SCALE, 0, torch.quint8))
        return logits + self.logit_shift, features + self.feature_shift


def supports_int8(model: nn.Module) -> bool:
    """Models that can fold their BatchNorm into the next layer (ALNet) have an int8 form."""
    return callable(getattr(model, "fold_batchnorm", None))


def _prepared(folded: nn.Module) -> torch.fx.GraphModule:
    """The folded model → (logits, penultimate features) as an FX graph that takes a quint8 input (scale 1/255)
    and has an observer after each activation."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = ENGINE  # the weights are packed for the engine that will run them
    size = getattr(folded, "input_size", 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(Penultimate(folded), get_default_qconfig_mapping(ENGINE),
                          example_inputs=(torch.zeros(2, 3, size, size),),
                          prepare_custom_config=PrepareCustomConfig().set_input_quantized_indexes([0]))


def _converted(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)


def _observer_state(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: value for name, value in prepared.state_dict().items() if name.startswith("activation_post_process")}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict:
    """The checkpoint entry for `model`'s int8 form, from `batches` of its training cells (float N×3×H×W in [0, 1],
    preprocessed as for training, no augmentation): the activation ranges, then the mean shifts of the logits
    and features that int8 rounding causes on the same cells."""
    if not supports_int8(model):
        raise Int8Error(f"{type(model).__name__} has no int8 form; only ALNet has")
    folded = model.fold_batchnorm()
    prepared = _prepared(folded)
    batches = [batch.float().cpu() for batch in batches]
    if not batches or sum(len(batch) for batch in batches) == 0:
        raise Int8Error("no cells to calibrate the int8 model on")
    for batch in batches:
        prepared(batch)
    observers = {name: value.detach().clone() for name, value in _observer_state(prepared).items()}
    int8 = _converted(prepared)
    reference = Penultimate(folded)
    logit_shift = feature_shift = 0
    for batch in batches:
        logits, features = reference(batch)
        int8_logits, int8_features = int8(torch.quantize_per_tensor(batch, INPUT_SCALE, 0, torch.quint8))
        logit_shift = logit_shift + (logits - int8_logits).sum(0)
        feature_shift = feature_shift + (features - int8_features).sum(0)
    images = sum(len(batch) for batch in batches)
    return {"engine": ENGINE, "images": images, "observers": observers,
            "logit_shift": logit_shift / images, "feature_shift": feature_shift / images}


def calibration_batches(images: torch.Tensor, rows: np.ndarray, seed: int = 0,
                        limit: int = CALIBRATION_IMAGES) -> Iterable[torch.Tensor]:
    """Up to `limit` of `rows` of a uint8 cache (N×H×W×3), drawn at random with `seed`, as float batches."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    for start in range(0, len(rows), CALIBRATION_BATCH):
        yield to_float(images[torch.from_numpy(rows[start:start + CALIBRATION_BATCH])])


def _fits(stored: object, expected: torch.Tensor) -> bool:
    return (isinstance(stored, torch.Tensor) and stored.shape == expected.shape and stored.dtype == expected.dtype
            and bool(torch.isfinite(stored).all()))


def quantized(model: nn.Module, entry: object, source: str = "the checkpoint") -> Int8Network:
    """`model`'s int8 form from its calibration `entry` (`calibrate`'s output as read back from a checkpoint)."""
    if not supports_int8(model):
        raise Int8Error(f"{source}: {type(model).__name__} has no int8 form; only ALNet has (leave out --int8)")
    if entry is None:
        raise Int8Error(f"{source}: holds no int8 calibration; add one with `alnet quantize {source} --data "
                        "TRAINING_CELLS`")
    prepared = _prepared(model.fold_batchnorm())
    shifts = {"logit_shift": torch.zeros(2), "feature_shift": torch.zeros(model.num_features)}  # two logits: HEM, ALL
    expected = {**_observer_state(prepared), **shifts}
    stored = {**entry["observers"], **{name: entry.get(name) for name in shifts}} if (
        isinstance(entry, dict) and isinstance(entry.get("observers"), dict)) else None
    if stored is None or entry.get("engine") != ENGINE or set(stored) != set(expected) or not all(
            _fits(stored[name], value) for name, value in expected.items()):
        raise Int8Error(f"{source}: its int8 calibration does not fit this model or this version; calibrate it "
                        f"again with `alnet quantize {source} --data TRAINING_CELLS`")
    prepared.load_state_dict({**prepared.state_dict(), **entry["observers"]})
    return Int8Network(_converted(prepared), stored["logit_shift"], stored["feature_shift"]).eval()
