"""Batched augmentation on the training device, with random parameters drawn per sample (kornia).

The paper's augmentations (§3.1): rotation ±15°, horizontal flip, zoom and random contrast. Rotation and zoom
are one affine warp, so each image is resampled once. Randomness comes from torch's global generator, which
the training loop reseeds before every batch: a resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import kornia.augmentation as K
import numpy as np
import torch
from torch import nn

from .transforms import to_float, to_uint8


def make_augment(rotation: float = 15.0, zoom: float = 0.1, contrast: float = 0.2) -> nn.Module:
    """Float images in [0, 1], N×3×H×W → the same shape, each sample transformed with its own parameters."""
    return K.AugmentationSequential(
        K.RandomAffine(degrees=rotation, scale=(1 - zoom, 1 + zoom), p=1.0),  # empty corners stay black
        K.RandomHorizontalFlip(p=0.5),
        K.RandomContrast(contrast=(1 - contrast, 1 + contrast), p=1.0),
    )


@torch.no_grad()
def augmented_copies(images: np.ndarray, augment: nn.Module, seed: int, chunk: int = 256) -> np.ndarray:
    """One augmented copy of each uint8 N×H×W×3 image (the paper's offline doubling), reproducible by seed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = np.empty_like(images)
        for start in range(0, len(images), chunk):
            batch = to_float(torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])))
            out[start:start + chunk] = to_uint8(augment(batch)).numpy()
        return out
    finally:
        torch.random.set_rng_state(generator_state)
