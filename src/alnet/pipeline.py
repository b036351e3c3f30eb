"""Where an answer is made: `Pipeline.answer(pictures)` → one `Answer` per picture, for `predict`, `serve`,
`evaluate`, `explain` and a training run's own test sets alike (docs/design.md, "Data flow").

A picture (uint8 H×W×3, preprocessed as for training) goes through, in this order:

1. the network (a checkpoint's in torch, its int8 form, or an ONNX graph): the raw P(ALL) and the penultimate
   features; with test-time augmentation also its three flips;
2. the temperature, when the model has one: the calibrated P(ALL);
3. the input gate: the image check (one cell on black?), then the feature check (like the training cells?), then,
   for an int8 ONNX graph, whether an activation left its calibrated range; a refusal is `rejected` with a reason;
4. the review band (and, with flips, whether they agree): `review` with a reason, else `ok`.

Every picture gets its probabilities, refused ones included: what a format does with a refused picture (leave it
blank, keep it in the metrics, write the call anyway) is the writer's decision, not the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .data.transforms import Preprocessing, batch_to_float
from .device import Precision, resolve_precision
from .labels import Status, name_of
from .models import Penultimate, probability_all
from .trust.calibration import apply_temperature
from .trust.image_check import ImageCheck
from .trust.input_gate import InputGate
from .trust.review import statuses

if TYPE_CHECKING:
    from .checkpoint import TrainedModel

# Why a picture gets no answer when the network's output is not a probability (a damaged model: NaN, or beyond [0, 1]).
NOT_A_PROBABILITY = "no answer: the model's output for this picture is not a probability; the model file may be damaged"
# Why an int8 ONNX model refuses a picture it may have clipped (the checkpoint answers those without int8).
BEYOND_INT8_RANGES = ("unlike the cells the model was trained on: its activations leave the ranges this int8 model "
                      "was calibrated on, and an ONNX file cannot fall back to the network without int8 (use the "
                      "checkpoint with --int8, or the full-precision export)")


@dataclass(frozen=True)
class Answer:
    """What the pipeline says about one picture."""

    probability_all: float  # calibrated P(ALL) (the network's own when the model has no temperature)
    probability_raw: float  # the network's own P(ALL)
    status: Status
    reason: str = ""  # why review or rejected, in words
    int8_fallback: bool = False  # int8: answered by the network without int8 (an activation left its range)

    @property
    def predicted(self) -> str:
        """The call, ALL or HEM, by the one decision rule (a writer leaves it out for a refused picture)."""
        return name_of(self.probability_all)

    @property
    def answered(self) -> bool:
        return self.status is not Status.REJECTED


@dataclass(frozen=True)
class NetworkOutputs:
    """One pass of a network over a batch of N pictures."""

    probability_raw: np.ndarray  # (N,) the network's own P(ALL)
    features: np.ndarray | None  # (N, d) penultimate features, for the feature check (None: not available)
    beyond_range: np.ndarray | None = None  # (N,) int8 ONNX: an activation reached an end of its range
    fallback: np.ndarray | None = None  # (N,) int8 checkpoint: answered without int8


Network = Callable[[np.ndarray], NetworkOutputs]  # uint8 N×H×W×3 pictures → outputs


def _any(flags: list[np.ndarray | None], n: int) -> np.ndarray:
    known = [np.asarray(f, dtype=bool) for f in flags if f is not None]
    return np.logical_or.reduce(known) if known else np.zeros(n, dtype=bool)


@dataclass
class Pipeline:
    """A trained model with everything that turns its output into an answer: temperature, review band, input
    gate, test-time augmentation. Built from a checkpoint (`from_trained`), an ONNX file
    (`alnet.infer.predict.load_pipeline`) or a model fresh from training (`alnet.fitting`)."""

    network: Network
    model_name: str
    preprocessing: Preprocessing
    source: Path  # the file that answers (checkpoint or ONNX)
    calibration: dict | None = None  # {"temperature": T, …}; None: the network's own P(ALL)
    review: dict | None = None  # {"half_width": w, …}; None: no review band
    gate: InputGate = field(default_factory=InputGate)
    variant: str = ""  # how the network runs when that changes its answers slightly: "int8"
    trained: "TrainedModel | None" = None  # the network, when loaded from a checkpoint (Grad-CAM needs it)

    @property
    def described(self) -> str:
        """The model as prediction rows and the service name it: `alnet`, `alnet (int8)`."""
        return f"{self.model_name} ({self.variant})" if self.variant else self.model_name

    @property
    def temperature(self) -> float | None:
        return (self.calibration or {}).get("temperature")

    def answer(self, pictures: np.ndarray, tta: bool = False) -> list[Answer]:
        """One Answer per picture of a uint8 N×H×W×3 batch. `tta`: P(ALL) is the mean over the four flips
        (identity, horizontal, vertical, both), and flips that disagree on the call put the picture in review."""
        n = len(pictures)
        if n == 0:
            return []
        image_reasons = self.gate.image_reasons(pictures)
        passes = [self._checked(self.network(pictures), n)]
        if tta:
            passes += [self._checked(self.network(np.ascontiguousarray(flipped)), n)
                       for flipped in (pictures[:, :, ::-1], pictures[:, ::-1], pictures[:, ::-1, ::-1])]
        calibrated_each = np.stack([apply_temperature(p.probability_raw, self.temperature) for p in passes])
        calibrated = calibrated_each.mean(axis=0)
        raw = np.mean([p.probability_raw for p in passes], axis=0)
        beyond = _any([p.beyond_range for p in passes], n)  # a flip the int8 file would clip is as unanswerable
        fallback = _any([p.fallback for p in passes], n)
        feature_reasons = self.gate.feature_reasons(passes[0].features)
        if not feature_reasons:
            feature_reasons = [None] * n
        review = statuses(calibrated, (self.review or {}).get("half_width"), calibrated_each if tta else None)
        answers = []
        for i in range(n):
            # The gate's verdict comes before review: a refused picture is not a cell to look at more closely.
            refused = (image_reasons[i] or feature_reasons[i] or (BEYOND_INT8_RANGES if beyond[i] else None)
                       or (None if 0 <= raw[i] <= 1 else f"{NOT_A_PROBABILITY} ({raw[i]})"))
            status, reason = (Status.REJECTED, refused) if refused else review[i]
            answers.append(Answer(float(calibrated[i]), float(raw[i]), Status(status), reason, bool(fallback[i])))
        return answers

    def _checked(self, outputs: NetworkOutputs, n: int) -> NetworkOutputs:
        """One value per picture, or a ValueError naming the model file: a network that answers another shape
        would hand one picture's answer to another."""
        shapes = [np.shape(outputs.probability_raw)] + [np.shape(flags)[:1] for flags in (
            outputs.features, outputs.beyond_range, outputs.fallback) if flags is not None]
        if shapes[0] != (n,) or any(shape != (n,) for shape in shapes[1:]):
            raise ValueError(f"{self.source}: the model gave outputs of shapes {shapes} for {n} pictures, not one "
                             "value per picture; export it again with `alnet export`")
        return outputs

    def probabilities(self, pictures: np.ndarray, tta: bool = False) -> np.ndarray:
        """Calibrated P(ALL) of every picture (refused ones too): for timing and comparisons."""
        return np.array([a.probability_all for a in self.answer(pictures, tta)], dtype=np.float32)

    @classmethod
    def from_trained(cls, trained: "TrainedModel", precision: str | None = None, accelerator: str = "auto",
                     image_check: ImageCheck | None = ImageCheck(), features: bool = True,
                     int8: bool = False) -> "Pipeline":
        """A checkpoint's pipeline. `precision` overrides the run's (e.g. "32" for exact fp32 arithmetic);
        `accelerator` "auto" runs on the GPU when there is one, "cpu" keeps it on the CPU; `int8` runs the int8
        form on the CPU (`alnet.int8`). The input gate: `image_check`'s thresholds (None: no image check), and
        the model's feature check unless `features` is off."""
        from .int8 import quantized

        int8_network = quantized(trained.model, trained.int8, str(trained.path), trained.name) if int8 else None
        # The precision the run trained with unless told otherwise, on the device this machine offers (the CPU for
        # int8, whose kernels are CPU kernels: the fallback without int8 runs there too).
        runs_as = resolve_precision(precision or trained.config.get("precision", "auto"),
                                    "cpu" if int8 else accelerator)
        network = torch_network(trained.model, runs_as, trained.head, int8_network)
        return cls(network, trained.name, trained.preprocessing, trained.path, trained.calibration, trained.review,
                   InputGate(image_check, trained.input_gate if features else None), "int8" if int8 else "", trained)


def torch_network(model: torch.nn.Module, runs_as: Precision, head: str, int8_network=None) -> Network:
    """A torch model as a pipeline's network, in evaluation mode on `runs_as`' device and precision. With
    `int8_network` (`alnet.int8.Int8Network`), pictures whose activations reach an end of a calibrated range are
    answered by `model` without int8 instead."""
    device = torch.device(runs_as.device_type)
    # A model that can fold its BatchNorm into the layers after it (ALNet) answers with the folded copy: the same
    # function in evaluation mode, without a pass over the maps per BatchNorm.
    fold = getattr(model, "fold_batchnorm", None)
    model = (fold() if fold is not None else model.eval()).to(device)
    network = Penultimate(model.to(memory_format=torch.channels_last) if runs_as.channels_last else model)

    def full_precision(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with runs_as.autocast():
            logits, features = network(runs_as.input(x))
        return logits.float(), features.float()

    @torch.no_grad()
    def run(pictures: np.ndarray) -> NetworkOutputs:
        x = batch_to_float(pictures, device)
        fallback = None
        if int8_network is None:
            logits, features = full_precision(x)
        else:
            logits, features, beyond = int8_network.checked(x)  # one call at a time: threads may share it
            if beyond.any():
                logits[beyond], features[beyond] = full_precision(x[beyond])
            fallback = beyond.cpu().numpy()
        raw = probability_all(logits, head).float()
        return NetworkOutputs(raw.cpu().numpy(), features.cpu().numpy(), None, fallback)

    return run


def cache_batches(images: torch.Tensor, rows, batch_size: int = 64):
    """`rows` of a uint8 N×H×W×3 cache, as numpy batches of at most `batch_size` pictures."""
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        yield images[torch.from_numpy(rows[start:start + batch_size])].cpu().numpy()


def answer_rows(pipeline: Pipeline, images: torch.Tensor, rows: np.ndarray) -> list[Answer]:
    """Answers for `rows` of a uint8 N×H×W×3 cache (a run's test cells, `evaluate`), in batches."""
    return [answer for batch in cache_batches(images, rows) for answer in pipeline.answer(batch)]
