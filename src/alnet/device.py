"""Where and in which precision a model runs: one decision shared by training, evaluation and prediction.

CPUs with bf16 units (AMX, AVX-512 BF16) run bf16 autocast with channels-last tensors; GPUs run bf16 AMP
where the card has it, else fp16; everything else runs fp32 (docs/design.md, "Speed by design").
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "32", "bf16", "16")
COMPILE_SETTINGS = ("off", "on", "auto")


@dataclass(frozen=True)
class Precision:
    accelerator: str  # "cpu" or "gpu" (Lightning's names)
    lightning: str  # "32-true", "bf16-mixed" or "16-mixed"
    channels_last: bool

    @property
    def device_type(self) -> str:
        return "cuda" if self.accelerator == "gpu" else "cpu"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.lightning)

    def autocast(self, device_type: str | None = None):
        """Autocast for work outside Lightning's loop (the trainer applies the same precision itself), on
        `device_type` when the tensors live elsewhere than this path's accelerator."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type or self.device_type, dtype=dtype) if dtype else contextlib.nullcontext()

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch laid out as this precision path wants it."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str = "auto", accelerator: str = "auto") -> Precision:
    """The precision a setting ("auto", "32", "bf16", "16") means on this machine."""
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    kind = "gpu" if cuda else "cpu"
    if precision == "32":
        return Precision(kind, "32-true", cuda)
    if precision in ("16", "bf16"):
        return Precision(kind, f"{precision}-mixed", True)
    if cuda:
        return Precision(kind, "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed", True)
    if cpu_has_bf16():
        return Precision(kind, "bf16-mixed", True)
    return Precision(kind, "32-true", False)


def threads_per_process(processes: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))


def use_compile(setting: str, runs_as: Precision) -> bool:
    """Whether a run's `compile` setting compiles its network (torch.compile) on this path. "auto" compiles on a
    GPU only: there a training step is short enough for per-layer launches to show. On a CPU, torch.compile's
    code generator (inductor) gave ALNet's convolutions wrong gradients in torch 2.14 (a test checks that
    `on` is refused there; docs/design.md, "Speed by design")."""
    if setting == "auto":
        return runs_as.device_type == "cuda"
    return setting == "on"
