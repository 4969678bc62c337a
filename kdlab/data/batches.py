"""Batch sources: what the trainer trains on, one optimizer step at a time.

    source = PackedBatches(data["train"], batch_size=4, grad_accum=2, seed=0)
    micro_batches = source.next_step()        # this process's 2 micro-batches of the next step
    state = source.state_dict()               # its position, checkpointed with the run

A batch source yields each step's micro-batches (for this process, on the training device) and
owns its resumable position; the trainer knows nothing of epochs, shuffling, ranks or caches.
Write your own by subclassing `BatchSource`: a micro-batch is a dict with `input_ids`,
`attention_mask` and `labels` (B, T), any extra keys the loss terms read, and `no_padding` (a
Python bool: every mask entry is 1, read on the CPU so the step needs no device sync).
"""

from __future__ import annotations

from typing import Any

import torch

from kdlab.data.corpus import PackedSplit, batches_per_epoch, epoch_order
from kdlab.errors import KDLabError


class BatchSource:
    steps_per_epoch: int | None = None  # optimizer steps per pass over the data (None: not epoch-based)

    def next_step(self) -> list[dict[str, Any]]:
        """The micro-batches of the next optimizer step (this process's part), on the device."""
        raise NotImplementedError

    def log_fields(self) -> dict[str, Any]:
        """Fields added to every train record (the position, for a reader of the records)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, Any]:
    """A CPU batch moved to `device`, with `no_padding` read on the CPU copy (no device sync later)."""
    return {
        **{k: v.to(device, non_blocking=True) for k, v in batch.items()},
        "no_padding": bool(batch["attention_mask"].all()),
    }


class PackedBatches(BatchSource):
    """Shuffled packed blocks, a new order each epoch (fixed by `seed` and the epoch), split over
    processes: global batch g of an epoch is blocks order[g*B*W : (g+1)*B*W], and process `rank`
    takes its B of them, so W processes train on exactly what one process with a W-times larger
    batch would. A teacher cache (kdlab.data.teacher_cache) joins the teacher's stored top-k or hidden states per block.
    """

    def __init__(
        self,
        split: PackedSplit,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
        teacher_cache=None,
    ):
        self.split, self.batch_size, self.grad_accum, self.seed = split, batch_size, grad_accum, seed
        self.rank, self.world, self.device, self.teacher_cache = rank, world, device, teacher_cache
        self.global_batch = batch_size * world  # sequences per micro-batch, all processes
        self.batches_per_epoch = batches_per_epoch(split, self.global_batch)
        self.steps_per_epoch = self.batches_per_epoch // grad_accum
        if self.steps_per_epoch == 0:
            raise KDLabError(
                f"the train split has {len(split)} blocks of {split.input_ids.shape[1]} tokens, fewer than "
                f"batch_size*grad_accum*processes={self.global_batch * grad_accum}; use more data or a smaller batch"
            )
        self.epoch, self.pos = 0, 0  # the position of the next micro-batch: epoch and batch within it

    @classmethod
    def for_run(cls, cfg, split: PackedSplit, tokenizer, student, teacher, engine) -> PackedBatches:
        """The batches a run of `cfg` trains on: this process's share, on the student's device, with
        the teacher cache of `cfg.teacher_cache` joined when the run reads one."""
        from kdlab.data.teacher_cache import open_for_run

        device = next(student.parameters()).device
        cache = open_for_run(cfg, split, tokenizer, student, teacher)
        return cls(split, cfg.batch_size, cfg.grad_accum, cfg.seed, engine.rank, engine.world, device, cache)

    def next_step(self) -> list[dict[str, Any]]:
        batches = []
        for _ in range(self.grad_accum):
            if self.pos == self.batches_per_epoch:
                self.epoch, self.pos = self.epoch + 1, 0
            g, b = self.global_batch, self.batch_size
            order = epoch_order(len(self.split), self.seed, self.epoch)[self.pos * g : (self.pos + 1) * g]
            blocks = order[self.rank * b : (self.rank + 1) * b]
            batch = self.split.batch(blocks)
            if self.teacher_cache is not None:  # the teacher's stored top-k or hidden states for these blocks
                batch |= self.teacher_cache.batch(blocks)
            batches.append(batch)
            self.pos += 1
        if self.pos == self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        return [to_device(b, self.device) for b in batches]

    def log_fields(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = state["epoch"], state["batch_in_epoch"]


__all__ = ["BatchSource", "PackedBatches", "to_device"]
