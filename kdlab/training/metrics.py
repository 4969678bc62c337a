"""Interval metrics: each step's values summed on the device, read once per log line.

    metrics = IntervalMetrics(device, dist)
    metrics.add(out)                        # every step: device tensors, no host sync
    vals = metrics.read(extra)              # at a log line: the one host sync, DDP-reduced sums
    record = metrics.train_record(...)      # the interval's means as a train record

A step's `out` holds each term ("kd", "lm", ...), each weighted term ("w/kd", ...), "loss",
"grad_norm", "tokens", "skipped" (1.0 for a step skipped for a non-finite loss or gradient, whose
other values are then 0) and "nonfinite/<term>" flags. A value a step may lack (the "gen/" terms of
an on-policy run's generated steps, kdlab.training.on_policy) is averaged over the trained steps that had it.
Under torchrun each process holds its part of every global mean, so the interval's sums are added
over processes before dividing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from kdlab.training.engine import Engine

log = logging.getLogger("kdlab")
GENERATED = "gen/"  # the prefix of an on-policy run's generated-step terms (kdlab.training.on_policy)


@dataclass
class Interval:
    sums: dict[str, float]  # each step value, summed over the interval
    counts: dict[str, float]  # trained (not skipped) steps that had each value
    extra: dict[str, float]  # diagnostics read at the log line (grad shares, router statistics)
    steps: int
    seconds: float
    bad_run: int  # non-finite steps in a row at its end
    max_run: int  # the longest run of them in it

    @property
    def skipped(self) -> int:
        return int(self.sums.get("skipped", 0))

    @property
    def trained(self) -> int:
        return self.steps - self.skipped


def per_process(keys) -> list[str]:
    """The interval values that each process holds a part of (added over processes for a mean); the
    others (grad_norm, tokens, skipped, the non-finite flags) are the same on every process."""
    same = ("skipped", "tokens", "grad_norm")
    return sorted(k for k in keys if k not in same and not k.startswith("nonfinite/"))


class IntervalMetrics:
    def __init__(self, device: torch.device, engine: Engine):
        self.device, self.engine = device, engine
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}  # per value: the trained steps that had it
        self.steps = 0
        self.started = time.perf_counter()
        self.carried = 0.0  # seconds a resumed interval had run before its checkpoint
        self.bad_run = torch.zeros((), device=device)  # non-finite steps in a row, ...
        self.max_run = torch.zeros((), device=device)  # ... and the longest such run in this interval

    def add(self, out: dict[str, torch.Tensor]) -> None:
        trained = 1.0 - out["skipped"]
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0.0) + trained
        self.steps += 1
        self.bad_run = (self.bad_run + 1) * out["skipped"]
        self.max_run = torch.maximum(self.max_run, self.bad_run)

    def start_clock(self) -> None:
        """Time the interval from now (minus what a resumed interval had already run)."""
        self.started = time.perf_counter() - self.carried
        self.carried = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def read(self, extra: dict[str, torch.Tensor] | None = None) -> Interval:
        """The interval so far, and `extra` device values, as floats: the one host sync between log
        lines. The next interval starts."""
        extra = extra or {}
        # stacked on the device, copied once: one transfer (one sync), not one per value
        tensors = [*self.sums.values(), *self.counts.values(), *extra.values(), self.bad_run, self.max_run]
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in tensors]).tolist()
        n_sums = len(self.sums)
        out = Interval(
            dict(zip(self.sums, values[:n_sums])),
            dict(zip(self.counts, values[n_sums : 2 * n_sums])),
            dict(zip(extra, values[2 * n_sums : -2])),
            self.steps,
            self.elapsed(),
            int(values[-2]),
            int(values[-1]),
        )
        self.sums, self.counts, self.steps, self.started = {}, {}, 0, time.perf_counter()
        self.max_run = torch.zeros_like(self.max_run)
        return out

    def means(self, interval: Interval) -> dict[str, float]:
        """Per trained step that had it, the interval's terms, "w/" terms, loss and grad_norm, added
        over processes first under DDP (each holds its part of every global mean)."""
        sums, counts = interval.sums, interval.counts
        skip = ("skipped", "tokens")
        keys = [k for k in sums if k not in skip and not k.startswith("nonfinite/") and counts.get(k, 0) > 0]
        parts = per_process(keys)  # grad_norm is the same on every process
        if self.engine.launched and parts:
            t = torch.tensor([sums[k] for k in parts], dtype=torch.float64, device=self.device)
            sums = {**sums, **dict(zip(parts, self.engine.all_reduce_sum(t).tolist()))}
        return {k: sums[k] / counts[k] for k in keys}

    def state_dict(self) -> dict[str, Any]:
        """The unfinished interval, so a resumed run logs the same means (and tokens/s). Each process's
        part of the sums is added up (a collective under torchrun), so a run resumes on any number of
        processes."""
        sums = {k: v.detach() for k, v in self.sums.items()}
        keys = per_process(sums)
        if self.engine.launched and keys:
            total = self.engine.all_reduce_sum(torch.stack([sums[k].double() for k in keys]))
            sums |= {k: total[i].to(sums[k].dtype) for i, k in enumerate(keys)}
        return {
            "interval": {k: v.cpu() for k, v in sums.items()},
            "interval_counts": {k: torch.as_tensor(v).cpu() for k, v in self.counts.items()},
            "interval_steps": self.steps,
            "interval_elapsed": self.elapsed(),
            "bad_run": self.bad_run.cpu(),
            "max_run": self.max_run.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["interval"].items()}
        for k in per_process(self.sums):  # whole sums saved: this process's share of them
            self.sums[k] = self.sums[k] / self.engine.world
        self.counts = {k: v.to(self.device) for k, v in state["interval_counts"].items()}
        self.steps = state["interval_steps"]
        self.carried = state["interval_elapsed"]
        self.bad_run, self.max_run = state["bad_run"].to(self.device), state["max_run"].to(self.device)


def train_record(
    interval: Interval,
    means: dict[str, float],
    *,
    step: int,
    fields: dict[str, Any],
    weights: dict[str, float],
    lr: float,
    skipped_steps: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """One train record: the interval's means, weights, learning rate, speed and diagnostics."""
    record = {
        "kind": "train",
        "step": step,
        **fields,
        "steps": interval.steps,
        **{k: v for k, v in means.items() if not k.startswith("w/")},
        "weighted": {k[2:]: v for k, v in means.items() if k.startswith("w/")},
        "weights": weights,
        "lr": lr,
        "tokens_per_s": interval.sums["tokens"] / max(interval.seconds, 1e-9),
        "interval_s": interval.seconds,
        "skipped_steps": skipped_steps,
        "skipped_in_interval": interval.skipped,
    }
    if "generate_s" in fields:  # an on-policy run (kdlab.training.on_policy): the share of the time spent generating
        record["generate_share"] = fields["generate_s"] / max(interval.seconds, 1e-9)
    if device is not None and device.type == "cuda":  # the allocator's own counter: no device sync
        record["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    extra = interval.extra
    shares = {k[6:]: v for k, v in extra.items() if k.startswith("share/")}
    if shares:
        record["grad_share"] = shares
    layers = sorted({int(k[6:].split("/")[0]) for k in extra if k.startswith("router")})
    if layers:
        record["router"] = [
            {
                "entropy": extra[f"router{i}/entropy"],
                "utilisation": [v for k, v in extra.items() if k.startswith(f"router{i}/util")],
            }
            for i in layers
        ]
    return record


def log_run_start(trainer) -> None:
    """The run's first lines: steps, epochs, tokens per step, and the curriculum's ramps."""
    cfg, per_epoch, engine = trainer.cfg, trainer.batches.steps_per_epoch, trainer.engine
    log.info(
        "training %d optimizer steps (%s%s), %d tokens per step%s, out_dir=%s",
        trainer.total_steps,
        "max_steps" if cfg.max_steps > 0 else f"epochs={cfg.epochs}",
        f"; {trainer.total_steps / per_epoch:.2f} epochs of {per_epoch} steps" if per_epoch else "",
        cfg.batch_size * engine.world * cfg.grad_accum * cfg.seq_len,
        f" over {engine.world} processes ({engine.kind})" if engine.launched else "",
        trainer.out_dir,
    )
    obj = trainer.objective
    log.debug(
        "KD + LM: %s",
        "fused from the hidden states (kdlab.loss.fused)"
        if getattr(obj, "fused", False)
        else f"from the [N, V] logits ({getattr(obj, 'fused_off', '')})",
    )
    curriculum = trainer.objective.curriculum
    if curriculum.ramps and any(n not in ("kd", "lm") for n in trainer.objective.active):
        log.info(
            "curriculum %s: %s",
            cfg.curriculum,
            "; ".join(
                f"{k} {r.start:.0%}-{r.end:.0%} {r.shape}"
                for k, r in curriculum.ramps.items()
                if k in curriculum.max_weights
            ),
        )


def log_train_record(record: dict[str, Any], total_steps: int, terms: tuple[str, ...]) -> None:
    """The record's log line(s): loss, each term, lr, grad norm, speed, and the diagnostics."""
    # a generated step's terms ("gen/kd", kdlab.training.on_policy) after the corpus ones
    names = [*terms, *(GENERATED + k for k in terms)]
    values = " | ".join(f"{k} {record[k]:.4f}" for k in names if k in record)
    if "on_policy_share" in record:
        share, gen = record["on_policy_share"], record["generate_share"]
        values += f" | on-policy {share:.2f} (generating {gen:.0%} of the time)"
    active = {k: w for k, w in record["weights"].items() if k not in ("kd", "lm")}
    log.info(
        "step %d/%d | loss %.4f | %s | lr %.2e | grad-norm %.3f | %.0f tok/s%s%s",
        record["step"],
        total_steps,
        record["loss"],
        values,
        record["lr"],
        record["grad_norm"],
        record["tokens_per_s"],
        f" | skipped {record['skipped_steps']}" if record["skipped_steps"] else "",
        (" | weights " + " ".join(f"{k} {w:.3f}" for k, w in active.items())) if active else "",
    )
    for sample in record.get("samples", []):  # the last generated batch's first rows
        text = " ".join(f"{sample['prompt']} ▸ {sample['continuation']}".split())
        log.info("  generated: %s", text[:160] + ("…" if len(text) > 160 else ""))
    if "router" in record:
        log.info(
            "  router utilisation: %s",
            "; ".join(
                f"layer {i} [{' '.join(f'{u:.2f}' for u in r['utilisation'])}] H={r['entropy']:.2f}"
                for i, r in enumerate(record["router"])
            ),
        )
    if "grad_share" in record:
        log.info("  grad-norm share: %s", ", ".join(f"{k} {v:.2f}" for k, v in record["grad_share"].items()))


__all__ = ["Interval", "IntervalMetrics", "train_record", "log_run_start", "log_train_record"]
