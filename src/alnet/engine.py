"""Training and evaluation: a Lightning module (model logic) and a data module (batches from the uint8 cache).

Batches are gathered whole from the in-memory uint8 array (no decoding, no per-image Python work), moved to
the device, turned into floats there and augmented there with per-sample parameters (DESIGN.md §5).
"""

from __future__ import annotations

import os
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from .config import RunConfig
from .data.augment import augmented_copies, make_augment, to_float
from .models import create_model, probability_all

PADDING = -1  # row index of filler samples that keep every rank's batch count equal under DDP


# --- data ----------------------------------------------------------------------------------------------------

def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside distributed runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(order: np.ndarray, rank: int, world_size: int, pad_with_repeats: bool) -> np.ndarray:
    """This rank's share of `order`: padded to a multiple of world_size (with repeats of the first rows when
    training, PADDING when evaluating), then every world_size-th row. Shards are disjoint apart from padding."""
    extra = -len(order) % world_size
    if extra:
        filler = np.resize(order, extra) if pad_with_repeats else np.full(extra, PADDING, dtype=order.dtype)
        order = np.concatenate([order, filler])
    return order[rank::world_size]


class BatchOrder(Sampler):
    """Yields arrays of row indices, one per batch, for this rank; reshuffled per epoch from (seed, epoch)."""

    def __init__(self, rows: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
        self.rows, self.batch_size, self.shuffle, self.seed = np.asarray(rows), batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def _mine(self) -> np.ndarray:
        order = self.rows
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return shard(order, *world(), pad_with_repeats=self.shuffle)

    def __iter__(self):
        mine = self._mine()
        for start in range(0, len(mine), self.batch_size):
            yield mine[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self._mine()) // self.batch_size)


class CellBatches(Dataset):
    """`dataset[rows]` is a whole batch: uint8 images N×H×W×3, labels and row indices."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __getitem__(self, rows: np.ndarray) -> dict:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.images.device)
        safe = index.clamp(min=0)
        return {"image": self.images[safe], "label": self.labels[safe], "index": index}

    def __len__(self) -> int:
        return len(self.images)


class CellData(L.LightningDataModule):
    """Train / validation / test batches of one split, read from the prepared uint8 array."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train, val, test, config: RunConfig):
        super().__init__()
        self.images, self.labels = images, labels
        self.train_rows, self.val_rows, self.test_rows = (np.asarray(r, dtype=np.int64) for r in (train, val, test))
        self.config = config

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type == "cuda" and self.images.device != device:
            # The whole uint8 cache fits on a GPU (2.3 GB for C-NMC at 224 px): batches are gathered there.
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        if stage == "fit" and self.config.double_offline and len(self.train_rows):
            # The paper doubled each training split once, offline: append one augmented copy of each image.
            c = self.config
            augment = make_augment(c.rotation, c.zoom, c.contrast)
            copies = augmented_copies(self.images[self.train_rows].cpu().numpy(), augment, seed=c.seed)
            first_new = len(self.images)
            self.images = torch.cat([self.images, torch.from_numpy(copies).to(self.images.device)])
            self.labels = torch.cat([self.labels, self.labels[self.train_rows]])
            self.train_rows = np.concatenate([self.train_rows, np.arange(first_new, first_new + len(copies))])

    def _loader(self, rows, shuffle: bool) -> DataLoader:
        sampler = BatchOrder(rows, self.config.batch_size, shuffle, self.config.seed)
        return DataLoader(CellBatches(self.images, self.labels), sampler=sampler, batch_size=None,
                          pin_memory=torch.cuda.is_available() and self.images.device.type == "cpu")

    def train_dataloader(self):
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_rows, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_rows, shuffle=False)


# --- model logic ---------------------------------------------------------------------------------------------

class CellClassifier(L.LightningModule):
    """Any registered model + the paper's loss and optimiser; records per-epoch history and test predictions."""

    def __init__(self, config: dict, seen_subjects: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.config = c = RunConfig(**config)
        self.model = create_model(c.model, **model_kwargs(c))
        self.on_features = False  # True while training a frozen backbone's head on precomputed features
        self.augment = make_augment(c.rotation, c.zoom, c.contrast) if c.augment else None
        self.channels_last = False
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_accuracy, self.val_accuracy = BinaryAccuracy(), BinaryAccuracy()
        self.history: list[dict] = []
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
        if resolve_precision(self.config)[2]:
            self.channels_last = True
            self.model.to(memory_format=torch.channels_last)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def probability_all(self, logits: torch.Tensor) -> torch.Tensor:
        return probability_all(logits, self.config.head)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.config.head == "sigmoid":  # the paper: binary cross-entropy on two sigmoids, one-hot targets
            return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 2).float())
        return F.cross_entropy(logits, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x) if self.on_features else self.model(x)

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
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=len(logits))
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
        self.log("val_loss", self._val_row["val_loss"], prog_bar=True, sync_dist=False)
        self.log("val_accuracy", self._val_row["val_accuracy"], prog_bar=True, sync_dist=False)

    def on_train_epoch_end(self) -> None:
        # Runs after validation and before ModelCheckpoint saves, so each checkpoint carries its epoch's row.
        row = {"epoch": self.current_epoch + 1, "train_loss": float(self.train_loss.compute()),
               "train_accuracy": float(self.train_accuracy.compute())}
        row.update(self._val_row or {"val_loss": float("nan"), "val_accuracy": float("nan")})
        self._val_row = {}
        self.history.append(row)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["alnet_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("alnet_history", []))

    # evaluation ---------------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(self.to_input(batch["image"]))
        prob = self.probability_all(logits)
        self._outputs.append(torch.stack([batch["index"].double(), prob.double(), batch["label"].double()], 1))

    def on_test_epoch_end(self) -> None:
        mine = torch.cat(self._outputs) if self._outputs else torch.zeros((0, 3), dtype=torch.float64,
                                                                          device=self.device)
        gathered = self.all_gather(mine)  # every rank has the same number of rows (padding included)
        rows = gathered.reshape(-1, 3).cpu().numpy()
        rows = rows[rows[:, 0] >= 0]
        index, first = np.unique(rows[:, 0].astype(np.int64), return_index=True)
        self.test_predictions = {"index": index, "prob_all": rows[first, 1], "label": rows[first, 2].astype(int)}

    def configure_optimizers(self):
        c = self.config
        trainable = [p for p in self.parameters() if p.requires_grad]  # a frozen backbone is left out
        if c.optimizer == "rmsprop":  # Keras RMSprop: rho → alpha, epsilon outside the square root as in torch
            return torch.optim.RMSprop(trainable, lr=c.lr, alpha=c.rho, eps=c.eps)
        return torch.optim.Adam(trainable, lr=c.lr, eps=c.eps)


def model_kwargs(c: RunConfig) -> dict:
    """The settings each kind of model takes from a run configuration."""
    if c.model == "alnet":
        return {"dropout": c.dropout, "input_size": c.image_size, "head": c.head, "bn_momentum": c.bn_momentum}
    return {"dropout": c.dropout, "head": c.head, "pretrained": c.pretrained, "weights": c.weights,
            "finetune": c.finetune}


def uses_cached_features(module: CellClassifier) -> bool:
    """A frozen backbone seeing un-augmented images gives the same features every epoch: compute them once."""
    c = module.config
    return getattr(module.model, "frozen", False) and not c.augment and not c.double_offline


@torch.no_grad()
def extract_features(module: CellClassifier, images: torch.Tensor, rows: np.ndarray, batch_size: int = 64,
                     progress=None) -> torch.Tensor:
    """Backbone features of `rows` (N×H×W×3 uint8) → a float tensor with one row per image of `images`
    (rows not asked for stay zero), computed in eval mode with the run's precision."""
    model = module.model.eval()
    _, precision, channels_last = resolve_precision(module.config)
    device = next(model.parameters()).device
    out = None
    for start in range(0, len(rows), batch_size):
        idx = torch.from_numpy(np.asarray(rows[start:start + batch_size], dtype=np.int64))
        x = to_float(images[idx].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            f = model.features(x).float()
        if out is None:
            out = torch.zeros((len(images), f.shape[1]), dtype=torch.float32)
        out[idx] = f.cpu()
        if progress:
            progress(min(start + batch_size, len(rows)), len(rows))
    return out


def load_module(path) -> CellClassifier:
    """A trained module from a checkpoint file, on the CPU, ready for evaluation."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; pass a .ckpt from RUN_DIR/checkpoints/<fold>/")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        hparams = checkpoint["hyper_parameters"]
        # The checkpoint holds every weight: build the model without fetching ImageNet weights first.
        module = CellClassifier({**hparams["config"], "pretrained": False}, hparams.get("seen_subjects"))
        module.load_state_dict(checkpoint["state_dict"])
        module.config.pretrained = hparams["config"].get("pretrained", True)
    except Exception as err:  # a file that is not a Lightning checkpoint of this package
        raise ValueError(f"{path}: not an alnet checkpoint ({type(err).__name__}); pass a .ckpt written by "
                         "`alnet train`") from None
    return module.eval()


# --- devices and precision -----------------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(config: RunConfig) -> tuple[str, str, bool]:
    """(accelerator, Lightning precision, channels-last) for this machine and configuration."""
    cuda = torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda")
    accelerator = "gpu" if cuda else "cpu"
    if config.precision == "32":
        return accelerator, "32-true", cuda
    if config.precision in ("16", "bf16"):
        return accelerator, f"{config.precision}-mixed", True
    if cuda:  # auto on a GPU: bf16 where the card has it, else fp16 AMP
        return accelerator, "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed", True
    if cpu_has_bf16():  # auto on a CPU with bf16 (AMX / AVX-512 BF16): autocast + channels-last
        return accelerator, "bf16-mixed", True
    return accelerator, "32-true", False


def threads_per_process(devices: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // max(1, devices))


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
