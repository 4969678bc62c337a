"""Adaptive balancing (opt-in): each term divided by a running mean of its own magnitude.

After it, every term is of order 1 whatever its units, so the configured weights act as
importance ratios. The running means are part of the trainer's checkpoint.
"""

from __future__ import annotations

import torch


class AdaptiveBalancer:
    def __init__(self, momentum: float = 0.99, eps: float = 1e-8):
        self.momentum, self.eps = momentum, eps
        self.ema: dict[str, torch.Tensor] = {}

    def __call__(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: scalar term} -> {name: term / EMA(|term|)}; the EMA sees detached values only."""
        out = {}
        for name, value in terms.items():
            mag = value.detach().abs().float()
            prev = self.ema.get(name)
            # the first value initialises the mean: no warm-up bias towards 0
            self.ema[name] = mag if prev is None else self.momentum * prev + (1 - self.momentum) * mag
            out[name] = value / self.ema[name].clamp_min(self.eps)
        return out

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "ema": {k: v.detach().cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.momentum = state["momentum"]
        self.ema = {k: v.to(device) for k, v in state["ema"].items()}


__all__ = ["AdaptiveBalancer"]
