"""The two classes and the decision rule, in one place. ALL (leukemic blast) is the positive class.

A cell is called ALL when P(ALL) > THRESHOLD; everything that prints, plots or scores a call uses this rule.
"""

from __future__ import annotations

ALL, HEM = 1, 0
NAMES = {ALL: "ALL", HEM: "HEM"}
THRESHOLD = 0.5


def is_all(probability_all):
    """The call for a probability (a float or an array of them): True where the cell is called ALL."""
    return probability_all > THRESHOLD


def name_of(probability_all: float) -> str:
    """"ALL" or "HEM" for one probability."""
    return NAMES[ALL] if is_all(probability_all) else NAMES[HEM]
