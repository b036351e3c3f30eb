"""Preprocessing, in one place: what turns an image file into the tensor a model sees.

The same steps serve the training cache, `predict`, `serve`, `explain` and the metadata of an ONNX export
(docs/design.md, "Data flow"):

    file → RGB (transparent pixels become the black background; 16-bit greyscale is scaled, not clipped)
    → centre crop to a square of `crop` × the short side → resize to size×size (Pillow bilinear,
    antialiased, reducing_gap 1.0) → uint8 H×W×3 → float N×3×H×W in [0, 1] (value / 255)

Model-specific normalisation (ImageNet mean and std for the baselines) happens inside the model, so every
model takes the same [0, 1] input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

EXPECTED_SIZE = (450, 450)  # C-NMC training images; anything else is resized and noted
RESAMPLE = Image.Resampling.BILINEAR  # PIL's bilinear is antialiased when shrinking
# Shrink by an integer box filter first, then bilinear for the rest: ~1.8× faster than one bilinear pass
# over 450 → 224, within 0.13 grey levels on average on real C-NMC cells.
REDUCING_GAP = 1.0

# Greyscale modes wider than 8 bits; convert("RGB") clips them at 255 (a cell becomes a white silhouette).
WIDE_MODES = {"I;16", "I;16B", "I;16L", "I"}
FULL_16_BIT = 65535

MAX_SIZE = 4096  # the largest side a model input may ask for (a cell image is 450 px)
MAX_PIXELS = 64_000_000  # the largest picture decoded (8000×8000): about 200 MB as RGB, the most a decode holds

DESCRIPTION = ("RGB image; centre crop to a square of `crop` × the short side; resize to size×size (Pillow "
               "bilinear, reducing_gap 1.0); float32 N×3×H×W in [0, 1] (value / 255). Model-specific "
               "normalisation (ImageNet for baselines) happens inside the graph.")


@dataclass(frozen=True)
class Preprocessing:
    size: int = 224  # side of the square image the model sees
    crop: float = 1.0  # fraction of the short side kept by the centre crop (1.0: the whole square field)

    def to_json(self) -> str:
        """What an exported model carries in its metadata, so that any runtime can prepare its input."""
        return json.dumps({**asdict(self), "description": DESCRIPTION})

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        """From a model file's metadata, which may be hostile: a ValueError unless size and crop are sane."""
        try:
            data = json.loads(text)
            size, crop = int(data["size"]), float(data["crop"])
        except (ValueError, KeyError, TypeError, OverflowError) as err:  # int(inf) is an OverflowError
            raise ValueError(f"unreadable preprocessing ({type(err).__name__})") from None
        if not (32 <= size <= MAX_SIZE and 0.05 <= crop <= 1):
            raise ValueError(f"preprocessing out of range (size {size}, crop {crop})")
        return cls(size=size, crop=crop)


def _to_8_bit(image: Image.Image) -> tuple[Image.Image, str]:
    """A 16- or 32-bit greyscale image → 8-bit "L", scaled rather than clipped, with a note saying how."""
    values = np.asarray(image, dtype=np.float32)  # float32 holds every 16-bit value exactly, in half float64's memory
    # The full 16-bit range, so that an 8-bit image stored ×257 comes back pixel for pixel; a 32-bit image
    # with larger values has no fixed range, so its own maximum is the top.
    top = max(FULL_16_BIT, values.max(initial=0))
    note = "scaled from 16-bit to 8-bit" if top == FULL_16_BIT else "scaled from 32-bit to 8-bit by its maximum"
    values *= np.float32(255 / top)  # in place: an 8000×8000 picture is 256 MB as float32
    pixels = np.clip(np.rint(values, out=values), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), note


def load_image(source: Path | BinaryIO, preprocessing: Preprocessing) -> tuple[np.ndarray, list[str]]:
    """Decode one image → size×size×3 uint8, with notes on what had to be converted. Raises on unreadable files."""
    notes = []
    with Image.open(source) as image:
        if image.size[0] * image.size[1] > MAX_PIXELS:  # judged from the header, before anything is decoded
            raise ValueError(f"{image.size[0]}x{image.size[1]} pixels is over the limit of {MAX_PIXELS:,} (a C-NMC "
                             "cell image is 450x450); crop the cell out of the picture first")
        if image.size != EXPECTED_SIZE:
            notes.append(f"resized from {image.size[0]}x{image.size[1]}")
        if image.mode != "RGB":
            notes.append(f"converted from {image.mode} to RGB")
            if image.mode in WIDE_MODES:
                image, note = _to_8_bit(image)
                notes.append(note)
            if "A" in image.mode or image.mode == "P" and "transparency" in image.info:
                # Transparent pixels become the black background C-NMC cells are segmented onto.
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size)
                image.paste(rgba, mask=rgba.getchannel("A"))
            else:
                image = image.convert("RGB")
        width, height = image.size
        side = min(width, height) * preprocessing.crop
        left, top = (width - side) / 2, (height - side) / 2
        image = image.resize((preprocessing.size, preprocessing.size), RESAMPLE,
                             box=(left, top, left + side, top + side), reducing_gap=REDUCING_GAP)
        return np.asarray(image), notes


def to_float(images_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [0, 1], laid out channels-last (a view of the same memory order)."""
    return images_nhwc.permute(0, 3, 1, 2).float().div_(255)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float N×3×H×W in [0, 1] → uint8 N×H×W×3 (the inverse of `to_float`, rounded)."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def batch_to_float(pictures: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 N×H×W×3 batch (any view, e.g. a flipped one) → the float N×3×H×W model input on `device`, sent as
    uint8 (a quarter of the bytes of floats) and converted there."""
    return to_float(torch.from_numpy(np.require(pictures, requirements=["C", "W"])).to(device))


def as_batch(pixels: np.ndarray) -> torch.Tensor:
    """One uint8 H×W×3 image → a float 1×3×H×W batch in [0, 1]."""
    return to_float(torch.from_numpy(np.array(pixels))[None])  # a copy: decoded arrays may be read-only
