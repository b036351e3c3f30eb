"""int8 against bf16 inference on this CPU, in the same run: how much faster, and how much the answers move.

The models: --checkpoint (an ALNet checkpoint; training stores its int8 calibration), else two ALNets trained
here for --epochs at 224 px (paper protocol; fold 0's checkpoint, with the int8 calibration training fits on its
training cells): one on the 52 real cells of tests/data/cnmc-mini, for the agreement on real cells (a model
trained on synthetic cells calls every real cell ALL, which would make agreement meaningless), and one on a
small synthetic C-NMC-like set, for the AUC on synthetic subjects it never saw.

Speed: the same uint8 batches of real cells (decoding excluded) through `alnet predict`'s two torch paths, the
default (bf16
autocast + channels-last where the CPU has bf16, else fp32) and `--int8`, in --rounds interleaved rounds, the
best round of each; and onnxruntime on the model `alnet export --int8` writes. What the speeds mean on this
machine (benchmarks/efficiency.py): the matmul peaks measured now (bf16, fp32, and int8 by `torch._int_mm`), the
model's GFLOP per image, and each path's achieved GFLOP/s (int8: GOP/s) and share of its precision's peak.

Answers: labels and P(ALL) of both paths on the 52 real cells (label_agreement, max_abs_dp), and the AUC of both
on a synthetic test set of subjects the model never saw (auc_delta: int8 − bf16). The speed is measured on the
real-cell model (speed does not depend on the weights).

Prints one JSON line: int8_images_per_s, bf16_images_per_s, speedup, label_agreement, max_abs_dp, auc_delta, …
Usage: python benchmarks/int8.py [--checkpoint CKPT] [--images 256] [--batch-size 64] [--rounds 3] [--epochs 12]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from efficiency import efficiency, forward_flops, peaks, predictor_rate

from alnet.config import RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.synthetic import write_dataset
from alnet.data.transforms import Preprocessing
from alnet.device import resolve_precision
from alnet.infer.export import export_onnx
from alnet.infer.predict import load_pipeline
from alnet.int8 import ENGINE
from alnet.memory import keep_freed_memory
from alnet.metrics import roc_auc
from alnet.train.run import train_run

MINI = Path(__file__).resolve().parents[1] / "tests" / "data" / "cnmc-mini"


def int8_peak_gops(size: int = 2048, repeats: int = 8) -> float:
    """The best rate of a size×size int8 × int8 → int32 matrix product (`torch._int_mm`), GOP/s."""
    a = torch.randint(-128, 128, (size, size), dtype=torch.int8)
    b = torch.randint(-128, 128, (size, size), dtype=torch.int8)
    torch._int_mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch._int_mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def trained_checkpoint(root: Path, workdir: Path, epochs: int) -> Path:
    """ALNet trained at 224 px on the cells under `root` (paper protocol; fold 0's checkpoint is the one used)."""
    prepared = prepare(scan(root).cells, workdir / "cache", Preprocessing(size=224))
    config = RunConfig(protocol="paper", epochs=epochs, image_size=224, batch_size=16, bn_momentum=0.5)
    train_run(config, prepared, workdir / "run", progress=False, log=lambda message: None)
    return workdir / "run" / "checkpoints" / "fold_0" / "last.ckpt"


def cached(root: Path, workdir: Path, name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every labelled cell under `root`, preprocessed at the model's size: (uint8 N×size×size×3, labels)."""
    prepared = prepare([c for c in scan(root).cells if c.label is not None], workdir / name, Preprocessing(size=size))
    return np.asarray(prepared.images), np.array([c.label for c in prepared.cells])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="an ALNet checkpoint with its int8 calibration")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12, help="training epochs when no --checkpoint is given")
    args = parser.parse_args()
    keep_freed_memory()  # as every alnet command does (alnet.memory)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or trained_checkpoint(MINI, workdir / "real", args.epochs)
        synthetic = args.checkpoint or trained_checkpoint(
            write_dataset(workdir / "train-data", n_subjects=6, cells_per_subject=12, seed=3), workdir / "synthetic",
            args.epochs)
        default = load_pipeline(checkpoint, accelerator="cpu")
        int8 = load_pipeline(checkpoint, int8=True)
        onnx_int8 = load_pipeline(export_onnx(checkpoint, workdir / "int8.onnx", int8=True))
        size = default.preprocessing.size
        real, _ = cached(MINI, workdir, "real-cache", size)
        # Real cells, repeated: random pixels would leave the int8 form's calibrated ranges and be answered in
        # full precision, which times the fallback, not int8.
        images = real[np.arange(args.images) % len(real)]
        rounds = {"default": [], "int8": [], "onnx_int8": []}
        for _ in range(args.rounds):  # interleaved, so that a noisy moment hits every path
            for name, pipeline in (("default", default), ("int8", int8), ("onnx_int8", onnx_int8)):
                rounds[name].append(predictor_rate(pipeline, images, args.batch_size))
        best = {name: max(rates) for name, rates in rounds.items()}
        timed_fallbacks = sum(answer.int8_fallback for answer in int8.answer(images))
        p_real, q_real = default.probabilities(real), int8.probabilities(real)
        f_real = load_pipeline(checkpoint, precision="32", accelerator="cpu").probabilities(real)  # the reference
        test_root = write_dataset(workdir / "test-data", n_subjects=8, cells_per_subject=12, n_folds=1,
                                  prelim_subjects=0, final_images=0, seed=11)  # subjects unseen in training
        test, labels = cached(test_root, workdir, "test-cache", size)
        p_test, q_test = (load_pipeline(synthetic, accelerator="cpu", int8=int8).probabilities(test)
                          for int8 in (False, True))
        flops = forward_flops(default.trained.model, size)
    bf16 = default.trained.config.get("precision", "auto") != "32" and resolve_precision(
        "auto", "cpu").lightning == "bf16-mixed"
    machine = {**peaks(), "peak_int8_gops": round(int8_peak_gops(), 1)}
    auc_default, auc_int8 = roc_auc(labels, p_test), roc_auc(labels, q_test)
    print(json.dumps({
        "int8_images_per_s": round(best["int8"], 1),
        "bf16_images_per_s": round(best["default"], 1),
        "speedup": round(best["int8"] / best["default"], 2),
        "label_agreement": round(float(np.mean((p_real > 0.5) == (q_real > 0.5))), 4),
        "max_abs_dp": round(float(np.abs(p_real - q_real).max()), 4),
        "auc_delta": round(auc_int8 - auc_default, 4),
        "default_precision": "bf16-mixed" if bf16 else "32-true",
        "int8_fallback_share_while_timed": round(timed_fallbacks / (args.images * args.rounds + args.batch_size), 4),
        "onnx_int8_images_per_s": round(best["onnx_int8"], 1),
        "onnx_int8_speedup": round(best["onnx_int8"] / best["default"], 2),
        "rounds_images_per_s": {name: [round(r, 1) for r in rates] for name, rates in rounds.items()},
        "changed_labels_p_all_bf16_int8": [[round(float(a), 3), round(float(b), 3)] for a, b in zip(p_real, q_real)
                                           if (a > 0.5) != (b > 0.5)],
        "bf16_vs_fp32_label_agreement": round(float(np.mean((p_real > 0.5) == (f_real > 0.5))), 4),
        "int8_vs_fp32_label_agreement": round(float(np.mean((q_real > 0.5) == (f_real > 0.5))), 4),
        "bf16_vs_fp32_max_abs_dp": round(float(np.abs(p_real - f_real).max()), 4),
        "real_cells": len(real), "real_cells_called_all": int((p_real > 0.5).sum()),
        "synthetic_test_cells": len(test), "synthetic_test_max_abs_dp": round(float(np.abs(p_test - q_test).max()), 4),
        "synthetic_test_label_agreement": round(float(np.mean((p_test > 0.5) == (q_test > 0.5))), 4),
        "auc_bf16": round(auc_default, 4), "auc_int8": round(auc_int8, 4),
        "engine": ENGINE, "image_size": size, "batch_size": args.batch_size, "images": args.images,
        "checkpoint": str(args.checkpoint) if args.checkpoint else f"trained here for {args.epochs} epochs: on the "
                                                                     "real cells, and on synthetic ones for the AUC",
        **machine, "infer_gflops_per_image": round(flops / 1e9, 3),
        **efficiency("bf16_infer", best["default"], flops, machine["peak_bf16_gflops" if bf16 else "peak_fp32_gflops"]),
        **{k.replace("gflops", "gops"): v for k, v in efficiency(
            "int8_infer", best["int8"], flops, machine["peak_int8_gops"]).items()},
    }))


if __name__ == "__main__":
    main()
