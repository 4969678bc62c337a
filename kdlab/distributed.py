"""Data-parallel runs under `torchrun` (torch.distributed + DDP; gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node 2 -m kdlab train --batch-size 2     # global batch 2 x 2 = 4

Each process holds a frozen replica of the teacher and a DDP-wrapped student and trains on its
own slice of every global batch; `batch_size` is per process, as in torchrun convention. Only
rank 0 logs, writes metrics and checkpoints. Without torchrun's environment (LOCAL_RANK and
WORLD_SIZE unset) nothing here does anything, so a plain `kdlab train` never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    launched: bool = False  # under torchrun (a process group exists, even of one process)

    @property
    def enabled(self) -> bool:
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join torchrun's process group when launched by torchrun (idempotent); else a single process.

    `torchrun --nproc_per_node 1` also takes the DDP path, so one GPU can exercise NCCL.
    """
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, launched=True)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes, in place (no host sync); the identity in a single process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of `obj` on every process (a decision all ranks must share, e.g. stopping)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


__all__ = ["DistInfo", "init_from_env", "all_reduce_sum", "all_reduce_max", "broadcast_object", "barrier"]
