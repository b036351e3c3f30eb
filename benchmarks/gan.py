"""GAN training and sampling throughput (alnet gan train / gan sample), as a share of this device's peak.

Trains the GAN of one split of a small synthetic C-NMC set (or --data) for --steps steps through `train_gan`,
the code `alnet gan train` runs, and draws --samples cells through `generate`. FLOPs per image come from
FlopCounterMode over one training step (a discriminator update on real and generated cells, a generator update)
and over one generator pass. The GAN runs in fp32 on a CPU and in bf16 on a GPU, so its share is of that peak.

Prints one JSON line: device, resolution, width, batch_size, gan_train_images_per_s, gan_train_gflop_per_image,
gan_train_gflops, gan_train_efficiency, sample_images_per_s, sample_gflop_per_image, sample_gflops,
sample_efficiency, peak_bf16_gflops, peak_fp32_gflops.
Usage: python benchmarks/gan.py [--data DIR] [--resolution 64] [--width 32] [--batch-size 32] [--steps 30]
       [--samples 512]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from efficiency import efficiency, peak_for, peaks
from torch.utils.flop_counter import FlopCounterMode

from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.protocols import make_splits
from alnet.data.synthetic import write_dataset
from alnet.data.transforms import Preprocessing
from alnet.gan.networks import Discriminator, Generator
from alnet.gan.store import generate
from alnet.gan.training import GanConfig, make_optimizers, train_gan, train_step
from alnet.memory import keep_freed_memory


def step_flops(config: GanConfig) -> float:
    """FLOPs of one training step per real image (forward and backward of both networks)."""
    generator, discriminator = Generator(config.resolution, config.width), Discriminator(config.resolution,
                                                                                          config.width)
    optimizers = make_optimizers(generator, discriminator, config.lr)
    real = torch.rand(4, 3, config.resolution, config.resolution) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        train_step(generator, discriminator, optimizers, real, torch.tensor([0, 1, 0, 1]))
    return counter.get_total_flops() / 4


def sample_flops(config: GanConfig) -> float:
    generator = Generator(config.resolution, config.width).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        generator(torch.randn(2, generator.z_dim), torch.tensor([0, 1]))
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()
    keep_freed_memory()  # as every alnet command does (alnet.memory)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    machine = peaks(device)
    config = GanConfig(resolution=args.resolution, width=args.width, batch_size=args.batch_size, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_dataset(Path(tmp) / "data", n_subjects=6, cells_per_subject=10, seed=0)
        prepared = prepare(scan(data).cells, Path(tmp) / "cache", Preprocessing(size=args.resolution))
        split = make_splits("subject", prepared.cells)[0]
        warm = GanConfig(**{**config.__dict__, "steps": 3})
        train_gan(prepared, split, warm, Path(tmp) / "warm", log=lambda m: None)  # first-call costs aside
        record = train_gan(prepared, split, config, Path(tmp) / "gan", log=lambda m: None)
        generator = Generator(args.resolution, args.width).eval()
        labels = torch.arange(args.samples) % 2
        generate(generator, labels[:64].numpy(), seed=0, device=device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False):
            generate(generator, labels.numpy(), seed=0, device=device, batch=256)
        sample_rate = args.samples / (time.perf_counter() - start)
    train_per_image, sample_per_image = step_flops(config), sample_flops(config)
    peak = peak_for(on_gpu, machine)  # the GAN runs in bf16 on a GPU, fp32 on a CPU
    print(json.dumps({
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "resolution": args.resolution,
        "width": args.width, "batch_size": args.batch_size, "steps": args.steps,
        "gan_train_images_per_s": round(record["images_per_s"], 1),
        "gan_train_gflop_per_image": round(train_per_image / 1e9, 3),
        **efficiency("gan_train", record["images_per_s"], train_per_image, peak),
        "sample_images_per_s": round(sample_rate, 1), "sample_gflop_per_image": round(sample_per_image / 1e9, 3),
        **efficiency("sample", sample_rate, sample_per_image, peak), **machine}))


if __name__ == "__main__":
    main()
