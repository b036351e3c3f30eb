"""Where an ALNet training step's time goes on a CUDA GPU: augmentation alone, the model step alone (forward,
backward, optimizer; bf16 AMP, channels-last), both together, and the model step under torch.compile.

Prints one JSON line per batch size with milliseconds per step and the images/s each part alone would allow.
Usage: python benchmarks/gpu_step.py [--batch-sizes 32,256] [--steps 20] [--compile]
"""

import argparse
import json
import time

import torch

from alnet.config import RunConfig
from alnet.train.module import build_module


def timed(fn, steps: int) -> float:
    """Milliseconds per call, after warm-up calls (cuDNN autotuning, lazy allocations)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="32,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time the model step under torch.compile")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        module = build_module(RunConfig(batch_size=batch_size), []).cuda()
        module.train()
        module.log = lambda *a, **k: None  # outside a Trainer
        optimizer = module.configure_optimizers()
        images = torch.randint(0, 255, (batch_size, 224, 224, 3), dtype=torch.uint8, device="cuda")
        labels = torch.randint(0, 2, (batch_size,), device="cuda")
        floats = module.on_after_batch_transfer({"image": images}, 0)["image"]
        path = module.precision_path

        def augment():
            return module.augment(floats)

        def model_step(model=module.model):
            with path.autocast("cuda"):
                loss = module.loss(model(module.to_input(floats)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def full_step():
            batch = module.on_after_batch_transfer({"image": images, "label": labels}, 0)
            with path.autocast("cuda"):
                loss = module.training_step(batch, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        ms = {"augment": timed(augment, args.steps), "model_step": timed(model_step, args.steps),
              "full_step": timed(full_step, args.steps)}
        if args.compile:
            compiled = torch.compile(module.model)
            ms["compiled_model_step"] = timed(lambda: model_step(compiled), args.steps)
        print(json.dumps({"device": torch.cuda.get_device_name(), "batch_size": batch_size,
                          "precision": path.lightning,
                          **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                          **{f"{k}_images_per_s": round(batch_size / v * 1000) for k, v in ms.items()}}))


if __name__ == "__main__":
    main()
