"""The paper's augmentations (§3.1) as one batched step on the training device: rotation ±15°, horizontal flip,
zoom and random contrast, with parameters drawn per sample.

Every parameter of a batch is drawn at once, on the batch's device (four `torch.rand` calls, no per-sample
Python and no host round trip), and rotation, zoom and flip become one 2×3 matrix per image: one
`affine_grid` + `grid_sample` resamples the whole batch once, corners outside the image staying black as
C-NMC's background. Contrast is a multiplicative factor, clamped to [0, 1]. The paper gives no shift, so there
is none. Randomness comes from torch's generator of the batch's device, which the training loop reseeds
before every batch: a resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .transforms import to_float, to_uint8


class BatchAugment(nn.Module):
    """Float images in [0, 1], N×3×H×W → the same shape, each sample transformed with its own parameters:
    rotation uniform in ±`rotation` degrees, zoom (scale) uniform in [1 - zoom, 1 + zoom], a horizontal flip with
    probability 1/2, contrast factor uniform in [1 - contrast, 1 + contrast]."""

    def __init__(self, rotation: float = 15.0, zoom: float = 0.1, contrast: float = 0.2):
        super().__init__()
        self.rotation, self.zoom, self.contrast = rotation, zoom, contrast

    def draw(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The parameters of n images, drawn on `device`: angle (degrees), scale, flip (bool), contrast."""
        u = torch.rand(4, n, device=device)
        return {"angle": (u[0] * 2 - 1) * self.rotation, "scale": 1 + (u[1] * 2 - 1) * self.zoom,
                "flip": u[2] < 0.5, "contrast": 1 + (u[3] * 2 - 1) * self.contrast}

    @staticmethod
    def matrices(angle: torch.Tensor, scale: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """N×2×3 sampling matrices: output point → input point, in the grid's [-1, 1] coordinates. The image is
        rotated by `angle` and enlarged by `scale` about its centre, then mirrored left-right where `flip`."""
        radians = angle * (math.pi / 180)
        cos, sin = torch.cos(radians) / scale, torch.sin(radians) / scale
        mirror = 1 - 2 * flip.to(cos.dtype)  # -1 where flipped: the output's x is read mirrored
        theta = torch.zeros(len(angle), 2, 3, device=angle.device, dtype=angle.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, sin
        theta[:, 1, 0], theta[:, 1, 1] = -sin * mirror, cos
        return theta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.draw(len(images), images.device)
        theta = self.matrices(p["angle"], p["scale"], p["flip"]).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # The contrast is written straight into the input's layout (channels-last, from the cache), so that the
        # model's input needs no copy of its own.
        out = torch.mul(out, p["contrast"].view(-1, 1, 1, 1).to(images.dtype), out=torch.empty_like(images))
        return out.clamp_(0, 1)


def make_augment(rotation: float = 15.0, zoom: float = 0.1, contrast: float = 0.2) -> nn.Module:
    return BatchAugment(rotation, zoom, contrast)


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
