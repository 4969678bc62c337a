"""Trainer callbacks: the base class, the progress bar and keeping the best weights.

A callback subclasses `Callback` and overrides the hooks it needs; each gets the trainer:

    on_train_begin(trainer)            before the first step (after a resume has loaded its state)
    on_step_end(trainer, out)          after every optimizer step; `out` holds the step's values as
                                       device tensors (reading one with .item() is a host sync)
    on_log(trainer, record)            each train record (one per log interval)
    on_eval(trainer, record)           each evaluation record
    on_loop_end(trainer)               the loop is over (done or stopped), before the final test
                                       evaluation and `final/`: where the best weights are put back
    on_train_end(trainer)              the very end (also after Ctrl-C)

A callback stops the run through the one flag, `trainer.state.should_stop = True` (with a
`stop_reason`). Its own state goes into every checkpoint through `state_dict()` /
`load_state_dict()`, keyed by `state_key`: the class name by default, or a key built from the
settings (`self.make_state_key(monitor=..., patience=...)`), so two instances of one class resume
independently (the trainer refuses two stateful callbacks with one key).
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

from .checkpoint import best_dir, load_checkpoint, save_best
from .distributed import barrier
from .errors import KDLabError

if TYPE_CHECKING:
    from .config import KDConfig

log = logging.getLogger("kdlab")


class Callback:
    shows_progress = False  # True: it shows the run's progress itself, so no progress bar is added

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def make_state_key(self, **settings: Any) -> str:
        """A state key naming the class and the settings that tell two instances apart."""
        return type(self).__qualname__ + repr(dict(sorted(settings.items())))

    def on_train_begin(self, trainer) -> None: ...

    def on_step_end(self, trainer, out: dict[str, Any]) -> None: ...

    def on_log(self, trainer, record: dict[str, Any]) -> None: ...

    def on_eval(self, trainer, record: dict[str, Any]) -> None: ...

    def on_loop_end(self, trainer) -> None: ...

    def on_train_end(self, trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def fire(callbacks, event: str, trainer, *args) -> None:
    """Call hook `event` of each callback that has it (plain objects with some hooks work too)."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(trainer, *args)


def has_state(cb) -> bool:
    """Whether a callback keeps state of its own (overrides `state_dict`): only those are checkpointed."""
    fn = getattr(type(cb), "state_dict", None)
    return fn is not None and fn is not Callback.state_dict


def state_key_of(cb) -> str:
    """The checkpoint key of any callback object (a plain object without `state_key`: its class name)."""
    return getattr(cb, "state_key", type(cb).__qualname__)


class ProgressBar(Callback):
    """A tqdm bar over the run's steps (rank 0 only; off under TQDM_DISABLE=1 or when not a terminal)."""

    def __init__(self, disable: bool | None = None):
        self.disable, self.bar = disable, None

    def on_train_begin(self, trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.state.step,
            desc="distilling",
            unit="step",
            dynamic_ncols=True,
            disable=self.disable or not trainer.dist.is_main,
        )

    def on_step_end(self, trainer, out) -> None:
        if self.bar is not None:  # (steps outside fit() have no bar)
            self.bar.update(1)

    def on_log(self, trainer, record) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}")

    def on_loop_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = on_loop_end


class BestWeights(Callback):
    """Keep the weights of the best validation evaluation in out_dir/best/ (atomically, at each new
    best) and put them back when the loop ends, if the last evaluation was not the best: then the
    validation is measured again (a record with `restored_from`) and `final/` holds those weights.

    "Best" is the best value seen, however small the margin (as EarlyStopping's `best`).
    """

    def __init__(self, monitor: str = "val_kl", mode: str = "min"):
        from .early_stopping import METRICS

        self.monitor, self.key, self.mode = monitor, METRICS[monitor], mode
        self.best: float | None = None
        self.best_step: int | None = None

    @property
    def state_key(self) -> str:
        return self.make_state_key(monitor=self.monitor, mode=self.mode)

    def on_eval(self, trainer, record) -> None:
        if record["split"] != "validation" or "restored_from" in record:
            return
        value = float(record[self.key])
        if not math.isfinite(value):
            return  # a non-finite metric is never the best
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_step = value, record["step"]
            if trainer.dist.is_main:
                save_best(trainer.out_dir, trainer.state.step, trainer.student, trainer.objective.heads)

    def on_loop_end(self, trainer) -> None:
        barrier(trainer.dist)  # rank 0's last save is complete before anyone reads it
        if self.best_step is None or self.best_step == trainer.state.step or not best_dir(trainer.out_dir).exists():
            return
        load_checkpoint(best_dir(trainer.out_dir), trainer.student, trainer.objective.heads, state=False)
        log.info("restored the best weights (step %d, %s %.4f)", self.best_step, self.monitor, self.best)
        trainer.state.restored_from = self.best_step
        trainer.evaluate("validation", restored_from=self.best_step)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]


def _tqdm_off() -> bool | None:
    """True when $TQDM_DISABLE asks for no bars (an explicit `disable=` would override tqdm's own reading)."""
    return True if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes") else None


def check_state_keys(callbacks) -> None:
    """Stateful callbacks need distinct state keys, or their checkpointed states would collide."""
    keys = [state_key_of(cb) for cb in callbacks if has_state(cb)]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise KDLabError(
            f"two stateful callbacks share the state_key {twice[0]!r}; give each its own "
            f"(Callback.state_key), or their checkpointed states would collide"
        )


def default_callbacks(cfg: KDConfig, given: list) -> list:
    """The callbacks the config asks for, after the user's: early stopping and the best weights,
    the original framework's verbose logging, and a progress bar unless a callback shows progress."""
    out: list = []
    if cfg.early_stopping:
        warmup = cfg.es_warmup_steps if cfg.es_warmup_steps >= 0 else cfg.warmup_steps  # -1: the LR warmup
        from .early_stopping import EarlyStopping  # (it subclasses Callback)

        out.append(
            EarlyStopping(
                cfg.es_monitor, cfg.es_patience, cfg.es_min_delta, cfg.es_mode, warmup, cfg.es_abort_threshold or None
            )
        )
        if cfg.restore_best:
            out.append(BestWeights(cfg.es_monitor, cfg.es_mode))
    if cfg.log_style == "original-verbose":
        from .course.original import OriginalVerboseLogging

        out.append(OriginalVerboseLogging())
    if not any(getattr(cb, "shows_progress", False) for cb in given):
        out.append(ProgressBar(disable=_tqdm_off()))
    return out


__all__ = [
    "check_state_keys",
    "default_callbacks",
    "Callback",
    "ProgressBar",
    "BestWeights",
    "fire",
    "has_state",
    "state_key_of",
]
