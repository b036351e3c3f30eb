"""CPU inference: onnxruntime on the exported model against the PyTorch path of `alnet predict`, same run.

Both classify the same uint8 batches (decoding excluded): PyTorch with the checkpoint's default precision
(bf16 autocast + channels-last on CPUs with bf16) and in fp32, onnxruntime in fp32 (its CPU provider).
Without --checkpoint an untrained ALNet is saved and exported (speed does not depend on the weights).
Prints one JSON line of images/s and ratios, and what they mean on this machine (benchmarks/efficiency.py):
peak_bf16_gflops, peak_fp32_gflops, infer_gflops and infer_efficiency (PyTorch default path, against the peak of
its precision), and the same for PyTorch fp32 and onnxruntime (against the fp32 peak).
Usage: python benchmarks/onnx_inference.py [--checkpoint CKPT] [--images 256] [--batch-size 64]
"""

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from efficiency import efficiency, forward_flops, peak_for, peaks, predictor_rate

from alnet.config import RunConfig
from alnet.device import resolve_precision
from alnet.infer.export import export_onnx
from alnet.infer.predict import load_pipeline
from alnet.memory import keep_freed_memory
from alnet.train.module import CellClassifier


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    keep_freed_memory()  # as every alnet command does (alnet.memory)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "alnet.ckpt"
            module = CellClassifier(asdict(RunConfig()))
            torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, checkpoint)
        onnx_path = export_onnx(checkpoint, Path(tmp) / "alnet.onnx")
        default = load_pipeline(checkpoint, accelerator="cpu")  # a CPU comparison, GPU or not
        size = default.preprocessing.size
        images = np.random.default_rng(0).integers(0, 255, (args.images, size, size, 3), dtype=np.uint8)
        torch_default = predictor_rate(default, images, args.batch_size)
        fp32 = load_pipeline(checkpoint, precision="32", accelerator="cpu")
        torch_fp32 = predictor_rate(fp32, images, args.batch_size)
        onnx = predictor_rate(load_pipeline(onnx_path), images, args.batch_size)
        flops = forward_flops(default.trained.model, size)
        bf16 = default.trained.config.get("precision", "auto") != "32" and resolve_precision("auto", "cpu").lightning \
            == "bf16-mixed"
    machine = peaks()
    shares = {**efficiency("infer", torch_default, flops, peak_for(bf16, machine)),
              **efficiency("torch_fp32_infer", torch_fp32, flops, machine["peak_fp32_gflops"]),
              **efficiency("onnxruntime_infer", onnx, flops, machine["peak_fp32_gflops"])}
    print(json.dumps({
        "images": args.images, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "onnxruntime_images_per_s": round(onnx, 1), "torch_default_images_per_s": round(torch_default, 1),
        "torch_fp32_images_per_s": round(torch_fp32, 1),
        "onnx_vs_torch_default": round(onnx / torch_default, 2), "onnx_vs_torch_fp32": round(onnx / torch_fp32, 2),
        **machine, "infer_gflop_per_image": round(flops / 1e9, 2), **shares,
    }))


if __name__ == "__main__":
    main()
