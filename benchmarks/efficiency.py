"""Speed as a share of what this machine can do, so that figures mean the same on any CPU.

Shared by the benchmarks that report a speed: the machine's matmul peak in bf16 and fp32 (measured in the same
run: the best of several large `torch.matmul`s), the model's FLOPs per image (`torch.utils.flop_counter`:
convolutions and matrix products, forward; forward + backward for a training step), achieved GFLOP/s and the
share of the peak of the precision the path runs in. Where the share is low, `layer_profile` says which layers
take the time (torch.profiler, one range per layer) and how fast each runs.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

LOW_SHARE = 0.5  # below this share of the peak, benchmarks add the per-layer profile


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", size: int | None = None, repeats: int = 8) -> float:
    """The best rate of a size×size `torch.matmul` in `dtype` on `device` (all CPU threads, or one GPU), GFLOP/s."""
    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up: kernel selection, packing buffers
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peaks(device: str = "cpu") -> dict:
    """This machine's matmul peaks (fp32 on a GPU uses TF32 only if torch was told to allow it)."""
    return {"peak_bf16_gflops": round(matmul_peak_gflops(torch.bfloat16, device), 1),
            "peak_fp32_gflops": round(matmul_peak_gflops(torch.float32, device), 1)}


def forward_flops(model: torch.nn.Module, size: int = 224, method: str = "forward") -> float:
    """FLOPs of one image's forward pass (or of another method, e.g. forward_features)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        getattr(model, method)(torch.randn(1, 3, size, size))
    model.train(was_training)
    return float(counter.get_total_flops())


def training_flops(model: torch.nn.Module, size: int = 224) -> float:
    """FLOPs of one image's training step: forward and backward (the optimiser's element-wise update is not
    counted; it is tiny next to the convolutions)."""
    was_training = model.training
    model.train()
    x = torch.randn(2, 3, size, size)  # two images: BatchNorm needs more than one value per channel
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return float(counter.get_total_flops()) / 2


def efficiency(prefix: str, images_per_s: float, flops_per_image: float, peak_gflops: float) -> dict:
    """{prefix}_gflops (achieved) and {prefix}_efficiency (share of `peak_gflops`)."""
    achieved = images_per_s * flops_per_image / 1e9
    return {f"{prefix}_gflops": round(achieved, 1), f"{prefix}_efficiency": round(achieved / peak_gflops, 3)}


def peak_for(bf16: bool, machine: dict) -> float:
    return machine["peak_bf16_gflops"] if bf16 else machine["peak_fp32_gflops"]


def layer_profile(model: torch.nn.Module, images: torch.Tensor, autocast=None, top: int = 10) -> list[dict]:
    """The forward pass's layers by time taken: ms per batch, share of the pass, achieved GFLOP/s.

    Each leaf layer, and each top-level block that holds layers (ALNet's clusters), runs inside a torch.profiler
    range of its own name; FLOPs come from FlopCounterMode. A block's row holds its layers' rows and what runs
    between them (functional activations, pooling). The hooks that open the ranges make ALNet's fused
    convolution + ReLU (`alnet.models.alnet.conv_relu`) run as its two plain operators, so those rows time the
    unfused form: the whole pass's figures (benchmarks/train.py's infer_efficiency) time the fused one."""
    from torch.profiler import ProfilerActivity, profile, record_function

    prefix = type(model).__name__
    top_level = dict(model.named_children())
    leaves = {name: module for name, module in model.named_modules()
              if name and (not list(module.children()) or name in top_level)}
    ranges, handles = {}, []

    def enter(name):
        def hook(module, args):
            ranges[name] = record_function(f"layer:{name}")
            ranges[name].__enter__()
        return hook

    def leave(name):
        def hook(module, args, output):
            ranges.pop(name).__exit__(None, None, None)
        return hook

    was_training = model.training
    model.eval()
    context = autocast or nullcontext
    with torch.no_grad(), context():
        model(images)  # warm-up
        with FlopCounterMode(display=False) as counter:
            model(images)
        for name, module in leaves.items():
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave(name))]
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                model(images)
                total = time.perf_counter() - start
        finally:
            for handle in handles:
                handle.remove()
    model.train(was_training)
    flops = {name[len(prefix) + 1:]: sum(counts.values()) for name, counts in counter.get_flop_counts().items()
             if name.startswith(prefix + ".")}
    rows = []
    for event in prof.key_averages():
        if event.key.startswith("layer:"):
            name = event.key[len("layer:"):]
            seconds = event.cpu_time_total / 1e6
            rows.append({"layer": name, "ms": round(1000 * seconds, 2), "time_share": round(seconds / total, 3),
                         "gflops": round(flops.get(name, 0) / seconds / 1e9, 1) if seconds else None})
    rows = sorted(rows, key=lambda r: -r["ms"])
    between = total - sum(r["ms"] for r in rows if r["layer"] in top_level) / 1000  # e.g. layout changes
    return rows[:top] + [{"layer": "(between layers)", "ms": round(1000 * between, 2),
                          "time_share": round(between / total, 3), "gflops": None}]


def predictor_rate(pipeline, images, batch_size: int) -> float:
    """Images/s of a pipeline's network (`alnet.pipeline.Pipeline.network`: the model, int8 fallback included,
    without the input gate's image check) over uint8 `images` in batches, after one warm-up batch."""
    pipeline.network(images[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        pipeline.network(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)
