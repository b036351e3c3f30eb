"""Frozen feature extraction of each baseline backbone: the project's path against fp32 eager.

Ours: `CellClassifier.extract_features` (the run's default precision: bf16 autocast + channels-last on CPUs with
bf16). Plain: the same backbone, fp32, contiguous NCHW, no autocast. Random weights (speed does not depend on
their values), random 224×224 images. Prints one JSON line: per backbone, images/s of both and the ratio, and
its GFLOP per image, achieved GFLOP/s and share of the peak of its precision (`infer_efficiency`; the plain path
against the fp32 peak), with the machine's peak_bf16_gflops and peak_fp32_gflops (benchmarks/efficiency.py).
Usage: python benchmarks/features.py [--images 64] [--batch-size 32] [--models alexnet,vgg16,googlenet,resnet50]
"""

import argparse
import json
import time
from dataclasses import asdict

import numpy as np
import torch
from efficiency import efficiency, forward_flops, peak_for, peaks

from alnet.config import RunConfig
from alnet.data.transforms import to_float
from alnet.device import resolve_precision
from alnet.train.module import build_module


def rate(fn, images: int) -> float:
    fn()  # warm-up: kernel selection, weight reorders
    start = time.perf_counter()
    fn()
    return images / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="alexnet,vgg16,googlenet,resnet50")
    args = parser.parse_args()
    images = torch.randint(0, 255, (args.images, 224, 224, 3), dtype=torch.uint8)
    rows = np.arange(args.images)
    result = {"images": args.images, "batch_size": args.batch_size,
              "precision": resolve_precision().lightning, "threads": torch.get_num_threads(), **peaks()}
    bf16 = result["precision"] == "bf16-mixed"
    for name in args.models.split(","):
        config = RunConfig(model=name, pretrained=False, augment=False)
        module = build_module(config, [])
        ours = rate(lambda: module.extract_features(images, rows, args.batch_size), args.images)
        plain_model = build_module(RunConfig(**{**asdict(config), "precision": "32"}), []).model.eval()

        @torch.no_grad()
        def plain():
            for start in range(0, args.images, args.batch_size):
                plain_model.forward_features(to_float(images[start:start + args.batch_size]).contiguous())

        baseline = rate(plain, args.images)
        flops = forward_flops(plain_model, method="forward_features")
        result[name] = {"images_per_s": round(ours, 1), "fp32_eager_images_per_s": round(baseline, 1),
                        "ratio": round(ours / baseline, 2), "gflop_per_image": round(flops / 1e9, 2),
                        **efficiency("infer", ours, flops, peak_for(bf16, result)),
                        **efficiency("fp32_eager_infer", baseline, flops, result["peak_fp32_gflops"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
