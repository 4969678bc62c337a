"""The state of a run: where it is, why it stopped, and every record it wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # valid target tokens trained on (all processes)
    should_stop: bool = False  # the one flag a callback sets to stop the run
    stop_reason: str = ""
    failed: bool = False  # stopped by a fault (non-finite steps, a diverging metric), not by patience
    interrupted: bool = False
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient, in total ...
    bad_in_a_row: int = 0  # ... and in a row at the last log line
    restored_from: int | None = None  # the step whose weights BestWeights put back at the end
    history: list[dict[str, Any]] = field(default_factory=list)  # train and eval records, in order

    def evals(self, split: str = "validation") -> list[dict[str, Any]]:
        return [r for r in self.history if r["kind"] == "eval" and r["split"] == split]


__all__ = ["TrainState"]
