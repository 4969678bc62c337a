"""The learning-rate schedule: linear warmup, then cosine, linear or constant.

    factor(step) = (step + 1) / (warmup + 1)                        step < warmup
                 = 0.5 (1 + cos(pi p)) | 1 - p | 1,  p = (step - warmup) / (total - warmup)   after

`step` is the number of optimizer steps done, so factor(0) is the first update's. transformers'
`get_scheduler` warms up as step / warmup, which gives the first update lr = 0: with the default
4 warmup steps, step 1 trained nothing. Here the first update gets lr / (warmup + 1) and the
full rate is reached at step `warmup`, where the decay starts (identical to transformers' from there).
"""

from __future__ import annotations

import math

import torch

SCHEDULERS = ("cosine", "linear", "constant")


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """The multiple of the base learning rate for the update after `step` optimizer steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    if kind not in SCHEDULERS:
        raise ValueError(f"lr_scheduler={kind!r}; choose one of {', '.join(SCHEDULERS)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, kind, warmup, total))


__all__ = ["SCHEDULERS", "lr_factor", "lr_scheduler"]
