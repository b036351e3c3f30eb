"""The Lightning trainer as alnet configures it: precision and device from `device.py`, only the checkpoints a
caller asks for, only the loggers a caller passes (`loggers.py`), quiet start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from ..config import RunConfig
from ..device import resolve_precision


def is_main_process() -> bool:
    """Rank 0 (or no distributed run): the one process that writes files and prints results."""
    return rank_zero_only.rank == 0


def make_trainer(config: RunConfig, callbacks: Sequence[Callback], root: Path, progress: bool, validate: bool,
                 loggers: Sequence = ()):
    precision = resolve_precision(config.precision, config.accelerator)
    return L.Trainer(
        accelerator=precision.accelerator, devices=config.devices, strategy=config.strategy,
        precision=precision.lightning, max_epochs=config.epochs, logger=list(loggers) or False,
        enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=config.deterministic, callbacks=list(callbacks),
        use_distributed_sampler=False, default_root_dir=root, enable_progress_bar=progress,
        limit_val_batches=1.0 if validate else 0,
        # Only the checkpoints a caller asks for: never Lightning's default folder in the working directory.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator banners, tips) out of the user's terminal."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # expected when resuming
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen backbones, on purpose
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # alnet logs per epoch
