"""The GAN's two networks and the augmentation of the discriminator's inputs (docs/design.md, "Generated cells").

A DCGAN-shaped, class-conditional pair that is known to train on a few thousand images:

- `Generator`: noise z and the class (ALL / HEM) → a square RGB cell in [-1, 1]. The class enters as a learned
  embedding beside z; upsampling by nearest neighbour + 3×3 convolution (no checkerboard of transposed
  convolutions), BatchNorm and ReLU, tanh at the end.
- `Discriminator`: spectral normalisation on every layer (Miyato et al. 2018) keeps it 1-Lipschitz enough that a
  small set does not let it win outright; the class enters by projection (Miyato & Koyama 2018).
- `diff_augment`: differentiable augmentation (Zhao et al. 2020, "DiffAugment") of every image the discriminator
  sees, real and generated alike: colour, translation (the border fills with black, as C-NMC's background), and
  cutout. With a few thousand cells a discriminator otherwise memorises the training set within a few epochs.

Resolutions: 64, 128 and 224 pixels (a 4×4 or 7×7 start doubled 4 or 5 times).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

RESOLUTIONS = {64: (4, 4), 128: (4, 5), 224: (7, 5)}  # side → (start side, doublings)
CLASSES = 2  # HEM 0, ALL 1 (alnet.labels)
# Generator and discriminator together; width 64 at 224 px has about 35 M. A record asking for more is refused before
# anything is allocated (a few bytes of JSON must not make alnet build a network of gigabytes).
MAX_PARAMETERS = 200_000_000


def _channels(width: int, doublings: int) -> list[int]:
    """Channels from the smallest map to the largest: width·8 at most, halving towards the image, width at least."""
    return [width * min(8, 2 ** (doublings - i)) for i in range(doublings + 1)]


class Generator(nn.Module):
    def __init__(self, resolution: int = 64, width: int = 32, z_dim: int = 128):
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, not {resolution}")
        self.resolution, self.z_dim = resolution, z_dim
        self.start, doublings = RESOLUTIONS[resolution]
        channels = _channels(width, doublings)
        self.class_embedding = nn.Embedding(CLASSES, z_dim)
        self.project = nn.Sequential(nn.Linear(2 * z_dim, channels[0] * self.start ** 2, bias=False),
                                     nn.Unflatten(1, (channels[0], self.start, self.start)),
                                     nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.upsample = nn.Sequential(*(nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)) for c_in, c_out in zip(channels, channels[1:])))
        self.to_rgb = nn.Sequential(nn.Conv2d(channels[-1], 3, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.class_embedding(labels)], dim=1))
        return self.to_rgb(self.upsample(h))


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 64, width: int = 32):
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, not {resolution}")
        _, doublings = RESOLUTIONS[resolution]
        channels = _channels(width, doublings)[::-1]  # from the image towards the smallest map
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(3, channels[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.score = spectral_norm(nn.Linear(channels[-1], 1))
        self.class_projection = spectral_norm(nn.Embedding(CLASSES, channels[-1]))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(images).sum(dim=(2, 3))  # sum pooling, as in the projection discriminator
        return self.score(h).squeeze(1) + (self.class_projection(labels) * h).sum(dim=1)


def diff_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Colour, translation (up to 1/8 of the side, black fill) and cutout (a black square of half the side) per
    image, differentiable in the images. Images in [-1, 1], N×3×H×W."""
    n, _, height, width = images.shape
    device, dtype = images.device, images.dtype

    def uniform(*shape):
        return torch.rand(*shape, device=device, dtype=dtype, generator=generator)

    x = images + (uniform(n, 1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (uniform(n, 1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (uniform(n, 1, 1, 1) + 0.5) + mean  # contrast
    # Translation and cutout as one resampling grid and one mask; black (-1) where the image is not.
    shift = (uniform(n, 2) - 0.5) * 0.25 * 2  # in [-1/8, 1/8] of the side, in grid units (side = 2)
    theta = torch.zeros(n, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype).view(1, height, 1)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype).view(1, 1, width)
    centre = uniform(n, 2) * 2 - 1
    inside = ((ys - centre[:, 0].view(n, 1, 1)).abs() < 0.5) & ((xs - centre[:, 1].view(n, 1, 1)).abs() < 0.5)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, -1), x)


def parameter_count(resolution: int, width: int, z_dim: int) -> int:
    """Parameters of the generator and discriminator of these settings, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for net in (Generator(resolution, width, z_dim), Discriminator(resolution, width))
                   for p in net.parameters())
