"""The input gate's options, shared by `predict`, `serve` and `evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

GateOption = Annotated[Optional[Path], typer.Option(
    "--gate", help="YAML file of image-check thresholds to use instead of the defaults, as `name: value` lines "
    "(dark_level, min_background, max_background, min_object_share, max_centre_offset, saturation_level, "
    "max_saturated, min_texture; see docs/design.md, \"The input gate\"). Images the gate refuses get status "
    "`rejected`, a reason and no label.")]
NoGateOption = Annotated[bool, typer.Option(
    "--no-gate", help="Answer every image: no image check (one cell on black?) and no feature check (like the "
    "training cells?).")]


def image_check_from(gate_file: Path | None, no_gate: bool):
    """The image check's thresholds (None when the gate is off)."""
    from ..trust.image_check import ImageCheck, read_image_check

    if no_gate:
        return None
    return read_image_check(gate_file) if gate_file is not None else ImageCheck()
