"""The output head's meaning: two logits (HEM, ALL) → P(ALL)."""

from __future__ import annotations

import torch

HEADS = ("sigmoid", "softmax")


def probability_all(logits: torch.Tensor, head: str) -> torch.Tensor:
    """P(ALL) from the two outputs. For the paper's two independent sigmoids, normalise them so that
    p > 0.5 exactly when the ALL output is the larger one (Keras' argmax prediction)."""
    if head == "softmax":
        return torch.softmax(logits.float(), dim=1)[:, 1]
    s = torch.sigmoid(logits.float())
    return s[:, 1] / (s[:, 0] + s[:, 1])
