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


def logits_for(p: torch.Tensor, head: str) -> torch.Tensor:
    """Two logits that `probability_all(·, head)` turns back into exactly `p` (a model that computes P(ALL)
    directly, such as a hybrid's classifier, answers through the same head as every other model)."""
    z = torch.logit(p.double().clamp(1e-12, 1 - 1e-12))
    # sigmoid pair: σ(z) / (σ(−z) + σ(z)) = σ(z); softmax over (−z/2, z/2) = σ(z).
    z = z if head == "sigmoid" else z / 2
    return torch.stack([-z, z], dim=1)
