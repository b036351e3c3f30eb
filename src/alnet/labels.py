"""The two classes, the decision rule and the three statuses of an answer, in one place. ALL (leukemic blast) is
the positive class.

A cell is called ALL when P(ALL) > THRESHOLD; everything that prints, plots or scores a call uses this rule.
"""

from __future__ import annotations

from enum import Enum

ALL, HEM = 1, 0
NAMES = {ALL: "ALL", HEM: "HEM"}
THRESHOLD = 0.5


def is_all(probability_all):
    """The call for a probability (a float or an array of them): True where the cell is called ALL."""
    return probability_all > THRESHOLD


def name_of(probability_all: float) -> str:
    """"ALL" or "HEM" for one probability."""
    return NAMES[ALL] if is_all(probability_all) else NAMES[HEM]


def label_of(value) -> int | None:
    """A class as written in a file (`ALL`/`HEM`, or `1`/`0` as files of earlier versions have it) → 1 or 0;
    None for an empty cell (no label known)."""
    text = str(value).strip().upper()
    if text in ("", "NONE"):
        return None
    for number, name in NAMES.items():
        if text in (name, str(number)):
            return number
    raise ValueError(f"{value!r} is not a class (ALL, HEM, 1 or 0)")


class Status(str, Enum):
    """What became of a picture (`alnet.pipeline.Pipeline.answer` decides it; every file and message uses these
    words). `ok`: answered; `review`: answered, but too close to call or unstable under flips, so a person should
    look; `rejected`: the input gate refused it (not one cell on black, or unlike the training cells): no answer."""

    OK = "ok"
    REVIEW = "review"
    REJECTED = "rejected"

    def __str__(self) -> str:
        return self.value
