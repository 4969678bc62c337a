"""Early stopping on a fixed-definition validation metric, as a trainer callback.

The original framework monitored the curriculum-weighted total loss. That total changes definition whenever a
weight ramps, so it rises by design at 10%, 40% and 70% of training and "no improvement" is
guaranteed at every ramp. This callback watches validation KL(teacher || student) at T = 1 (or
the student's validation cross-entropy): metrics whose definition never changes.

Semantics (as Lightning's EarlyStopping; patience counts *evaluations*, not steps):
    improvement   mode="min": metric < ref - min_delta  (mode="max": metric > ref + min_delta), where
                  ref is the last value that counted as an improvement
    best          the best value seen, however small the margin: the weights restored at the end
                  (Keras restores the last *min_delta* improvement, which can be worse than the final
                  weights; restoring those would throw away training)
    patience      stop when `patience` evaluations in a row brought no improvement
    warmup        evaluations before `warmup_steps` update the best value but never count against
                  patience (by default: the LR warmup. Not the curriculum's ramps: validation KL keeps
                  one definition while the weights ramp, and waiting for the last ramp to end, the
                  earlier default, meant never stopping under the write-up's curriculum, whose last
                  ramp ends with the run; measured in notebooks/06_early_stopping.ipynb)
    non-finite    a nan/inf metric stops the run at once
    abort         a metric worse than `abort_threshold` stops the run at once (a run that diverged)
    restore       kdlab.training.best_weights.BestWeights keeps the best weights and reloads them at the end (the
                  trainer adds it beside this callback when restore_best is on)

It owns its settings and state, stops through `trainer.state.should_stop`, and checkpoints
through state_dict()/load_state_dict().
"""

from __future__ import annotations

import math
from typing import Any

from kdlab.errors import KDLabError
from kdlab.training.callbacks import Callback

METRICS = {"val_kl": "kl", "val_ce": "student_ce"}  # name in the config -> key of an eval record
MODES = ("min", "max")


class EarlyStopping(Callback):
    def __init__(
        self,
        monitor: str = "val_kl",
        patience: int = 20,
        min_delta: float = 0.001,
        mode: str = "min",
        warmup_steps: int = 0,
        abort_threshold: float | None = None,
    ):
        if monitor not in METRICS:
            raise KDLabError(f"early-stopping monitor={monitor!r} is not allowed; choose one of {', '.join(METRICS)}")
        if mode not in MODES:
            raise KDLabError(f"early-stopping mode={mode!r} is not allowed; choose one of {', '.join(MODES)}")
        if patience < 1:
            raise KDLabError(f"early-stopping patience={patience} must be >= 1")
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise KDLabError(f"early-stopping min_delta={min_delta} must be >= 0")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.warmup_steps, self.abort_threshold = warmup_steps, abort_threshold
        self.ref: float | None = None  # patience measures improvements against this value
        self.best: float | None = None  # the best value seen, and its step
        self.best_step: int | None = None
        self.wait = 0  # evaluations since the last improvement (after warmup)
        self.stopped_step: int | None = None
        self.reason = ""
        self.fault = False  # stopped by a non-finite or diverging metric, not by patience

    # ------------------------------------------------------------------ the rule, testable alone
    def _better(self, value: float, than: float | None, margin: float) -> bool:
        if than is None:
            return True
        return value < than - margin if self.mode == "min" else value > than + margin

    def update(self, step: int, value: float) -> str:
        """Feed one evaluation; returns "improved" (a new best), "wait" or "stop" (reason in self.reason)."""
        if not math.isfinite(value):
            return self._stop(step, f"{self.monitor} is {value} at step {step} (non-finite)", fault=True)
        if self.abort_threshold is not None:
            worse = value > self.abort_threshold if self.mode == "min" else value < self.abort_threshold
            if worse:
                return self._stop(
                    step,
                    f"{self.monitor}={value:.4f} at step {step} passed the abort threshold {self.abort_threshold}",
                    fault=True,
                )
        new_best = self._better(value, self.best, 0.0)
        if new_best:
            self.best, self.best_step = value, step
        if self._better(value, self.ref, self.min_delta):
            self.ref, self.wait = value, 0
        elif step >= self.warmup_steps:
            self.wait += 1
        if self.wait >= self.patience:
            return self._stop(
                step,
                f"{self.monitor} did not improve by more than {self.min_delta} for "
                f"{self.patience} evaluations (best {self.best:.4f} at step {self.best_step})",
            )
        return "improved" if new_best else "wait"

    def _stop(self, step: int, reason: str, fault: bool = False) -> str:
        self.stopped_step, self.reason, self.fault = step, reason, fault
        return "stop"

    # ------------------------------------------------------------------ trainer callback
    @property
    def state_key(self) -> str:
        return self.make_state_key(
            monitor=self.monitor,
            mode=self.mode,
            patience=self.patience,
            min_delta=self.min_delta,
            warmup_steps=self.warmup_steps,
            abort_threshold=self.abort_threshold,
        )

    def on_eval(self, trainer, record: dict[str, Any]) -> None:
        if record["split"] != "validation" or "restored_from" in record:
            return
        if self.update(record["step"], float(record[METRICS[self.monitor]])) == "stop":
            self.request_stop(trainer, "early stopping")

    def request_stop(self, trainer, label: str) -> None:
        """Stop the run through its one flag; the first reason to stop is the one kept."""
        if not trainer.state.should_stop:
            trainer.state.should_stop = True
            trainer.state.failed = self.fault
            trainer.state.stop_reason = f"{label}: {self.reason}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "stopped_step": self.stopped_step,
            "reason": self.reason,
            "fault": self.fault,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ref, self.best, self.best_step, self.wait = state["ref"], state["best"], state["best_step"], state["wait"]
        self.stopped_step, self.reason, self.fault = state["stopped_step"], state["reason"], state["fault"]


__all__ = ["EarlyStopping", "METRICS"]
