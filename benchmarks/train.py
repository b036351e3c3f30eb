"""ALNet training and inference throughput: the project's default path against a plain PyTorch pipeline.

Ours: images decoded once into the uint8 cache, whole batches gathered from memory, augmentation on the
device, Lightning with the default precision (bf16 autocast + channels-last on CPUs with bf16).
Plain: torchvision ImageFolder + PIL transforms in a DataLoader, fp32 eager, a hand-written loop, on the same
device — measured with each of --workers loader workers (default 0 and 2); the fastest is the baseline (the
conservative ratio).

Prints one JSON line: train_images_per_s, baseline_train_images_per_s, train_ratio, infer_images_per_s,
baseline_infer_images_per_s, infer_ratio (and the settings; with --allocator-baseline, the project's path also
before alnet.memory keeps freed memory, and the ratios that buys); and what they mean on this machine
(benchmarks/efficiency.py): peak_bf16_gflops, peak_fp32_gflops, the model's GFLOP per image, train_gflops,
train_efficiency, infer_gflops, infer_efficiency (shares of the peak of the precision each path runs in; the
plain pipeline's against the fp32 peak), and, where a share is under one half (or with --profile), the
forward pass's layers by time (layer_profile). The cache build is not timed (it happens once per dataset;
benchmarks/prepare.py measures it).
Usage: python benchmarks/train.py [--data DIR] [--images 256] [--repeat 1] [--epochs 3] [--batch-size 32]
       [--workers 0,2] [--profile] [--allocator-baseline]
On a GPU, --repeat K makes each epoch K passes over the images (both pipelines), so that an epoch lasts long
enough to time without synthesising thousands of files.
On a GPU the peaks are the GPU's and no layer profile is taken (benchmarks/gpu_step.py breaks a step down).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from efficiency import LOW_SHARE, efficiency, forward_flops, layer_profile, peak_for, peaks, training_flops
from lightning.pytorch.callbacks import Callback
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import datasets, transforms

from alnet.config import RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.synthetic import write_dataset
from alnet.device import resolve_precision, use_compile
from alnet.memory import keep_freed_memory
from alnet.models import create_model
from alnet.pipeline import cache_batches, torch_network
from alnet.train.batches import CellData, tensors
from alnet.train.module import build_module
from alnet.train.trainer import quiet_lightning


class EpochTimer(Callback):
    """Wall time of each training epoch (training batches only; no validation is configured)."""

    def __init__(self):
        self.seconds = []

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        _sync("cuda" if torch.cuda.is_available() else "cpu")
        self.seconds.append(time.perf_counter() - self._start)


def timed_trainer(path, epochs: int) -> tuple[L.Trainer, EpochTimer]:
    """A bare trainer on the device and precision of `path` (no validation, logger or checkpoints) whose
    callback times each training epoch."""
    timer = EpochTimer()
    trainer = L.Trainer(accelerator=path.accelerator, devices=1, precision=path.lightning, max_epochs=epochs,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[timer])
    return trainer, timer


def ours(prepared, epochs: int, batch_size: int, repeat: int = 1) -> tuple[float, float, str]:
    quiet_lightning()
    config = RunConfig(epochs=epochs, batch_size=batch_size)
    path = resolve_precision(config.precision, config.accelerator)
    precision = path.lightning
    images, labels = tensors(prepared)
    images, labels = images.repeat(repeat, 1, 1, 1), labels.repeat(repeat)
    rows = np.arange(len(prepared.cells))
    module = build_module(config, [])
    trainer, timer = timed_trainer(path, epochs)
    data = CellData(images, labels, rows, [], rows, config)
    trainer.fit(module, datamodule=data)
    train_rate = len(rows) / np.median(timer.seconds[1:])  # first epoch warms up oneDNN kernels
    # Inference as `alnet predict` and a run's test pass make it: the pipeline's network over uint8 batches.
    network = torch_network(module.model, path, config.head)
    for batch in cache_batches(images, rows[:batch_size], batch_size):  # warm-up
        network(batch)
    start = time.perf_counter()
    for batch in cache_batches(images, rows, batch_size):
        network(batch)
    _sync("cuda" if torch.cuda.is_available() else "cpu")
    return train_rate, len(rows) / (time.perf_counter() - start), precision


def plain_datasets(training_root: Path, train: bool, repeat: int = 1):
    steps = [transforms.Resize((224, 224))]
    if train:
        steps += [transforms.RandomRotation(15), transforms.RandomHorizontalFlip(),
                  transforms.RandomAffine(0, scale=(0.9, 1.1)), transforms.ColorJitter(contrast=0.2)]
    transform = transforms.Compose(steps + [transforms.ToTensor()])
    folds = sorted(p for p in training_root.iterdir() if p.name.startswith("fold_"))
    return ConcatDataset([datasets.ImageFolder(str(f), transform=transform) for f in folds] * repeat)


def plain(training_root: Path, epochs: int, batch_size: int, workers: int, device: str = "cpu",
          repeat: int = 1) -> tuple[float, float]:
    """What a first script does: ImageFolder + PIL, fp32, eager, a hand-written loop (on `device`)."""
    torch.manual_seed(0)
    model = create_model("alnet").to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.9, eps=1e-7)
    loader = DataLoader(plain_datasets(training_root, True, repeat), batch_size=batch_size, shuffle=True,
                        num_workers=workers, pin_memory=device == "cuda")
    seconds = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(x), torch.nn.functional.one_hot(y, 2).float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    train_rate = seen / np.median(seconds[1:] or seconds)
    model.eval()
    loader = DataLoader(plain_datasets(training_root, False, repeat), batch_size=batch_size, num_workers=workers,
                        pin_memory=device == "cuda")
    start, seen = time.perf_counter(), 0
    with torch.no_grad():
        for x, _ in loader:
            torch.sigmoid(model(x.to(device, non_blocking=True)))
            seen += len(x)
    _sync(device)
    return train_rate, seen / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: time what finished, not what was queued


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a C-NMC root; default: a synthetic set of --images images")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1, help="passes over the images per epoch")
    parser.add_argument("--workers", default="0,2", help="loader workers of the plain pipeline, comma-separated")
    parser.add_argument("--profile", action="store_true", help="add the per-layer profile whatever the shares")
    parser.add_argument("--allocator-baseline", action="store_true",
                        help="also time the project's path before alnet.memory keeps freed memory (the ratio it buys)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_dataset(Path(tmp) / "synthetic", n_subjects=max(1, args.images // 20),
                                          cells_per_subject=10, prelim_subjects=0, final_images=0)
        dataset = scan(root)
        cells = dataset.select(split="train")
        prepared = prepare(cells, Path(tmp) / "cache")
        # The plain pipeline runs first, with glibc's default allocator, as a first script would.
        baselines = {w: plain(dataset.layout.training, max(2, args.epochs - 1), args.batch_size, w, device,
                              args.repeat) for w in workers}
        returned = ours(prepared, args.epochs, args.batch_size, args.repeat) if args.allocator_baseline else None
        kept = keep_freed_memory()  # as every alnet command and train_run do (alnet.memory)
        train_rate, infer_rate, precision = ours(prepared, args.epochs, args.batch_size, args.repeat)
    best = max(baselines.values(), key=lambda rates: rates[0])
    best_infer = max(rates[1] for rates in baselines.values())
    machine = peaks(device)
    model = create_model("alnet")
    flops = {"train": training_flops(model), "infer": forward_flops(model)}
    ours_peak, plain_peak = peak_for("bf16" in precision, machine), machine["peak_fp32_gflops"]
    shares = {**efficiency("train", train_rate, flops["train"], ours_peak),
              **efficiency("infer", infer_rate, flops["infer"], ours_peak),
              **efficiency("baseline_train", best[0], flops["train"], plain_peak),
              **efficiency("baseline_infer", best_infer, flops["infer"], plain_peak)}
    profile = {}
    low = min(shares["train_efficiency"], shares["infer_efficiency"]) < LOW_SHARE
    if device == "cpu" and (args.profile or low):
        path = resolve_precision(RunConfig().precision, "cpu")
        net = model.to(memory_format=torch.channels_last) if path.channels_last else model
        images = torch.randn(args.batch_size, 3, 224, 224)
        profile["layer_profile"] = layer_profile(net, path.input(images), lambda: path.autocast("cpu"))
    print(json.dumps({
        "images": len(cells) * args.repeat, "batch_size": args.batch_size, "precision": precision,
        "compiled": use_compile(RunConfig().compile, resolve_precision("auto")),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads(),
        "train_images_per_s": round(train_rate, 1), "baseline_train_images_per_s": round(best[0], 1),
        "train_ratio": round(train_rate / best[0], 2),
        "infer_images_per_s": round(infer_rate, 1), "baseline_infer_images_per_s": round(best_infer, 1),
        "infer_ratio": round(infer_rate / best_infer, 2),
        "baseline_by_workers": {w: {"train": round(r[0], 1), "infer": round(r[1], 1)} for w, r in baselines.items()},
        "freed_memory_kept": kept,
        **({"train_images_per_s_memory_returned": round(returned[0], 1),
            "infer_images_per_s_memory_returned": round(returned[1], 1),
            "train_ratio_memory_kept": round(train_rate / returned[0], 2),
            "infer_ratio_memory_kept": round(infer_rate / returned[1], 2)} if returned else {}),
        **machine, "train_gflop_per_image": round(flops["train"] / 1e9, 2),
        "infer_gflop_per_image": round(flops["infer"] / 1e9, 2), **shares, **profile,
    }))


if __name__ == "__main__":
    main()
