"""Group-relative advantages: each episode's reward against its GRPO group's mean."""

from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-6


def group_advantages(rewards: Sequence[Sequence[float]], scale: str = "group") -> list[list[float]]:
    """Per group, r - mean(group); divided by the group's std ("group", GRPO), by the std of
    every reward in the batch ("batch", as REINFORCE++ and Dr. GRPO's follow-ups suggest for
    groups of near-equal rewards) or not at all ("none", Dr. GRPO). Stds are unbiased
    (torch.std), as TRL computes them; a group of one has advantage 0."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    tensors = [torch.tensor(list(g), dtype=torch.float64) for g in rewards]
    centred = [t - t.mean() if len(t) > 1 else torch.zeros_like(t) for t in tensors]
    if scale == "group":
        centred = [c / (t.std() + EPS) if len(t) > 1 else c for c, t in zip(centred, tensors)]
    elif scale == "batch":
        everything = torch.cat(tensors) if tensors else torch.zeros(0)
        std = everything.std() if len(everything) > 1 else torch.tensor(1.0)
        centred = [c / (std + EPS) for c in centred]
    return [c.tolist() for c in centred]


def is_uniform(rewards: Sequence[float], tol: float = 1e-9) -> bool:
    """True when every member got the same reward: the group carries no learning signal."""
    return len(rewards) < 2 or max(rewards) - min(rewards) <= tol
