"""The image check of the input gate: is this picture one segmented cell, centred, on a black background, as
every C-NMC image is? A pure function of the decoded image (uint8 H×W×3, after the model's preprocessing); no
model involved. The thresholds are `ImageCheck`'s fields, derived from the real cells with a margin
(docs/design.md, "The input gate", lists the ranges measured on them) and overridable from a YAML file.
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # pixels touching by a corner belong to one object
MAX_GATE_FILE = 64 * 2**10  # bytes of a --gate YAML file
GRID = 64  # the check looks at a GRID×GRID box-filtered copy: fast, and blind to single-pixel specks


class GateError(ValueError):
    """Gate settings that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ImageCheck:
    """Thresholds of the image check. Measured on the 52 real C-NMC cells of tests/data (at 136 and 224 px):
    background 75.0–90.5 % of the image, one object holding all of the foreground, its centre at most 0.04 of a
    side from the image centre, no saturated pixel; on synthetic cells (`alnet synth`) background 75.5–95.7 %,
    centre at most 0.09 of a side. Each threshold leaves a margin around both."""

    dark_level: int = 24  # a pixel whose brightest channel is at most this is background (real cells: exactly 0)
    min_background: float = 0.55  # share of near-black pixels: less is not a cell on black
    max_background: float = 0.985  # more is a blank (or nearly blank) image
    min_object_share: float = 0.9  # the largest object's share of the foreground: less is several objects
    max_centre_offset: float = 0.2  # distance of the object's centre from the image centre, in sides
    saturation_level: int = 250  # a pixel whose every channel is at least this is saturated
    max_saturated: float = 0.01  # share of saturated pixels allowed
    # Local contrast inside the object (mean |pixel − its 3×3 mean| over its mean brightness): a stained cell has
    # texture (real cells 0.023–0.050, synthetic 0.059–0.135); a smooth blob or gradient has almost none (≤ 0.009).
    min_texture: float = 0.012

    def validate(self, source: str = "gate settings") -> "ImageCheck":
        for name in ("dark_level", "saturation_level"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255):
                raise GateError(f"{source}: {name} must be a whole number from 0 to 255, not {_short(value)}")
        for name in ("min_background", "max_background", "min_object_share", "max_centre_offset", "max_saturated",
                     "min_texture"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
                raise GateError(f"{source}: {name} must be a number from 0 to 1, not {_short(value)}")
        if self.min_background >= self.max_background:
            raise GateError(f"{source}: min_background must be below max_background")
        return self


_SHORT = reprlib.Repr()  # Python 3.11's takes no arguments
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 3, 3, 30, 30


def _short(value) -> str:
    """At most 40 characters of a value from a file, however large it is (YAML aliases nest a value thousands of
    times in a few hundred bytes, so a full repr() is never made)."""
    try:
        text = _SHORT.repr(value)
    except ValueError:  # an int too long to print
        return "a number of thousands of digits"
    return text if len(text) <= 40 else text[:37] + "..."


def read_image_check(path: Path | str) -> ImageCheck:
    """Thresholds from a YAML file of `name: value` lines (any subset of ImageCheck's fields), read safely."""
    import yaml

    path = Path(path)
    if not path.is_file():  # a pipe would block, a device never end
        raise GateError(f"{path}: not a regular file; pass a YAML file of `name: value` lines")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_GATE_FILE + 1)
        if len(raw) > MAX_GATE_FILE:
            raise GateError(f"{path}: over 64 KiB; a gate settings file holds a few `name: value` lines")
        data = yaml.safe_load(raw.decode("utf-8"))
    except GateError:
        raise
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as err:  # ValueError: an int of 5,000 digits
        raise GateError(f"{path}: cannot read gate settings ({type(err).__name__}); pass a YAML file of "
                        "`name: value` lines") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GateError(f"{path}: gate settings must be `name: value` lines, not a {type(data).__name__}")
    known = {f.name for f in fields(ImageCheck)}
    unknown = [_short(k) for k in data if k not in known]
    if unknown:
        raise GateError(f"{path}: unknown gate setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return ImageCheck(**data).validate(str(path))


def measure(pixels: np.ndarray, check: ImageCheck = ImageCheck()) -> dict:
    """What the check looks at, for a uint8 H×W×3 image."""
    pixels = np.asarray(pixels)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).resize(
        (GRID, GRID), Image.Resampling.BOX))
    brightest = small.max(axis=2)
    foreground = brightest > check.dark_level
    labels, count = ndimage.label(foreground, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    largest = labels == int(np.argmax(sizes)) + 1 if count else np.zeros_like(foreground)
    stats = {"background": float(1 - foreground.mean()),
             "saturated": float((pixels.min(axis=2) >= check.saturation_level).mean()),
             "objects": int(count), "object_share": float(sizes.max() / sizes.sum()) if count else 0.0,
             "centre_offset": float("nan")}
    if count:
        rows, cols = np.nonzero(largest)
        centre = (GRID - 1) / 2
        stats["centre_offset"] = float(np.hypot(rows.mean() - centre, cols.mean() - centre) / GRID)
    stats["texture"] = _texture(brightest.astype(np.float64), largest)
    return stats


def _texture(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean |value − its 3×3 mean| over the mask's inner pixels (all four neighbours inside), relative to their
    mean value; 0 for an object without inner pixels."""
    height, width = values.shape
    padded = np.pad(values, 1, mode="edge")
    local_mean = sum(padded[i:i + height, j:j + width] for i in range(3) for j in range(3)) / 9
    m = np.pad(mask, 1)
    inner = mask & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    if not inner.any() or values[inner].mean() == 0:
        return 0.0
    return float(np.abs(values - local_mean)[inner].mean() / values[inner].mean())


def image_reason(pixels: np.ndarray, check: ImageCheck = ImageCheck()) -> str | None:
    """None for a picture that looks like one C-NMC cell; otherwise why it does not, in words."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 or 0 in pixels.shape:
        return "not an RGB image"
    stats = measure(pixels, check)
    background = stats["background"]
    if background > check.max_background:
        return (f"blank: {background:.0%} of the image is black (a C-NMC cell image shows one cell, "
                f"at most {check.max_background:.1%} black)")
    if stats["saturated"] > check.max_saturated:
        return (f"saturated: {stats['saturated']:.0%} of the pixels are white (at most {check.max_saturated:.0%} "
                "in a cell image)")
    if background < check.min_background:
        return (f"not a cell on a black background: only {background:.0%} of the image is near-black (a C-NMC "
                f"cell image is at least {check.min_background:.0%} black)")
    if stats["object_share"] < check.min_object_share:
        return (f"not one cell: the largest of {stats['objects']} objects holds only {stats['object_share']:.0%} "
                f"of what is not background (at least {check.min_object_share:.0%} for one cell)")
    if stats["centre_offset"] > check.max_centre_offset:
        return (f"off centre: the object lies {stats['centre_offset']:.2f} of a side from the centre (a segmented "
                f"cell is centred, at most {check.max_centre_offset:.2f})")
    if stats["texture"] < check.min_texture:
        return (f"smooth: the object has almost no texture (local contrast {stats['texture']:.3f}; a stained cell "
                f"at least {check.min_texture:.3f})")
    return None


def settings_dict(check: ImageCheck) -> dict:
    return asdict(check)
