"""How a training step is distributed: one process, DDP or FSDP2, in one object.

    torchrun --nproc_per_node 2 -m kdlab train --batch-size 2                      # DDP: global batch 4
    torchrun --nproc_per_node 2 -m kdlab train --batch-size 2 --distributed fsdp2  # FSDP2, the same batch

Everything the trainer, the checkpoints, the best weights and the run folder need to know about the
other processes is asked here: wrap the models, skip the gradient sync of all but the last
micro-batch, the loss scale that keeps the global per-token mean exact, the heads' gradient sync,
reductions, the gradient norm, a full state dict to save, who writes files (`is_main`), barriers.
Without torchrun's environment (LOCAL_RANK and WORLD_SIZE unset) the engine is a single process and
nothing here touches torch.distributed.

DDP keeps a full replica of student and teacher on every process. FSDP2 (`torch.distributed.fsdp.
fully_shard`, torch's own) shards each decoder layer's parameters, gradients and optimizer state over
the processes, and the frozen teacher's weights too, gathering a layer's weights just for its forward
(and backward). On gloo (CPU) FSDP2 cannot reduce with a divide factor of 1 (ReduceOp.PREMUL_SUM), so
like DDP it *averages* gradients; the engine multiplies the loss by the world size to undo that.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kdlab.errors import KDLabError

KINDS = ("ddp", "fsdp2")  # the `distributed` setting: what a torchrun launch uses


@dataclass(frozen=True)
class Engine:
    kind: str = "single"  # "single" (no torchrun), "ddp" or "fsdp2"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def launched(self) -> bool:
        """Under torchrun (a process group exists, even of one process)."""
        return self.kind != "single"

    @property
    def is_main(self) -> bool:
        """The process that logs and writes files."""
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP2 average gradients over processes; each process's loss is already its part of
        the global per-token mean, so scaling by the world size makes the average their sum."""
        return float(self.world)

    # ------------------------------------------------------------------ models
    def wrap(self, student: torch.nn.Module, teacher: torch.nn.Module | None, device: torch.device):
        """(the student to train, the teacher to run) as this engine distributes them. FSDP2 shards in
        place (the student's parameters become DTensors: build the optimizer after this)."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            return DistributedDataParallel(student, device_ids=ids), teacher
        if self.kind == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            for model in (student, teacher):
                if model is None:
                    continue
                if not isinstance(getattr(getattr(model, "model", None), "layers", None), torch.nn.ModuleList):
                    raise KDLabError(
                        f"distributed='fsdp2' shards a model's decoder layers (model.model.layers), and "
                        f"{type(model).__name__} has none; use distributed='ddp'"
                    )
                for layer in model.model.layers:  # one all-gather per decoder layer, as torchtune shards
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, output head
        return student, teacher

    def sync_context(self, model: torch.nn.Module, last: bool):
        """Gradients are reduced in the backward of the step's last micro-batch only."""
        if last or self.kind == "single":
            return contextlib.nullcontext()
        if self.kind == "ddp":
            return model.no_sync()
        return _fsdp_no_sync(model)

    def sync_heads(self, heads: torch.nn.Module) -> None:
        """The heads (routers, projections) are small and outside DDP/FSDP: their gradients are
        averaged by hand, as DDP and FSDP average the student's. (Each process's gradient carries the
        loss scale, so the average is the global sum; summing them, as kdlab did before the engine,
        made the heads' gradients `world` times too large under torchrun.)"""
        grads = [p.grad for p in heads.parameters() if p.grad is not None]
        if self.launched and grads:  # one collective for all of them, not one per parameter
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def clip_grad_norm(self, student_params: list, head_params: list, max_norm: float) -> torch.Tensor:
        """The global gradient norm of all trainable parameters, clipped to `max_norm` as
        torch.nn.utils.clip_grad_norm_ clips. The squares are summed in float64: torch's float32 norm
        of a 49,152 x 64 embedding gradient was 2.5e-5 off the exact value, which is more than the
        engines differ by. FSDP2's gradients are DTensor shards: their squares are summed over the
        processes before the heads' (plain tensors, the same on every process) are added."""
        params = [p for p in student_params + head_params if p.grad is not None]
        if not params:
            return torch.zeros(())
        sharded = [p for p in params if _is_dtensor(p.grad)]
        local = [p for p in params if not _is_dtensor(p.grad)]
        square = torch.zeros((), dtype=torch.float64, device=params[0].grad.device)
        if sharded:
            square += _squares([p.grad.to_local() for p in sharded])
            self.all_reduce_sum(square)
        if local:
            square += _squares([p.grad for p in local])
        total = square.sqrt().float()
        if max_norm < math.inf:
            for group in (sharded, local):  # DTensors and plain tensors are scaled apart
                if group:
                    torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place (no host sync); the identity in a single process."""
        if self.launched:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.launched:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast_object(self, obj):
        """Rank 0's value of `obj` on every process (a decision all ranks must share, e.g. stopping)."""
        if not self.launched:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()

    # ------------------------------------------------------------------ state for checkpoints
    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Under FSDP2, the module's whole state dict gathered as CPU tensors (collective: every process
        calls it; rank 0 gets the tensors, the others an empty dict). Otherwise None: the module holds
        all of its weights itself, and is saved as it is."""
        if self.kind != "fsdp2":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied parameter (the output head that is the embedding) is gathered under both names, as two
        # tensors; saved as the module would save it, once, under its first name
        aliases = {n for n, _ in module.named_parameters(remove_duplicate=False)} - {
            n for n, _ in module.named_parameters()
        }
        return {k: v for k, v in full.items() if k not in aliases}

    def optimizer_state_dict(self, modules: torch.nn.Module, optimizer) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name, unsharded: the same layout in every engine,
        so a run saved under FSDP2 resumes in one process and back (collective under FSDP2)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        had = set(optimizer.state)
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.kind == "fsdp2")
        state = get_optimizer_state_dict(modules, optimizer, options=options)
        for name in _drop_made_up_states(modules, optimizer, keep=lambda name, p: p in had):
            state["state"].pop(name, None)  # nor saved
        return state

    def load_optimizer_state_dict(self, modules: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # strict=False: a head whose weight is still 0 on its ramp has had no gradient, hence no state
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(modules, optimizer, state, options=options)
        _drop_made_up_states(modules, optimizer, keep=lambda name, p: name in state["state"])

    def load_full_state_dict(self, module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
        """Load a full (unsharded) state dict into `module`, sharding it under FSDP2."""
        if self.kind != "fsdp2":
            return module.load_state_dict(state, strict=strict)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        return set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def _squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the tensors' squared entries, accumulated in float64 (one foreach call)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).pow(2).sum()


def _drop_made_up_states(modules: torch.nn.Module, optimizer, keep) -> list[str]:
    """torch's optimizer state dict functions first give every parameter without state one (an
    optimizer step at lr 0, so `step` = 1); those that `keep(name, param)` rejects go back to none,
    or their first real update would be bias-corrected as a second one. Returns their names."""
    dropped = [name for name, p in modules.named_parameters() if not keep(name, p)]
    params = dict(modules.named_parameters())
    for name in dropped:
        optimizer.state.pop(params[name], None)
    return dropped


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def engine_from_env(device_type: str, kind: str = "ddp") -> Engine:
    """Join torchrun's process group when launched by torchrun (idempotent) with the engine `kind`
    ("ddp" or "fsdp2"); else a single process. `torchrun --nproc_per_node 1` also takes the
    distributed path, so one GPU can exercise NCCL."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Engine()
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Engine(kind, rank, world, local_rank)


__all__ = ["Engine", "engine_from_env", "KINDS"]
