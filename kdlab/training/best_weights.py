"""Keep the best validation evaluation's weights, and put them back when the loop ends."""

from __future__ import annotations

import logging
import math
from typing import Any

from kdlab.training.callbacks import Callback
from kdlab.training.checkpoint import best_dir, load_checkpoint, save_best
from kdlab.training.early_stopping import METRICS

log = logging.getLogger("kdlab")


class BestWeights(Callback):
    """Keep the weights of the best validation evaluation in out_dir/best/ (atomically, at each new
    best) and put them back when the loop ends, if the last evaluation was not the best: then the
    validation is measured again (a record with `restored_from`) and `final/` holds those weights.

    "Best" is the best value seen, however small the margin (as EarlyStopping's `best`).
    """

    def __init__(self, monitor: str = "val_kl", mode: str = "min"):
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
        better = math.isfinite(value) and (  # a non-finite metric is never the best
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        )
        # rank 0's decision on every process: saving gathers the weights from all of them (FSDP2)
        if trainer.engine.broadcast_object(better):
            self.best, self.best_step = value, record["step"]
            weights = trainer.engine.full_state_dict(trainer.student)  # every process: FSDP2 gathers
            if trainer.engine.is_main:
                save_best(trainer.out_dir, trainer.state.step, trainer.student, trainer.objective.heads, weights)

    def on_loop_end(self, trainer) -> None:
        trainer.engine.barrier()  # rank 0's last save is complete before anyone reads it
        restore = not (
            self.best_step is None or self.best_step == trainer.state.step or not best_dir(trainer.out_dir).exists()
        )
        if not trainer.engine.broadcast_object(restore):  # loading and evaluating are collective under FSDP2
            return
        load_checkpoint(best_dir(trainer.out_dir), trainer.student, trainer.objective.heads, False, trainer.engine)
        log.info("restored the best weights (step %d, %s %.4f)", self.best_step, self.monitor, self.best)
        trainer.state.restored_from = self.best_step
        trainer.evaluate("validation", restored_from=self.best_step)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]


__all__ = ["BestWeights"]
