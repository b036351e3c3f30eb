"""The model logic of training: any registered model + the paper's loss and optimiser (a LightningModule).

Batches arrive as uint8 from `batches.py`; they become floats here, on the device, and are augmented here
after a per-batch reseed, so that a resumed run draws the same augmentations and dropout masks. Losses and
accuracies accumulate on the device (torchmetrics) and are read once per epoch, when the epoch's row goes to
the trainer's loggers (`loggers.py`); the CSV log is the run's history. Without a progress bar nothing is read
per step, so a GPU never waits for the host inside an epoch; with one, a GPU's step loss is read for it once every
LOSS_SHOWN_EVERY steps.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from ..config import RunConfig
from ..data.augment import make_augment
from ..data.transforms import to_float
from ..device import resolve_precision, use_compile
from ..models import create_model_from, probability_all
from .loggers import log_epoch

# Reading a loss on the host makes the host wait for the device: per step on a GPU, that wait keeps the host from
# queueing the next step while this one runs. The progress bar's loss is therefore refreshed every this many steps
# there (every step on a CPU, where reading it costs nothing).
LOSS_SHOWN_EVERY = 25


class CellClassifier(L.LightningModule):
    """Any registered model + the paper's loss and optimiser; records per-epoch history and test predictions."""

    def __init__(self, config: dict, seen_subjects: list[str] | None = None, model: nn.Module | None = None):
        """`seen_subjects`: the training and validation subjects, kept in the checkpoint so that `evaluate`
        can leave them out. `model`: an already built (e.g. trained) network instead of a new one."""
        super().__init__()
        # Kept in the checkpoint; experiment loggers get the flat settings instead (`loggers.make_loggers`).
        self.save_hyperparameters(ignore=["model"], logger=False)
        self.config = c = RunConfig(**config)
        self.model = model if model is not None else create_model_from(c)
        self.on_features = False  # True while training a frozen backbone's head on precomputed features
        self.augment = make_augment(c.rotation, c.zoom, c.contrast) if c.augment else None
        self.precision_path = resolve_precision(c.precision, c.accelerator)
        self.channels_last = False
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_accuracy, self.val_accuracy = BinaryAccuracy(), BinaryAccuracy()
        self._val_row: dict = {}
        self._outputs: list[torch.Tensor] = []
        self.test_predictions: dict[str, np.ndarray] | None = None

    # inputs -------------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if not self.on_features:
            batch["image"] = to_float(batch["image"])  # uint8 → float, on the device
        return batch

    def use_channels_last(self) -> None:
        """Model (and, through `to_input`, its inputs) channels-last where the precision path wants it."""
        if self.precision_path.channels_last:
            self.channels_last = True
            self.model.to(memory_format=torch.channels_last)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.precision_path.input(x) if self.channels_last else x

    def probability_all(self, logits: torch.Tensor) -> torch.Tensor:
        return probability_all(logits, self.config.head)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.config.head == "sigmoid":  # the paper: binary cross-entropy on two sigmoids, one-hot targets
            return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 2).float())
        return F.cross_entropy(logits, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x) if self.on_features else self.model(x)

    # training -----------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.train_loss.reset()
        self.train_accuracy.reset()

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Reseed per (seed, epoch, batch, rank): dropout and augmentation draw the same numbers after a resume.
        torch.manual_seed(((self.config.seed * 100_003 + self.current_epoch) * 100_003 + batch_idx) * 1_009
                          + self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        # Augment here, after the reseed above, so that a resumed run augments identically.
        if self.augment is not None and not self.on_features:
            x = self.augment(x)
        logits = self(self.to_input(x))
        loss = self.loss(logits, batch["label"])
        self.train_loss.update(loss.detach(), weight=len(logits))
        self.train_accuracy.update(self.probability_all(logits.detach()), batch["label"])
        shown = self._trainer is not None and self._trainer.progress_bar_callback is not None  # None: no Trainer
        if shown and (loss.device.type == "cpu" or batch_idx % LOSS_SHOWN_EVERY == 0):
            self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=len(logits),
                     logger=False)
        return loss

    def _masked(self, batch: dict):
        keep = batch["index"] >= 0
        logits = self(self.to_input(batch["image"][keep]))
        return logits, batch["label"][keep], batch["index"][keep]

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()
        self.val_accuracy.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, labels, _ = self._masked(batch)
        if len(labels):
            self.val_loss.update(self.loss(logits, labels), weight=len(labels))
            self.val_accuracy.update(self.probability_all(logits), labels)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self._val_row = {"val_loss": float(self.val_loss.compute()), "val_accuracy": float(self.val_accuracy.compute())}
        # For the progress bar and ModelCheckpoint's monitor; loggers get the whole epoch row below.
        self.log("val_loss", self._val_row["val_loss"], prog_bar=True, sync_dist=False, logger=False)
        self.log("val_accuracy", self._val_row["val_accuracy"], prog_bar=True, sync_dist=False, logger=False)

    def on_train_epoch_end(self) -> None:
        # Runs after validation and before ModelCheckpoint saves: the epoch's row is on disk in the CSV log
        # before its checkpoint exists, so a run killed in between and resumed loses no row. (Rows logged with
        # `self.log(on_epoch=True)` would reach the loggers only after the checkpoint.)
        row = {"epoch": self.current_epoch + 1, "train_loss": float(self.train_loss.compute()),
               "train_accuracy": float(self.train_accuracy.compute())}
        row.update(self._val_row or {"val_loss": float("nan"), "val_accuracy": float("nan")})
        self._val_row = {}
        log_epoch(self.loggers, row)

    def configure_optimizers(self):
        c = self.config
        trainable = [p for p in self.parameters() if p.requires_grad]  # a frozen backbone is left out
        if c.optimizer == "rmsprop":  # Keras RMSprop: rho → alpha, epsilon outside the square root as in torch
            return torch.optim.RMSprop(trainable, lr=c.lr, alpha=c.rho, eps=c.eps)
        return torch.optim.Adam(trainable, lr=c.lr, eps=c.eps)

    @property
    def uses_cached_features(self) -> bool:
        """A frozen backbone seeing un-augmented images gives the same features every epoch: compute them once."""
        c = self.config
        return self.model.frozen and not c.augment and not c.double_offline

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, rows: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """`forward_features` of `rows` of the uint8 N×H×W×3 `images` → a float tensor with one row per image
        (rows not asked for stay zero), computed in eval mode with the run's precision."""
        model = self.model.eval()
        device = next(model.parameters()).device
        out = None
        for start in range(0, len(rows), batch_size):
            idx = torch.from_numpy(np.asarray(rows[start:start + batch_size], dtype=np.int64))
            x = self.precision_path.input(to_float(images[idx].to(device)))
            with self.precision_path.autocast(device.type):
                f = model.forward_features(x).float()
            if out is None:
                out = torch.zeros((len(images), *f.shape[1:]), dtype=torch.float32)
            out[idx] = f.cpu()
        return out


def build_module(config: RunConfig, seen_subjects: list[str]) -> CellClassifier:
    """A new module for training, laid out as the precision path wants it, its network compiled in place when
    the `compile` setting says so (`nn.Module.compile`: the weights' names stay those of the model)."""
    module = CellClassifier(asdict(config), seen_subjects=seen_subjects)
    module.use_channels_last()
    if use_compile(config.compile, module.precision_path):
        module.model.compile()
    return module
