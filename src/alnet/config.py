"""Run configuration: one dataclass, read from and written to YAML.

The presets (`paper`, `subject`) and the search grid (`grid`) ship inside the package (`alnet/configs/`), so
they resolve the same from a checkout, a wheel or a git install.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

from .data.transforms import Preprocessing
from .device import COMPILE_SETTINGS, PRECISIONS


class ConfigError(Exception):
    """A configuration file or value is unusable; the message says which and how to fix it."""


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
RUN_PRESETS = ("paper", "subject")  # run configurations, for --config
GRID_PRESETS = ("grid",)  # search spaces, for `alnet tune --grid`


def resolve_preset(name_or_path: str | Path, presets: tuple[str, ...] = RUN_PRESETS) -> Path:
    """A YAML file as given, or the packaged preset of that name among `presets` (alnet/configs/<name>.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if not path.exists() and str(name_or_path) in presets:
        return Path(str(resources.files("alnet.configs") / f"{name_or_path}.yaml"))
    raise ConfigError(f"{name_or_path}: no such file; pass a YAML file or a preset name ({', '.join(presets)})")


def read_yaml(path: Path | str, what: str = "configuration") -> dict:
    """A YAML mapping from a file, or a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the {what} ({type(err).__name__}); check the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings in the {what}")
    return data


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 2, 4, 4, 60


def _shown(value) -> str:
    """A value as an error message may quote it: short, even for a YAML alias bomb."""
    return _REPR.repr(value)


def _typed(name: str, kind: str, value):
    """`value` as the setting's declared type, or a ConfigError naming the setting. YAML reads `1e-4` as a
    string, so numbers written that way are accepted; `2.5` is not a count and "no" is not a boolean."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, not {_shown(value)}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be a whole number, not {_shown(value)}")
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{name} must be a finite number, not {_shown(value)}")
    if value is None and "None" in kind:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `precision: 32`
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be text, not {_shown(value)}")
    return value


@dataclass
class RunConfig:
    model: str = "alnet"  # any name of alnet.models.available_models()
    pretrained: bool = True  # baselines: ImageNet weights (False: train from scratch)
    weights: str | None = None  # baselines: an explicit weights file instead of $TORCH_HOME/hub/checkpoints/
    finetune: bool = False  # baselines: also train the backbone (default: frozen, as in the paper)
    features_from: str | None = None  # hybrids: a run directory or checkpoint whose weights a backbone takes
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
    compile: str = "auto"  # torch.compile of the network for training: off, on, auto (on a GPU)
    synthetic: str | None = None  # a GAN folder (`alnet gan train`): generated cells join each split's training side
    synthetic_ratio: float = 0.5  # generated cells per real training cell

    def validate(self) -> "RunConfig":
        """Check every value (types first, then ranges); returns self, or raises a one-line ConfigError."""
        from .models import available_models, is_model, model_spec

        if isinstance(self.compile, bool):  # YAML reads `compile: on` as true
            self.compile = "on" if self.compile else "off"
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, f.type, getattr(self, f.name)))
        checks = [
            (is_model(self.model), f"model must be one of {', '.join(available_models())}, or a hybrid such as "
                                   "resnet50+svm (BACKBONE[,BACKBONE…]+[pca+]svm|rf|knn)"),
            (self.protocol in ("subject", "paper"), "protocol must be 'subject' or 'paper'"),
            (self.optimizer in ("rmsprop", "adam"), "optimizer must be 'rmsprop' or 'adam'"),
            (self.head in ("sigmoid", "softmax"), "head must be 'sigmoid' or 'softmax'"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be at least 1"),
            (self.devices >= 1, "devices must be at least 1"),
            (self.image_size >= 32, "image_size must be at least 32 pixels (ALNet needs 136)"),
            (self.lr > 0 and self.eps > 0, "lr and eps must be positive"),
            (0 <= self.rho < 1, "rho must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.rotation >= 0 and 0 <= self.zoom < 1 and 0 <= self.contrast < 1,
             "rotation must be at least 0, zoom and contrast in [0, 1)"),
            (0.05 <= self.crop <= 1, "crop must be in [0.05, 1]"),
            (0 <= self.bn_momentum < 1, "bn_momentum must be in [0, 1)"),
            (0 < self.synthetic_ratio <= 10, "synthetic_ratio must be in (0, 10]"),
            (not (self.synthetic and is_model(self.model) and model_spec(self.model).hybrid),
             "synthetic cells are for networks trained by gradient descent, not hybrids (their classifier is fitted "
             "on real cells only)"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.compile in COMPILE_SETTINGS, f"compile must be one of {', '.join(COMPILE_SETTINGS)}"),
            (self.accelerator in ACCELERATORS, f"accelerator must be one of {', '.join(ACCELERATORS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.image_size, crop=self.crop)

    def to_yaml(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides) -> "RunConfig":
        path = Path(path)
        data = read_yaml(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data).validate()
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides) -> "RunConfig":
        """A preset name, a YAML file or (None) the defaults, with the non-None `overrides` on top."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if config is None:
            try:
                return cls(**given).validate()
            except TypeError as err:
                raise ConfigError(str(err)) from None
        return cls.from_yaml(resolve_preset(config), **given)
