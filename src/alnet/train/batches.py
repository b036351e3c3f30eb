"""Batches for training and testing, gathered whole from the in-memory uint8 cache (a Lightning data module).

No decoding and no per-image Python work inside the epoch loop: a batch is one indexing operation on the uint8
array (on the GPU when there is one); the module turns it into floats and augments it on the device
(docs/design.md, "Speed by design"). Under DDP each rank reads its own shard of every epoch's order.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import RunConfig
from ..data.augment import augmented_copies, make_augment
from ..data.cache import Prepared

PADDING = -1  # row index of filler samples that keep every rank's batch count equal under DDP


def tensors(prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole cache in memory as one uint8 tensor, and the labels (-1 where unknown).

    A read-only memory map is read into memory on first use and kept on `prepared`, so the runs of a
    comparison or a search share one copy instead of reading the cache again each time."""
    if not prepared.images.flags.writeable:
        prepared.images = np.array(prepared.images)
    images = torch.from_numpy(prepared.images)
    labels = torch.tensor([c.label if c.label is not None else -1 for c in prepared.cells], dtype=torch.long)
    return images, labels


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
