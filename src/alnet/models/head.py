"""The output head's meaning: two logits (HEM, ALL) → P(ALL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEADS = ("sigmoid", "softmax")


def probability_all(logits: torch.Tensor, head: str) -> torch.Tensor:
    """P(ALL) from the two outputs. For the paper's two independent sigmoids, normalise them so that
    p > 0.5 exactly when the ALL output is the larger one (Keras' argmax prediction)."""
    if head == "softmax":
        return torch.softmax(logits.float(), dim=1)[:, 1]
    # σ(b) / (σ(a) + σ(b)) = σ(log σ(b) − log σ(a)) = σ(softplus(−a) − softplus(−b)). The quotient itself is 0/0
    # (NaN) where both outputs are strongly negative: both sigmoids round to 0 (onnxruntime's sigmoid did at −23).
    # softplus exports as a stable operator, so the graph and PyTorch agree there too.
    logits = logits.float()
    return torch.sigmoid(F.softplus(-logits[:, 0]) - F.softplus(-logits[:, 1]))


def logits_for(p: torch.Tensor, head: str) -> torch.Tensor:
    """Two logits that `probability_all(·, head)` turns back into exactly `p` (a model that computes P(ALL)
    directly, such as a hybrid's classifier, answers through the same head as every other model)."""
    z = torch.logit(p.double().clamp(1e-12, 1 - 1e-12))
    # sigmoid pair: σ(z) / (σ(−z) + σ(z)) = σ(z); softmax over (−z/2, z/2) = σ(z).
    z = z if head == "sigmoid" else z / 2
    return torch.stack([-z, z], dim=1)
