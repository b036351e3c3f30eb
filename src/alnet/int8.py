"""int8 ALNet for CPU inference: calibrated on training cells, rebuilt from the checkpoint when it is used.

How (docs/design.md, "int8 inference"): PyTorch's FX graph-mode post-training quantization with the oneDNN
engine. The BatchNorm layers are first folded into the layer after them (`ALNet.fold_batchnorm`, exact); then
every convolution and dense layer runs in int8 with per-channel weights, and activations stay uint8 between them
(max-pooling and ReLU included). oneDNN uses the CPU's int8 units (AMX-INT8, AVX-512 VNNI) and keeps all 8 bits
of an activation. PT2E would need torchao and an Inductor compile every time a model is loaded, and
onnxruntime's int8 (the ONNX model `alnet export --int8` writes) was measured no faster than bf16.

What keeps its answers those of the full-precision model:
- the input is quantized exactly: a preprocessed picture is k/255 for uint8 k, so scale 1/255 loses nothing;
- every activation range is the range seen on the calibration cells, widened by HEADROOM. A picture whose
  activations reach an end of a range in a convolution or dense layer (it may have been clipped: a cell far
  brighter than any training cell, or no cell at all) is answered by the network without int8 instead
  (`Int8Network.checked`; in the checkpoint's own precision), so that the input gate's feature check sees its
  true features and refuses it as it would without --int8;
- bias correction: rounding shifts the logits and features by a constant on average (about 0.1–0.2 logit for
  ALNet), which is measured on the calibration cells and added back.

What is stored: after training, min/max observers watch the fp32 model on up to CALIBRATION_IMAGES training
cells (no augmentation); their ranges, the two mean shifts, a fingerprint of the weights they were measured with
and a checksum of all of it (tensors, numbers and strings) go into the checkpoint under `int8`. Loading checks
them (an edited or damaged entry is refused), prepares the same graph, puts the ranges back and converts it: no
code and no quantized tensor is ever read from a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings

import numpy as np
import torch
from torch import nn

from .data.transforms import to_float
from .models import Penultimate

ENGINE = "onednn"
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32
INPUT_SCALE = 1 / 255  # a preprocessed picture holds k/255: quantized with this scale, it stays exact
HEADROOM = 1.25  # activation ranges: the calibration cells' range × this, so that those cells never reach an end
MAX_SHIFT = 5.0  # a bias correction beyond this many units is damage, not rounding (ALNet's: about 0.1–0.2)
MAX_RANGE = 1e4  # ALNet's activations stay within tens; a stored range beyond this is damage
PROOF_IMAGES = 8  # calibration cells kept in the entry: the int8 form must reproduce the network on them
MAX_PROOF_ERROR = 0.5  # logits; int8 rounding moves ALNet's by about 0.1–0.3, so more is not this network's int8
PROOF_TOLERANCE = 0.05  # logits: another CPU's int8 kernels round a little differently from the calibrating one's

# torch.ao.quantization warns that it will move to torchao; the API works as documented in the torch we pin.
warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)


class Int8Error(ValueError):
    """A model or checkpoint that cannot run in int8; the message says what to do instead."""


@contextlib.contextmanager
def _engine():
    """oneDNN for packing the weights; the process's own engine is put back afterwards (the packed weights keep
    running on oneDNN whatever it is)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = before


class Int8Network(nn.Module):
    """Float images N×3×H×W in [0, 1] → (logits, penultimate features), fp32, computed in int8."""

    def __init__(self, graph: torch.fx.GraphModule, logit_shift: torch.Tensor, feature_shift: torch.Tensor):
        super().__init__()
        self.graph = graph
        self.register_buffer("logit_shift", logit_shift.float())
        self.register_buffer("feature_shift", feature_shift.float())
        # Layers that requantize their output to a calibrated range (convolutions, dense layers). Pooling and ReLU
        # keep their input's range. The requantization after flatten is a function, not watched: its range is
        # CL3's pooled output's, whose top the check of CL3's convolution sees too (max-pooling keeps the
        # maximum), except in a last row or column that pooling drops.
        self._ranged = [m for m in graph.modules() if hasattr(m, "scale") and hasattr(m, "zero_point")]
        self._lock = threading.Lock()  # the hooks of `checked` see every pass through these modules

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.graph(torch.quantize_per_tensor(x, INPUT_SCALE, 0, torch.quint8))
        return logits + self.logit_shift, features + self.feature_shift

    @torch.no_grad()
    def checked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`, plus per image whether any activation reached an end of its range (a value there may have
        been clipped; a range that starts at 0 holds ReLU outputs and only its top counts). One call at a time:
        another thread's pass would trip this one's hooks."""
        beyond = torch.zeros(len(x), dtype=torch.bool)

        def watch(module, _inputs, out):
            values = _stored_bytes(out)
            dims = tuple(range(1, values.dim()))
            hit = values.amax(dim=dims) == 255
            if module.zero_point > 0:
                hit |= values.amin(dim=dims) == 0
            beyond.logical_or_(hit)

        with self._lock:
            hooks = [module.register_forward_hook(watch) for module in self._ranged]
            try:
                logits, features = self(x)
            finally:
                for hook in hooks:
                    hook.remove()
        return logits, features, beyond


def _stored_bytes(quantized_tensor: torch.Tensor) -> torch.Tensor:
    """The uint8 values of a quint8 tensor, as a view of its memory (`int_repr` copies, which cost as much as the
    layer that made the tensor)."""
    return torch.empty(0, dtype=torch.uint8).set_(quantized_tensor.untyped_storage(),
                                                  quantized_tensor.storage_offset(), quantized_tensor.size(),
                                                  quantized_tensor.stride())


def supports_int8(model: nn.Module) -> bool:
    """Models that can fold their BatchNorm into the next layer (ALNet) have an int8 form."""
    return callable(getattr(model, "fold_batchnorm", None))


def _hash_tensors(digest, tensors: dict[str, torch.Tensor]) -> None:
    """Feed each named tensor's name and bytes to `digest`, in name order."""
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's weights and buffers: ties a calibration to the weights it was measured with."""
    digest = hashlib.sha256()
    _hash_tensors(digest, model.state_dict())
    return digest.hexdigest()


def _prepared(folded: nn.Module) -> torch.fx.GraphModule:
    """The folded model → (logits, penultimate features) as an FX graph that takes a quint8 input (scale 1/255)
    and has a min/max observer after each activation."""
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.observer import MinMaxObserver, default_per_channel_weight_observer
    from torch.ao.quantization.quantize_fx import prepare_fx

    qconfig = QConfig(activation=MinMaxObserver.with_args(dtype=torch.quint8),
                      weight=default_per_channel_weight_observer)
    size = getattr(folded, "input_size", 224)
    with _engine():
        return prepare_fx(Penultimate(folded), get_default_qconfig_mapping(ENGINE).set_global(qconfig),
                          example_inputs=(torch.zeros(2, 3, size, size),),
                          prepare_custom_config=PrepareCustomConfig().set_input_quantized_indexes([0]))


def _converted(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _engine():
        return convert_fx(prepared)


def _ranges(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The observers' min_val/max_val, by state-dict name."""
    return {name: value for name, value in prepared.state_dict().items()
            if name.startswith("activation_post_process") and name.endswith(("min_val", "max_val"))}


def _batches(images: torch.Tensor):
    for start in range(0, len(images), CALIBRATION_BATCH):
        yield to_float(images[start:start + CALIBRATION_BATCH])


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor) -> dict:
    """The checkpoint entry for `model`'s int8 form, from its training cells `images` (uint8 N×H×W×3, preprocessed
    as for training, no augmentation): the activation ranges (widened by HEADROOM), then the mean shifts of the
    logits and features that int8 rounding causes on the same cells, and the weights' fingerprint."""
    if not supports_int8(model):
        raise Int8Error(f"{type(model).__name__} has no int8 form; only ALNet has")
    if len(images) == 0:
        raise Int8Error("no cells to calibrate the int8 model on")
    folded = model.fold_batchnorm()
    prepared = _prepared(folded)
    for batch in _batches(images):
        prepared(torch.quantize_per_tensor(batch, INPUT_SCALE, 0, torch.quint8).dequantize())
    ranges = {name: value.detach().clone() * HEADROOM for name, value in _ranges(prepared).items()}
    prepared.load_state_dict({**prepared.state_dict(), **ranges})
    int8 = Int8Network(_converted(prepared), torch.zeros(2), torch.zeros(folded.num_features))
    reference = Penultimate(folded)
    logit_shift = feature_shift = 0
    for batch in _batches(images):
        logits, features = reference(batch)
        int8_logits, int8_features = int8(batch)
        logit_shift = logit_shift + (logits - int8_logits).sum(0)
        feature_shift = feature_shift + (features - int8_features).sum(0)
    int8.logit_shift.copy_(logit_shift / len(images))
    int8.feature_shift.copy_(feature_shift / len(images))
    from .trust.image_check import image_reason

    cells = [i for i in range(len(images)) if image_reason(images[i].numpy()) is None][:PROOF_IMAGES]
    if not cells:
        raise Int8Error("none of the calibration pictures is one cell on black (the input gate's image check); "
                        "calibrate on the cells the model was trained on")
    proof = images[cells].clone()
    error = _proof_error(reference, int8, proof)
    if error > MAX_PROOF_ERROR:
        raise Int8Error(f"the int8 form moves this network's logits by {error:.2f} on its own calibration cells (at "
                        f"most {MAX_PROOF_ERROR} is usable); run it without --int8")
    entry = {"engine": ENGINE, "images": len(images), "headroom": HEADROOM, "weights": weights_fingerprint(model),
             "ranges": ranges, "logit_shift": int8.logit_shift.clone(), "feature_shift": int8.feature_shift.clone(),
             "proof": proof, "proof_error": error}
    return {**entry, "checksum": _checksum(entry)}


@torch.no_grad()
def _proof_error(reference: nn.Module, int8: "Int8Network", proof: torch.Tensor) -> float:
    """The largest difference between the int8 form's logits and the network's own on the proof cells."""
    x = to_float(proof)
    return float((reference(x)[0] - int8(x)[0]).abs().max())


def _checksum(entry: dict) -> str:
    """sha256 of everything in an entry but its checksum: an edited or damaged calibration does not match."""
    digest = hashlib.sha256()
    for key in ("engine", "images", "headroom", "weights", "proof_error"):
        digest.update(f"{key}={entry[key]!r};".encode())
    _hash_tensors(digest, {**{f"ranges.{name}": value for name, value in entry["ranges"].items()},
                           "logit_shift": entry["logit_shift"], "feature_shift": entry["feature_shift"],
                           "proof": entry["proof"]})
    return digest.hexdigest()


def calibration_images(images: torch.Tensor, rows: np.ndarray, seed: int = 0,
                       limit: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """Up to `limit` of `rows` of a uint8 cache (N×H×W×3), drawn at random with `seed`."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    return images[torch.from_numpy(rows)]


def _tensor_fits(stored: object, expected: torch.Tensor, bound: float) -> bool:
    return (isinstance(stored, torch.Tensor) and stored.layout == torch.strided and stored.shape == expected.shape
            and stored.dtype == expected.dtype and bool(torch.isfinite(stored).all())
            and bool((stored.abs() <= bound).all()))


def _checked_entry(model: nn.Module, entry: object, expected: dict[str, torch.Tensor], source: str,
                   name: str) -> dict:
    """The entry if every part of it is what `calibrate` writes for this model, else a one-line Int8Error."""
    again = f"calibrate it again with `alnet quantize {source} --data TRAINING_CELLS`"
    if entry is None:
        raise Int8Error(f"{source}: holds no int8 calibration; add one with `alnet quantize {source} --data "
                        "TRAINING_CELLS`")
    if isinstance(entry, dict) and "proof" not in entry:
        raise Int8Error(f"{source}: its int8 calibration was written by an earlier version of alnet, without the "
                        f"cells that prove it; {again}")
    if not (isinstance(entry, dict) and entry.get("engine") == ENGINE and isinstance(entry.get("ranges"), dict)
            and isinstance(entry.get("images"), int) and isinstance(entry.get("headroom"), float)
            and all(isinstance(entry.get(key), str) for key in ("weights", "checksum"))
            and set(entry["ranges"]) == set(expected)
            and all(_tensor_fits(entry["ranges"][key], value, MAX_RANGE) for key, value in expected.items())
            and all(bool(entry["ranges"][key] <= entry["ranges"][key.replace("min_val", "max_val")])
                    for key in expected if key.endswith("min_val"))
            and all(_tensor_fits(entry.get(key), torch.zeros(width), MAX_SHIFT)
                    for key, width in (("logit_shift", 2), ("feature_shift", model.num_features)))
            and _is_proof(entry.get("proof"), getattr(model, "input_size", None))
            and isinstance(entry.get("proof_error"), float)
            and 0 <= entry["proof_error"] <= MAX_PROOF_ERROR):
        raise Int8Error(f"{source}: its int8 calibration is damaged or from another version of alnet; {again}")
    if entry["checksum"] != _checksum(entry):
        raise Int8Error(f"{source}: its int8 calibration was edited or damaged (checksum); {again}")
    if entry["weights"] != weights_fingerprint(model):
        raise Int8Error(f"{source}: its int8 calibration was measured with other weights than {name}'s in this "
                        f"file; {again}")
    return entry


def quantized(model: nn.Module, entry: object, source: str = "the checkpoint", name: str = "the model"
              ) -> Int8Network:
    """`model`'s int8 form from its calibration `entry` (`calibrate`'s output as read back from `source`)."""
    if not supports_int8(model):
        raise Int8Error(f"{source}: {name} has no int8 form, only ALNet has; leave out --int8")
    prepared = _prepared(model.fold_batchnorm())
    entry = _checked_entry(model, entry, _ranges(prepared), source, name)
    prepared.load_state_dict({**prepared.state_dict(), **entry["ranges"]})
    int8 = Int8Network(_converted(prepared), entry["logit_shift"], entry["feature_shift"]).eval()
    _prove(model, int8, entry, source)
    return int8


def _is_proof(proof: object, side: int | None) -> bool:
    """PROOF_IMAGES cells at most, at the network's own input size (checked before anything runs on them)."""
    return (isinstance(proof, torch.Tensor) and proof.layout == torch.strided and proof.dtype == torch.uint8
            and proof.dim() == 4 and 1 <= len(proof) <= PROOF_IMAGES and proof.shape[3] == 3
            and proof.shape[1] == proof.shape[2] and (side is None or proof.shape[1] == side)
            and 32 <= proof.shape[1] <= 1024)


def _prove(model: nn.Module, int8: Int8Network, entry: dict, source: str) -> None:
    """The int8 form must reproduce the network (these weights, in full precision) on the cells stored with it,
    within the error measured when it was calibrated: a calibration edited to answer otherwise (ranges that crush
    every activation, a shifted logit), even with its checksum recomputed, does not. The cells must be cells."""
    from .trust.image_check import image_reason

    again = f"calibrate it again with `alnet quantize {source} --data TRAINING_CELLS`"
    if any(image_reason(picture) is not None for picture in entry["proof"].numpy()):
        raise Int8Error(f"{source}: its int8 calibration is proved on pictures that are not cells; {again}")
    try:
        error = _proof_error(Penultimate(model.fold_batchnorm()).eval(), int8, entry["proof"])
    except RuntimeError as err:  # proof pictures of another size than the network takes
        raise Int8Error(f"{source}: its int8 calibration's proof cells do not fit the network "
                        f"({type(err).__name__}); {again}") from None
    if not error <= entry["proof_error"] + PROOF_TOLERANCE:
        raise Int8Error(f"{source}: its int8 form moves the network's logits by {error:.2f} on the cells it was "
                        f"calibrated on, where {entry['proof_error']:.2f} was measured: it does not answer as the "
                        f"network does; {again}")
