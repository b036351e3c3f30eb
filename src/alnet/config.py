"""Run configuration: one dataclass, read from and written to YAML (presets in configs/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml


class ConfigError(Exception):
    """A configuration file or value is unusable; the message says which and how to fix it."""


@dataclass
class RunConfig:
    model: str = "alnet"  # alnet, or a baseline: alexnet, vgg16, googlenet, resnet50
    pretrained: bool = True  # baselines: ImageNet weights (False: train from scratch)
    weights: str | None = None  # baselines: an explicit weights file instead of $TORCH_HOME/hub/checkpoints/
    finetune: bool = False  # baselines: also train the backbone (default: frozen, as in the paper)
    protocol: str = "subject"  # "subject" (honest default) or "paper" (image-level split, reproduction)
    epochs: int = 140
    batch_size: int = 32
    optimizer: str = "rmsprop"  # "rmsprop" (paper) or "adam"
    lr: float = 1e-4
    rho: float = 0.9  # RMSprop decay (Keras' rho = PyTorch's alpha)
    eps: float = 1e-7  # Keras' RMSprop epsilon
    dropout: float = 0.2  # §4.3; §3.1.3 says 0.3
    head: str = "sigmoid"  # "sigmoid" (paper: 2 sigmoids + binary cross-entropy) or "softmax"
    bn_momentum: float = 0.99  # Keras convention (share of the old running statistics kept per step)
    image_size: int = 224
    crop: float = 1.0  # fraction of the short side kept by the centre crop before resizing
    augment: bool = True  # online, per-sample: rotation ±15°, horizontal flip, zoom, contrast
    double_offline: bool = False  # paper: each training split doubled once with augmented copies
    rotation: float = 15.0
    zoom: float = 0.1
    contrast: float = 0.2
    val_fraction: float = 0.15  # share of training subjects held out for checkpoint selection (subject)
    seed: int = 0
    precision: str = "auto"  # "auto": bf16 autocast + channels-last on CPUs with bf16, AMP on CUDA; or "32"
    devices: int = 1
    strategy: str = "auto"  # "ddp" for several processes (torchrun / SLURM)
    accelerator: str = "auto"
    deterministic: bool = False

    def validate(self) -> "RunConfig":
        from .models import available_models

        checks = [
            (self.model in available_models(), f"model must be one of {', '.join(available_models())}"),
            (self.protocol in ("subject", "paper"), "protocol must be 'subject' or 'paper'"),
            (self.optimizer in ("rmsprop", "adam"), "optimizer must be 'rmsprop' or 'adam'"),
            (self.head in ("sigmoid", "softmax"), "head must be 'sigmoid' or 'softmax'"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be at least 1"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 < self.crop <= 1, "crop must be in (0, 1]"),
            (0 <= self.bn_momentum < 1, "bn_momentum must be in [0, 1)"),
            (self.precision in ("auto", "32", "bf16", "16"), "precision must be auto, 32, bf16 or 16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_yaml(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides) -> "RunConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the configuration ({err}); check the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data).validate()
