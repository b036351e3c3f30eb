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


def make_augment(rotation: float = 15.0, zoom: float = 0.1, contrast: float = 0.2) -> nn.Module:
    """Float images in [0, 1], N×3×H×W → the same shape, each sample transformed with its own parameters."""
    return K.AugmentationSequential(
        K.RandomAffine(degrees=rotation, scale=(1 - zoom, 1 + zoom), p=1.0),  # empty corners stay black
        K.RandomHorizontalFlip(p=0.5),
        K.RandomContrast(contrast=(1 - contrast, 1 + contrast), p=1.0),
    )


def to_float(images_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [0, 1], laid out channels-last (a view of the same memory order)."""
    return images_nhwc.permute(0, 3, 1, 2).float().div_(255)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float N×3×H×W in [0, 1] → uint8 N×H×W×3."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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
