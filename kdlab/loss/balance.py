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

    def __call__(self, terms: dict[str, torch.Tensor], reduce=None) -> dict[str, torch.Tensor]:
        """{name: scalar term} -> {name: term / EMA(|term|)}; the EMA sees detached values only.

        `reduce` (in-place sum over processes) turns each process's partial term into the whole
        batch's magnitude under DDP, so every process divides by the same mean.
        """
        names = list(terms)
        mags = torch.stack([terms[k].detach().abs().float() for k in names])
        if reduce is not None:
            reduce(mags)
        out = {}
        for name, mag in zip(names, mags):
            prev = self.ema.get(name)
            # the first value initialises the mean: no warm-up bias towards 0. A non-finite value
            # (a step the trainer will skip) must not poison the mean for the rest of the run.
            new = mag if prev is None else self.momentum * prev + (1 - self.momentum) * mag
            self.ema[name] = new if prev is None else torch.where(torch.isfinite(mag), new, prev)
            out[name] = terms[name] / self.ema[name].clamp_min(self.eps)
        return out

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "ema": {k: v.detach().cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.momentum = state["momentum"]
        self.ema = {k: v.to(device) for k, v in state["ema"].items()}


__all__ = ["AdaptiveBalancer"]
