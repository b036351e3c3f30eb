"""Where an ALNet training step spends its time on this machine (default CPU path: bf16 + channels-last).

Prints the torch.profiler table of the top operators over a few steps (batch 32, augmentation on), grouped
into convolution, element-wise/pooling, augmentation and the rest, as one JSON line at the end, with the step's
train_efficiency (share of this machine's matmul peak in the step's precision; benchmarks/efficiency.py) and
convolution_ceiling: the share the step would reach if everything but its convolutions (oneDNN's kernels, forward
and backward) took no time, i.e. the most that work outside the convolutions can win on this machine.
Usage: python benchmarks/profile_train_step.py [--steps 4] [--batch-size 32]
"""

import argparse
import json

import torch
from efficiency import efficiency, peak_for, peaks, training_flops
from torch.profiler import ProfilerActivity, profile

from alnet.config import RunConfig
from alnet.memory import keep_freed_memory
from alnet.train.module import build_module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    keep_freed_memory()  # as every alnet command does
    config = RunConfig(batch_size=args.batch_size)
    module = build_module(config, [])  # channels-last where the precision path wants it
    precision = module.precision_path.lightning
    optimizer = module.configure_optimizers()
    images = torch.randint(0, 255, (args.batch_size, 224, 224, 3), dtype=torch.uint8)
    labels = torch.randint(0, 2, (args.batch_size,))
    batch = {"image": images, "label": labels, "index": torch.arange(args.batch_size)}

    def step():
        b = module.on_after_batch_transfer(dict(batch), 0)
        with module.precision_path.autocast("cpu"):
            loss = module.training_step(b, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    module.train()
    module.log = lambda *a, **k: None  # outside a Trainer
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"convolution": ("convolution", "mkldnn_conv"), "elementwise_and_pooling": (
        "threshold", "relu", "clamp", "max_pool", "fill_", "batch_norm"), "augmentation": (
        "grid_sampler", "affine", "linalg", "bmm", "warp")}
    shares = {name: 0.0 for name in groups}
    for e in events:
        for name, keys in groups.items():
            if any(k in e.key for k in keys):
                shares[name] += e.self_cpu_time_total
                break
    step_s = total / args.steps / 1e6
    convolution_s = shares["convolution"] / args.steps / 1e6
    machine = peaks()
    peak = peak_for("bf16" in precision, machine)
    flops = training_flops(build_module(config, []).model)
    # The step's efficiency as if its convolutions were all it did.
    ceiling = efficiency("convolution", args.batch_size / convolution_s, flops, peak)["convolution_efficiency"]
    print(json.dumps({"precision": precision, "batch_size": args.batch_size,
                      "step_ms": round(1000 * step_s, 1), **machine,
                      **efficiency("train", args.batch_size / step_s, flops, peak),
                      **{f"{k}_share": round(v / total, 3) for k, v in shares.items()},
                      "convolution_ms": round(1000 * convolution_s, 1),
                      "convolution_ceiling": ceiling}))


if __name__ == "__main__":
    main()
