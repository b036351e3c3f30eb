"""Pictures that are not one segmented cell on black, for the input gate's tests and its measured rejection
rates: noise, smooth gradients, rendered text, a white image, 1×1 images, a run's own chart PNGs, and real cells
pasted on a white or mid-grey background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIDE = 450  # the size of a C-NMC image


def _save(image: Image.Image, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    image.save(path)
    return path


def _noise(rng) -> list[tuple[str, Image.Image]]:
    out = []
    for i in range(3):
        out.append((f"noise-uniform-{i}", Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))))
    for i in range(2):  # dim noise, mostly dark: as black as a cell image's background on average
        out.append((f"noise-dim-{i}", Image.fromarray(rng.integers(0, 80, (SIDE, SIDE, 3), dtype=np.uint8))))
    grey = np.clip(rng.normal(128, 40, (SIDE, SIDE)), 0, 255).astype(np.uint8)
    out.append(("noise-gaussian-grey", Image.fromarray(grey).convert("RGB")))
    return out


def _gradients() -> list[tuple[str, Image.Image]]:
    ramp = np.linspace(0, 1, SIDE)
    y, x = np.meshgrid(ramp, ramp, indexing="ij")
    radius = np.hypot(y - 0.5, x - 0.5)
    fields = {
        "gradient-horizontal": x, "gradient-vertical": y[::-1], "gradient-diagonal": (x + y) / 2,
        "gradient-radial": 1 - radius / radius.max(),  # bright centre, dark corners
        "gradient-radial-blob": np.clip(1 - radius / 0.25, 0, 1),  # a bright disc fading to black: cell-sized
    }
    out = []
    for name, field in fields.items():
        colour = np.stack([field * 200, field * 120, field * 230], axis=2)  # stain-like purple
        out.append((name, Image.fromarray(colour.astype(np.uint8))))
    return out


def _text() -> list[tuple[str, Image.Image]]:
    font = ImageFont.load_default(size=36)
    lines = ["Acute lymphoblastic", "leukemia: ALL or HEM?", "C-NMC 2019", "not a cell image"]
    out = []
    for name, background, ink in (("text-black-on-white", "white", "black"), ("text-white-on-black", "black", "white"),
                                  ("text-purple-on-black", "black", (180, 90, 200))):
        image = Image.new("RGB", (SIDE, SIDE), background)
        draw = ImageDraw.Draw(image)
        for i, line in enumerate(lines):
            draw.text((20, 60 + 80 * i), line, fill=ink, font=font)
        out.append((name, image))
    return out


def _plain() -> list[tuple[str, Image.Image]]:
    return [("white", Image.new("RGB", (SIDE, SIDE), "white")),
            ("one-pixel-white", Image.new("RGB", (1, 1), "white")),
            ("one-pixel-black", Image.new("RGB", (1, 1), "black")),
            ("one-pixel-purple", Image.new("RGB", (1, 1), (120, 60, 140)))]


def _pasted(cells: list[Path]) -> list[tuple[str, Image.Image]]:
    out = []
    for cell in cells:
        with Image.open(cell) as image:
            rgb = image.convert("RGB")
        mask = Image.fromarray(((np.asarray(rgb).max(axis=2) > 0) * 255).astype(np.uint8))
        for name, colour in (("white", (255, 255, 255)), ("grey", (128, 128, 128))):
            background = Image.new("RGB", rgb.size, colour)
            background.paste(rgb, mask=mask)
            out.append((f"pasted-on-{name}-{cell.stem}", background))
    return out


def write_non_cells(folder: Path, cells: list[Path], charts: list[Path], seed: int = 0) -> list[tuple[str, Path]]:
    """(kind, file) for every generated non-cell, written as PNGs into `folder`; `charts`: PNG figures to
    include as they are; `cells`: real cells to paste on white and grey."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made = _noise(rng) + _gradients() + _text() + _plain() + _pasted(cells)
    out = [(name.split("-")[0] if not name.startswith("one-pixel") else "one-pixel", _save(image, folder, name))
           for name, image in made]
    out = [("pasted", path) if kind == "pasted" else (kind, path) for kind, path in out]
    return out + [("chart", chart) for chart in charts]
