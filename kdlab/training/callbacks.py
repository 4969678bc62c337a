"""Trainer callbacks: the base class and the progress bar (the best weights: kdlab.training.best_weights).

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
import os
from typing import Any

from kdlab.errors import KDLabError

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
            disable=self.disable or not trainer.engine.is_main,
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


def tqdm_off() -> bool | None:
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


__all__ = [
    "check_state_keys",
    "Callback",
    "ProgressBar",
    "tqdm_off",
    "fire",
    "has_state",
    "state_key_of",
]
