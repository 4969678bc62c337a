"""Loss-weight curriculum: each term's weight as a pure function of the optimizer step.

In the manner of torch's LR schedulers, but for loss weights. Each term has a declarative ramp

    w_k(step) = max_k * r(clip((step / S - start_k) / (end_k - start_k), 0, 1))

with S the run's optimizer steps and r(x) = x (linear) or (1 - cos(pi x)) / 2 (cosine); a ramp
with start == end is a hard switch at `start`. The weight used for the update that takes the
run from `step` to `step + 1` is `weights_at(step)`, so a resumed run gets the same weights.

The default preset, "original", is the table of the original write-up (FIXES_IMPLEMENTED.md, fix 4):

>>> c = CurriculumScheduler.from_preset("original", total_steps=100)
>>> for p in (0, 20, 30, 50, 80, 100):
...     w = c.weights_at(p)
...     print(p, " ".join(f"{w[k]:.3f}" for k in ("kd", "feature", "attention", "layerwise", "contrastive")))
0 1.000 0.000 0.000 0.000 0.000
20 1.000 0.333 0.333 0.000 0.000
30 1.000 0.667 0.667 0.000 0.000
50 1.000 1.000 1.000 0.333 0.000
80 1.000 1.000 1.000 1.000 0.333
100 1.000 1.000 1.000 1.000 1.000

The write-up's docstring claims "at 50% progress, feature/attention are at ~83%"; its own table
(and this code) give 100% at 50%: the docstring was wrong, the table is the schedule.

"original-phases" is the original framework's *earlier* schedule as far as the write-up describes it (feature
weight 0 at 10% and 30%, 6.7% at 50%, 100% at 70%): a cosine ramp from 46% to 70% passes through
those points (0.067 at 50%). The write-up gives no points for the later terms; they follow in the
same late style (layerwise 70-85%, contrastive 85-100%). "constant" switches every term on at step 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from kdlab.errors import KDLabError
from kdlab.loss.terms import TERMS

SHAPES = ("linear", "cosine")


@dataclass(frozen=True)
class Ramp:
    start: float = 0.0  # fraction of training at which the weight leaves 0
    end: float = 0.0  # fraction at which it reaches max_weight (start == end: a hard switch)
    max_weight: float = 1.0
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise KDLabError(f"ramp start={self.start}, end={self.end}: need 0 <= start <= end <= 1")
        if self.shape not in SHAPES:
            raise KDLabError(f"ramp shape={self.shape!r} is not allowed; choose one of {', '.join(SHAPES)}")
        if not (math.isfinite(self.max_weight) and self.max_weight >= 0):
            raise KDLabError(f"ramp max_weight={self.max_weight} must be >= 0")

    def factor(self, progress: float) -> float:
        """The fraction of max_weight at `progress` (fraction of training done), in [0, 1]."""
        if self.end == self.start:
            return 1.0 if progress >= self.start else 0.0
        x = min(max((progress - self.start) / (self.end - self.start), 0.0), 1.0)
        return x if self.shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * x))


PRESETS: dict[str, dict[str, Ramp]] = {
    "constant": {},
    "original": {
        "feature": Ramp(0.1, 0.4),
        "attention": Ramp(0.1, 0.4),
        "layerwise": Ramp(0.4, 0.7),
        "contrastive": Ramp(0.7, 1.0),
    },
    "original-phases": {
        "feature": Ramp(0.46, 0.7, shape="cosine"),
        "attention": Ramp(0.46, 0.7, shape="cosine"),
        "layerwise": Ramp(0.7, 0.85, shape="cosine"),
        "contrastive": Ramp(0.85, 1.0, shape="cosine"),
    },
}


def parse_ramps(spec: dict[str, Any]) -> dict[str, Ramp]:
    """YAML `ramps: {feature: {start: 0.1, end: 0.4, shape: cosine}}` -> {name: Ramp} (max_weight comes
    from the term's configured weight)."""
    if not isinstance(spec, dict):
        raise KDLabError(f"ramps={spec!r} must be a mapping of term -> {{start, end, shape}}")
    out = {}
    for name, fields in spec.items():
        if name not in TERMS:  # the registered terms (kdlab.loss.terms), built-in or registered by the user
            raise KDLabError(f"ramps: unknown term {name!r}; choose from {', '.join(TERMS)}")
        if not isinstance(fields, dict):
            raise KDLabError(f"ramps.{name}={fields!r} must be a mapping with start, end and shape")
        unknown = sorted(set(fields) - {"start", "end", "shape"})
        if unknown:
            raise KDLabError(f"ramps.{name}: unknown key(s) {', '.join(unknown)}; allowed: start, end, shape")
        try:
            out[name] = Ramp(
                float(fields.get("start", 0.0)), float(fields.get("end", 0.0)), shape=str(fields.get("shape", "linear"))
            )
        except KDLabError as e:  # (a ValueError too: caught first)
            raise KDLabError(f"ramps.{name}: {e}") from None
        except (TypeError, ValueError):
            raise KDLabError(f"ramps.{name}={fields!r}: start and end must be numbers") from None
    return out


class CurriculumScheduler:
    """Per-term loss weights over `total_steps` optimizer steps.

    `max_weights` are the configured weights ({"kd": alpha, "lm": 1 - alpha, "feature": w, ...});
    terms without a ramp keep their maximum from step 0.
    """

    def __init__(self, total_steps: int, max_weights: dict[str, float], ramps: dict[str, Ramp] | None = None):
        if total_steps < 1:
            raise KDLabError(f"total_steps={total_steps} must be >= 1")
        self.total_steps = total_steps
        self.ramps = {
            name: Ramp(r.start, r.end, max_weights.get(name, r.max_weight), r.shape)
            for name, r in (ramps or {}).items()
        }
        self.max_weights = dict(max_weights)
        self.last_step = 0

    @classmethod
    def from_preset(
        cls,
        name: str,
        total_steps: int,
        max_weights: dict[str, float] | None = None,
        overrides: dict[str, Ramp] | None = None,
    ) -> CurriculumScheduler:
        if name not in PRESETS:
            raise KDLabError(f"curriculum={name!r} is not allowed; choose one of {', '.join(PRESETS)}")
        # no weights given (a look at the preset's table): kd and every term the preset ramps, at 1
        weights = max_weights if max_weights is not None else dict.fromkeys(("kd", *PRESETS[name]), 1.0)
        return cls(total_steps, weights, {**PRESETS[name], **(overrides or {})})

    def weights_at(self, step: int) -> dict[str, float]:
        """The weight of each term for the update after `step` optimizer steps (a pure function)."""
        progress = step / self.total_steps
        return {
            name: (w if name not in self.ramps else w * self.ramps[name].factor(progress))
            for name, w in self.max_weights.items()
        }

    def last_ramp_end(self) -> int:
        """The first step at which every active term has reached its full weight."""
        ends = [r.end for name, r in self.ramps.items() if self.max_weights.get(name, 0.0) > 0]
        return math.ceil(max(ends, default=0.0) * self.total_steps)

    # torch-scheduler style use: weights = sched.get_weights(); ...; optimizer.step(); sched.step()
    def get_weights(self) -> dict[str, float]:
        return self.weights_at(self.last_step)

    def step(self) -> None:
        self.last_step += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps,
            "last_step": self.last_step,
            "max_weights": self.max_weights,
            "ramps": {k: asdict(r) for k, r in self.ramps.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("total_steps", "max_weights", "ramps"):
            if state[key] != mine[key]:
                raise KDLabError(f"curriculum state does not match this run's ({key}: {state[key]} vs {mine[key]})")
        self.last_step = state["last_step"]


__all__ = ["Ramp", "CurriculumScheduler", "PRESETS", "parse_ramps"]
