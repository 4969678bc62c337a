"""The distillation loop: one straight-through `fit()`, a few events, resumable state.

    cfg = kdlab.load_config(overrides={"max_steps": 20})
    trainer = kdlab.Trainer.from_config(cfg)
    state = trainer.fit()            # history of train/eval records; Ctrl-C returns it too
    print(kdlab.format_summary(state.history))

Per optimizer step: `grad_accum` micro-batches; the frozen teacher's outputs (skipped when no
term needs them, or read from a teacher cache: kdlab.teacher_cache), the student's under the
precision policy, then

    total = sum_k w_k(step) * term_k,    w_k from the curriculum (kdlab.curriculum),

each term a per-token mean whose denominator is the valid-token count of the *whole* accumulated
(and, under torchrun, all-process) batch, so accumulating 4 micro-batches or running 2 processes
gives exactly the gradient of one 4x larger batch.

No host syncs between log lines: terms, grad norms and the non-finite guard stay on the device
and are read once per log interval. A non-finite loss or gradient makes the fused AdamW skip its
update on the device (its `found_inf` input, as GradScaler uses it), so a bad step moves nothing.

Callbacks are plain objects with any of on_train_begin(trainer), on_log(trainer, record),
on_eval(trainer, record), on_train_end(trainer) and, to be checkpointed, state_dict() /
load_state_dict(); they stop a run by setting `trainer.state.should_stop = True`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .balance import AdaptiveBalancer
from .checkpoint import best_dir, latest_checkpoint, load_checkpoint, read_trainer_state, save_best, save_checkpoint
from .config import KDConfig, save_config
from .curriculum import CurriculumScheduler, parse_ramps
from .data import PackedSplit, batches_per_epoch, epoch_order, prepare_data
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, broadcast_object, init_from_env
from .early_stopping import EarlyStopping
from .errors import KDLabError
from .evaluation import evaluate
from .losses import IGNORE_INDEX, kd_loss, kd_loss_topk, lm_loss, next_token_labels
from .models import build_student, count_parameters, load_teacher, load_tokenizer
from .precision import Precision, resolve_precision, student_outputs, teacher_outputs
from .terms import TERMS, DistillationHeads, needs

log = logging.getLogger("kdlab")

# fields that may differ between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = {"resume", "out_dir", "log_every", "log_first", "log_style", "eval_every", "eval_batches",
                     "save_every", "keep_checkpoints", "checkpoints", "compile"}
ALL_TERMS = ("kd", "lm", *TERMS)


def phase(name: str):
    """A named range of the step for torch.profiler ("kdlab: backward", ...); next to free without one."""
    return torch.profiler.record_function(f"kdlab: {name}")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position of the next micro-batch: epoch ...
    batch_in_epoch: int = 0  # ... and batch index within it
    tokens: int = 0  # valid target tokens trained on (all processes)
    should_stop: bool = False
    stop_reason: str = ""
    failed: bool = False  # stopped by a fault (non-finite steps, a diverging metric), not by patience
    interrupted: bool = False
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient, in total ...
    bad_in_a_row: int = 0  # ... and in a row at the last log line
    history: list[dict[str, Any]] = field(default_factory=list)  # train and eval records, in order

    def evals(self, split: str = "validation") -> list[dict[str, Any]]:
        return [r for r in self.history if r["kind"] == "eval" and r["split"] == split]


def _tqdm_off() -> bool | None:
    """True when $TQDM_DISABLE asks for no bars (an explicit `disable=` argument would otherwise
    override tqdm's own reading of it), else None: tqdm's "off when not a terminal"."""
    return True if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes") else None


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers' own progress bars (weight loading, every checkpoint's save) off for a while:
    in a notebook each is a widget, and a run saves many times."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def quiet_libraries() -> None:
    """transformers' and datasets' warnings and progress bars off for good (the CLI and the course):
    their chatter (weight-loading bars, hub notices) hides kdlab's own lines."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def build_components(cfg: KDConfig):
    """(precision, tokenizer, teacher, data, student) as `cfg` describes them; shared by train and eval."""
    precision = resolve_precision(cfg.device, cfg.teacher_dtype, cfg.autocast_dtype)
    info = init_from_env(precision.device.type)
    if info.enabled and precision.device.type == "cuda":
        precision = replace(precision, device=torch.device("cuda", info.local_rank))
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher, cfg.data_dir)
    teacher = load_teacher(cfg.teacher, cfg.data_dir, precision)
    data = prepare_data(cfg.data, cfg.data_dir, tokenizer, cfg.seq_len)
    if cfg.train_blocks:
        data["train"] = data["train"].head(cfg.train_blocks)
    student = build_student(cfg.student, teacher, cfg.student_init, cfg.data_dir, precision, len(tokenizer))
    log.info("teacher %s (%.1fM params) -> student %s (%.1fM params, init=%s); %s",
             cfg.teacher, count_parameters(teacher) / 1e6, cfg.student, count_parameters(student) / 1e6,
             cfg.student_init, precision.describe())
    log.info("data %s: %s", cfg.data, ", ".join(f"{s} {d.num_tokens:,} tokens" for s, d in data.items()))
    return precision, tokenizer, teacher, data, student


class Trainer:
    def __init__(self, cfg: KDConfig, student: torch.nn.Module, teacher: torch.nn.Module,
                 data: dict[str, PackedSplit], precision: Precision, tokenizer=None, callbacks=()):
        self.cfg, self.student, self.teacher, self.data = cfg, student, teacher, data
        self.precision, self.tokenizer, self.callbacks = precision, tokenizer, list(callbacks)
        self.dist: DistInfo = init_from_env(precision.device.type)
        self.state = TrainState()
        self.out_dir = Path(cfg.out_dir)
        if not self.dist.is_main:  # only rank 0 talks
            log.setLevel(logging.WARNING)

        self.global_batch = cfg.batch_size * self.dist.world  # sequences per micro-batch, all processes
        self.steps_per_epoch = batches_per_epoch(data["train"], self.global_batch) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise KDLabError(
                f"the train split has {len(data['train'])} blocks of {cfg.seq_len} tokens, fewer than "
                f"batch_size*grad_accum*processes={self.global_batch * cfg.grad_accum}; use more data or a smaller batch"
            )
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch

        # the trainable student-side modules of the intermediate terms (routers, projections)
        self.heads = DistillationHeads.for_models(cfg, student, teacher)
        self.needs = needs(cfg)
        if self.needs.attentions:  # attention maps exist only in eager attention
            for model in (student, teacher):
                model.set_attn_implementation("eager")
        self.balancer = AdaptiveBalancer(cfg.balance_momentum) if cfg.adaptive_balance else None
        self.curriculum = CurriculumScheduler.from_preset(
            cfg.curriculum, self.total_steps, {"kd": cfg.alpha_kd, "lm": 1.0 - cfg.alpha_kd, **self.heads.weights},
            parse_ramps(cfg.ramps))
        self.early_stopping: EarlyStopping | None = None
        if cfg.early_stopping:
            warmup = cfg.es_warmup_steps if cfg.es_warmup_steps >= 0 else cfg.warmup_steps  # -1: the LR warmup
            self.early_stopping = EarlyStopping(cfg.es_monitor, cfg.es_patience, cfg.es_min_delta, cfg.es_mode,
                                                warmup, cfg.es_divergence or None)
            self.callbacks.append(self.early_stopping)
        self.last_grad_shares: dict[str, torch.Tensor] = {}
        self._bar = None  # fit()'s progress bar
        self.teacher_cache = None
        if cfg.teacher_cache and cfg.alpha_kd > 0:
            self.teacher_cache = self._open_teacher_cache()

        # DDP averages the student's gradients across processes; the heads are small and all-reduced
        # by hand (their parameters are unused while a ramp holds their weight at 0)
        self.model = student
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [precision.device.index] if precision.device.type == "cuda" else None
            self.model = DistributedDataParallel(student, device_ids=ids)

        # compiled forwards for the training step only; evaluation (other shapes, no grad) runs eager
        self.teacher_step = teacher
        if cfg.compile:
            self.model, self.teacher_step = torch.compile(self.model), torch.compile(teacher)

        # AdamW with decay on matrices only (not norms/biases), as in nanoGPT. Fused (CPU and CUDA):
        # one kernel, and it takes `found_inf`, which skips a step on the device without a host sync.
        params = [p for p in student.parameters() if p.requires_grad] + list(self.heads.parameters())
        self.trainable = params
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.needs_grad_scaler)
        # the running interval, on the device: sums of each step's values, read at the next log line
        dev = precision.device
        self._interval: dict[str, torch.Tensor] = {}
        self._interval_steps = 0
        self._interval_elapsed = 0.0
        self._t_interval = time.perf_counter()
        self._bad_run = torch.zeros((), device=dev)  # non-finite steps in a row, ...
        self._max_run = torch.zeros((), device=dev)  # ... and the longest such run in this interval

    def _open_teacher_cache(self):
        from .teacher_cache import cache_key, open_teacher_cache

        if self.tokenizer is None:
            raise KDLabError("teacher_cache needs the tokenizer (part of the cache's key): "
                             "pass Trainer(..., tokenizer=)")
        s_vocab = self.student.get_output_embeddings().weight.shape[0]
        t_vocab = self.teacher.get_output_embeddings().weight.shape[0]
        if s_vocab != t_vocab:
            raise KDLabError(f"teacher_cache needs the student's vocabulary to be the teacher's ({s_vocab} vs "
                             f"{t_vocab}); train with teacher_cache=''")
        key = cache_key(self.data["train"], self.tokenizer, self.teacher, self.cfg.kd_top_k, self.cfg.temperature)
        cache = open_teacher_cache(self.cfg.teacher_cache, key)
        log.info("teacher cache %s: top-%d of %d blocks; training steps skip the teacher's forward",
                 self.cfg.teacher_cache, key["top_k"], key["blocks"])
        return cache

    # ------------------------------------------------------------------ construction from config
    @classmethod
    def from_config(cls, cfg: KDConfig, callbacks=()) -> Trainer:
        """Load teacher, tokenizer and data, build the student: everything `kdlab train` does."""
        with quiet_hf_progress():
            precision, tokenizer, teacher, data, student = build_components(cfg)
        return cls(cfg, student, teacher, data, precision, tokenizer, callbacks)

    # ------------------------------------------------------------------ events
    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self, *args)

    def _record(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self._emit("on_eval" if record["kind"] == "eval" else "on_log", record)

    def _agree_on_stop(self) -> None:
        """Rank 0 decides whether to stop, so processes never disagree (and deadlock)."""
        s = self.state
        s.should_stop, s.stop_reason, s.failed = broadcast_object((s.should_stop, s.stop_reason, s.failed), self.dist)

    # ------------------------------------------------------------------ data
    def _next_micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], tuple[int, int]]:
        """This process's part of the next grad_accum global batches, and the data position after
        them (committed after the step)."""
        train, gbs, bs, rank = self.data["train"], self.global_batch, self.cfg.batch_size, self.dist.rank
        n = batches_per_epoch(train, gbs)
        epoch, pos = self.state.epoch, self.state.batch_in_epoch
        batches = []
        for _ in range(self.cfg.grad_accum):
            if pos == n:
                epoch, pos = epoch + 1, 0
            order = epoch_order(len(train), self.cfg.seed, epoch)[pos * gbs : (pos + 1) * gbs]
            blocks = order[rank * bs : (rank + 1) * bs]
            batch = train.batch(blocks)
            if self.teacher_cache is not None:  # the teacher's stored top-k for these blocks
                batch |= self.teacher_cache.batch(blocks)
            batches.append(batch)
            pos += 1
        if pos == n:
            epoch, pos = epoch + 1, 0
        dev = self.precision.device
        moved = [{**{k: v.to(dev, non_blocking=True) for k, v in b.items()},
                  "no_padding": bool(b["attention_mask"].all())}  # read on the CPU copy: no device sync
                 for b in batches]
        return moved, (epoch, pos)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimizer step (skipped on the device if any loss or gradient is non-finite).

        Returns device tensors (no host sync): each term unweighted ("kd", "lm", ...) and weighted
        ("w/kd", ...), the weighted total "loss", "grad_norm", the valid "tokens", and "skipped"
        (1.0 for a skipped step, whose other values are then 0 so interval means stay finite).
        Terms are accumulated over micro-batches with each micro-batch's share of the step's tokens,
        so they equal the terms of one big batch.
        """
        cfg, dev, info = self.cfg, self.precision.device, self.dist
        weights = self.curriculum.get_weights()  # = weights_at(steps done); stepped below, like the LR
        targets = [next_token_labels(b["labels"]) for b in micro_batches]  # (B, T) each
        counts = torch.stack([sum((t != IGNORE_INDEX).sum() for t in targets),  # next-token targets
                              sum(b["attention_mask"].sum() for b in micro_batches)]).float()  # real tokens
        num_valid, num_tokens = all_reduce_sum(counts, info)  # of the whole step, all processes
        reduce = (lambda t: all_reduce_sum(t, info)) if info.enabled else None
        need, alpha = self.needs, cfg.alpha_kd
        sums: dict[str, torch.Tensor] = {}
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        want_shares = cfg.grad_share_every > 0 and (self.state.step + 1) % cfg.grad_share_every == 0
        for i, (batch, tgt) in enumerate(zip(micro_batches, targets)):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients in the backward of the last micro-batch only
            sync = contextlib.nullcontext() if last or not info.enabled else self.model.no_sync()
            with sync:
                with phase("student forward"):
                    s_out = student_outputs(self.model, batch, self.precision, need.hidden_states, need.attentions)
                # LM is always computed and logged (the seed lost track of it), even at weight 0
                with torch.set_grad_enabled(alpha < 1.0), phase("loss: lm"):
                    terms = {"lm": lm_loss(s_out.logits, tgt, chunk_tokens=cfg.loss_chunk_tokens,
                                           num_valid=num_valid)}
                cached = "t_top" in batch
                if (alpha > 0.0 and not cached) or self.heads.weights:  # LM-only or cached: no teacher forward
                    with phase("teacher forward"):
                        t_out = teacher_outputs(self.teacher_step, batch, need.hidden_states, need.attentions)
                if alpha > 0.0 and cached:
                    with phase("loss: kd"):
                        terms["kd"] = kd_loss_topk(s_out.logits, batch["t_top"], batch["t_ids"], batch["t_tail"],
                                                   tgt != IGNORE_INDEX, temperature=cfg.temperature,
                                                   chunk_tokens=cfg.loss_chunk_tokens, num_valid=num_valid,
                                                   divergence=cfg.kd_divergence, beta=cfg.jsd_beta)
                elif alpha > 0.0:
                    with phase("loss: kd"):
                        s_kd, t_kd = self.heads.match_logits(s_out.logits, t_out.logits)
                        terms["kd"] = kd_loss(s_kd, t_kd, tgt != IGNORE_INDEX, temperature=cfg.temperature,
                                              top_k=cfg.kd_top_k, chunk_tokens=cfg.loss_chunk_tokens,
                                              num_valid=num_valid, divergence=cfg.kd_divergence, beta=cfg.jsd_beta)
                if self.heads.weights:
                    share = batch["attention_mask"].sum() / num_tokens  # this micro-batch's part of the step
                    per_batch = 1.0 / (len(micro_batches) * info.world)  # InfoNCE is a per-batch mean
                    with phase("loss: intermediate terms"):
                        heads_out = self.heads(s_out, t_out, batch["attention_mask"].bool())
                    for name, value in heads_out.items():
                        terms[name] = value * (per_batch if name == "contrastive" else share)
                scaled = self.balancer(terms, reduce) if self.balancer is not None else terms
                weighted = {k: weights[k] * v for k, v in scaled.items() if weights[k] > 0}
                total = sum(weighted.values(), torch.zeros((), device=dev))
                bad |= ~torch.isfinite(total)
                if want_shares and i == 0:
                    self.last_grad_shares = self._grad_shares(weighted)
                if total.requires_grad:
                    # DDP averages gradients over processes; each process's terms are already its
                    # part of the global mean, so undo the average to get their sum
                    with phase("backward"):
                        self.scaler.scale(total * info.world).backward()
            for name, value in {"loss": total, **terms, **{f"w/{k}": v for k, v in weighted.items()}}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        for p in self.heads.parameters():  # the heads are outside DDP: sum their gradients by hand
            if info.enabled and p.grad is not None:
                all_reduce_sum(p.grad, info)
        with phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
            found = (bad | ~torch.isfinite(grad_norm)).float()
            all_reduce_max(found, info)  # one process's nan loss skips the step everywhere
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)  # GradScaler passes its own found_inf (non-finite grads)
                self.scaler.update()
            else:
                self.optimizer.found_inf = found  # read by the fused AdamW kernel: skip the update if 1
                self.optimizer.step()
                del self.optimizer.found_inf
            self.scheduler.step()  # the learning rate and loss weights follow the step count, skipped or not
            self.curriculum.step()
            self.optimizer.zero_grad(set_to_none=True)

        self._bad_run = (self._bad_run + 1) * found
        self._max_run = torch.maximum(self._max_run, self._bad_run)
        ok = 1.0 - found
        out = {k: torch.nan_to_num(v * ok) for k, v in sums.items()}
        # which terms were non-finite (summed over the interval they name the culprit)
        nonfinite = {f"nonfinite/{k}": (~torch.isfinite(v)).float() for k, v in sums.items() if k in ALL_TERMS}
        return {**out, "grad_norm": torch.nan_to_num(grad_norm.detach().float() * ok), "tokens": num_valid * ok,
                "skipped": found, **nonfinite}

    def _grad_shares(self, weighted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each weighted term's share of the sum of per-term gradient norms on the student's weights.

        One extra backward per active term on this micro-batch, so it runs every grad_share_every steps.
        """
        params = [p for p in self.student.parameters() if p.requires_grad]
        norms = {}
        for name, value in weighted.items():
            if value.requires_grad:
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                norms[name] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None]))
        total = sum(norms.values())
        return {k: v / total for k, v in norms.items()}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "validation", **extra) -> dict[str, Any]:
        # every process evaluates the same global batches, so a torchrun run evaluates what one
        # process with the same global batch would
        batches = self.data[split].eval_batches(self.global_batch, self.cfg.eval_batches)
        metrics = evaluate(self.student, self.teacher, batches, self.precision, self.cfg.loss_chunk_tokens,
                           self.heads.match_logits)
        record = {"kind": "eval", "split": split, "step": self.state.step, **metrics, **extra}
        self._record(record)
        log.info("eval %-10s step %d | student ppl %.2f | teacher ppl %.2f | KL %.4f | top-1 agree %.3f",
                 split, self.state.step, metrics["student_ppl"], metrics["teacher_ppl"], metrics["kl"],
                 metrics["top1_agree"])
        return record

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "tokens": s.tokens,
            "skipped_steps": s.skipped_steps, "bad_in_a_row": s.bad_in_a_row,
            "history": s.history, "config": self.cfg.to_dict(),
            "curriculum": self.curriculum.state_dict(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")},
            "balancer": self.balancer.state_dict() if self.balancer is not None else {},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            # the unfinished log interval, so a resumed run logs the same means
            "interval": {k: v.detach().cpu() for k, v in self._interval.items()},
            "interval_steps": self._interval_steps,
            "interval_elapsed": time.perf_counter() - self._t_interval,
            "bad_run": self._bad_run.cpu(), "max_run": self._max_run.cpu(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self) -> Path | None:
        if not self.cfg.checkpoints:
            return None
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.out_dir, self.state.step, self.student, self.heads, self._trainer_state(),
                                   keep=self.cfg.keep_checkpoints)
        barrier(self.dist)
        return path

    def save_best(self) -> None:
        """Called by EarlyStopping at each new best evaluation: the weights to restore at the end."""
        if self.dist.is_main:
            save_best(self.out_dir, self.state.step, self.student, self.heads)

    def _restore_best(self, step: int) -> None:
        barrier(self.dist)
        load_checkpoint(best_dir(self.out_dir), self.student, self.heads, state=False)
        log.info("restored the best weights (step %d, %s %.4f)", step, self.early_stopping.monitor,
                 self.early_stopping.best)

    def _resume(self) -> None:
        path = latest_checkpoint(self.out_dir)
        ckpt = read_trainer_state(path)  # settings first: nothing is loaded into a run it does not fit
        old = ckpt["config"]
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.cfg.to_dict().items()
                   if k not in RESUMABLE_CHANGES and old.get(k) != v]
        if changed:
            raise KDLabError(f"cannot resume from {path}: the run's settings changed ({'; '.join(changed)})")
        load_checkpoint(path, self.student, self.heads, state=False)
        dev = self.precision.device
        if self.balancer is not None:
            self.balancer.load_state_dict(ckpt["balancer"], dev)
        self.curriculum.load_state_dict(ckpt["curriculum"])
        for cb in self.callbacks:
            if hasattr(cb, "load_state_dict") and type(cb).__name__ in ckpt["callbacks"]:
                cb.load_state_dict(ckpt["callbacks"][type(cb).__name__])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self._interval = {k: v.to(dev) for k, v in ckpt["interval"].items()}
        self._interval_steps = ckpt["interval_steps"]
        self._interval_elapsed = ckpt["interval_elapsed"]  # so the resumed interval's tokens/s stays right
        self._bad_run, self._max_run = ckpt["bad_run"].to(dev), ckpt["max_run"].to(dev)
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        s = self.state
        s.step, s.epoch, s.batch_in_epoch, s.tokens = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["tokens"]
        s.skipped_steps, s.bad_in_a_row = ckpt["skipped_steps"], ckpt["bad_in_a_row"]
        s.history = ckpt["history"]
        # the metrics file may hold records written after this checkpoint: rewrite it from history
        if self.dist.is_main:
            tmp = self.out_dir / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in s.history))
            os.replace(tmp, self.out_dir / "metrics.jsonl")
        log.info("resumed from %s (step %d of %d)", path, s.step, self.total_steps)

    def save_final(self) -> Path:
        """The trained student (+ tokenizer) as a plain HF folder: out_dir/final."""
        final, tmp = self.out_dir / "final", self.out_dir / ".final.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            self.student.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        barrier(self.dist)
        return final

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        with quiet_hf_progress():
            return self._fit()

    def _fit(self) -> TrainState:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg, s = self.cfg, self.state
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        barrier(self.dist)
        if cfg.resume:
            self._resume()
        elif self.dist.is_main:
            (self.out_dir / "metrics.jsonl").write_text("")
            shutil.rmtree(best_dir(self.out_dir), ignore_errors=True)  # a fresh run's best is its own
        epochs_note = f"{self.total_steps / self.steps_per_epoch:.2f} epochs of {self.steps_per_epoch} steps"
        log.info("training %d optimizer steps (%s; %s), %d tokens per step%s, out_dir=%s", self.total_steps,
                 "max_steps" if cfg.max_steps > 0 else f"epochs={cfg.epochs}", epochs_note,
                 self.global_batch * cfg.grad_accum * cfg.seq_len,
                 f" over {self.dist.world} processes" if self.dist.enabled else "", self.out_dir)
        if self.curriculum.ramps and self.heads.weights:
            log.info("curriculum %s: %s", cfg.curriculum, "; ".join(
                f"{k} {r.start:.0%}-{r.end:.0%} {r.shape}" for k, r in self.curriculum.ramps.items()
                if k in self.curriculum.max_weights))
        self._emit("on_train_begin")
        if s.step == 0 and not s.evals("validation"):
            self.evaluate("validation")  # "student before" for the summary table
        self._t_interval = time.perf_counter() - self._interval_elapsed
        widget_bar = any(getattr(cb, "shows_progress", False) and getattr(cb, "use_widgets", False)
                         for cb in self.callbacks)  # a live plot shows the progress already
        self._bar = bar = tqdm(total=self.total_steps, initial=s.step, desc="distilling", unit="step",
                               dynamic_ncols=True, disable=not self.dist.is_main or widget_bar or _tqdm_off())
        try:
            with logging_redirect_tqdm():
                while s.step < self.total_steps and not s.should_stop:
                    self.step()
                bar.close()
                last_val = s.evals("validation")[-1]
                if last_val["step"] != s.step:
                    self.evaluate("validation")
                es, restored = self.early_stopping, {}
                barrier(self.dist)  # rank 0's last save_best is complete before anyone looks
                if (es is not None and cfg.restore_best and es.best_step is not None and es.best_step != s.step
                        and best_dir(self.out_dir).exists()):
                    self._restore_best(es.best_step)
                    restored = {"restored_from": es.best_step}
                    self.evaluate("validation", **restored)
                self.evaluate("test", **restored)
                self.save()
                self.save_final()
        except KeyboardInterrupt:
            bar.close()
            s.interrupted = True
            if self._interval_steps:  # the steps since the last log line, so the history is complete
                self._log_interval(time.perf_counter() - self._t_interval, bar)
                self._t_interval = time.perf_counter()
            path = self.save()
            if not cfg.checkpoints:
                log.warning("interrupted at step %d; no checkpoint written (checkpoints=false)", s.step)
            else:
                log.warning("interrupted at step %d; checkpoint %s; continue with --resume", s.step, path)
        self._emit("on_train_end")
        return s

    def step(self) -> None:
        """One iteration of fit()'s loop: the next batches, `train_step`, the step's bookkeeping, and
        the log line, evaluation and checkpoint when they are due."""
        cfg, s = self.cfg, self.state
        batches, cursor = self._next_micro_batches()
        out = self.train_step(batches)
        s.step += 1
        s.epoch, s.batch_in_epoch = cursor
        if self._bar is not None:
            self._bar.update(1)
        for k, v in out.items():  # accumulate on the device: no per-step host sync
            self._interval[k] = self._interval.get(k, 0.0) + v
        self._interval_steps += 1
        if cfg.log_style == "seed-verbose":
            self._seed_verbose(out)
        if s.step <= cfg.log_first or s.step % cfg.log_every == 0 or s.step == self.total_steps:
            self._log_interval(time.perf_counter() - self._t_interval, self._bar)
            self._t_interval = time.perf_counter()
        if cfg.eval_every and s.step % cfg.eval_every == 0 and s.step < self.total_steps:
            self.evaluate("validation")
            self._agree_on_stop()
        if cfg.save_every and s.step % cfg.save_every == 0 and s.step < self.total_steps:
            self.save()

    # ------------------------------------------------------------------ logging
    def _log_interval(self, seconds: float, bar) -> None:
        """One record (and one log line) of the interval's means: the only host sync between lines."""
        acc, n = self._interval, self._interval_steps
        self._interval, self._interval_steps = {}, 0
        extra = {f"share/{k}": v for k, v in self.last_grad_shares.items()}
        for layer, stats in enumerate(self.heads.last_router_stats):
            extra[f"router{layer}/entropy"] = stats["entropy"]
            extra |= {f"router{layer}/util{e}": u for e, u in enumerate(stats["utilisation"])}
        keys = [*acc, *extra, "_bad_run", "_max_run"]
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).to("cpu") for v in
                              [*acc.values(), *extra.values(), self._bad_run, self._max_run]]).tolist()  # one sync
        vals = dict(zip(keys, values))
        self._max_run = torch.zeros_like(self._max_run)
        s = self.state
        skipped = int(vals["skipped"])
        s.skipped_steps += skipped
        s.bad_in_a_row = int(vals["_bad_run"])
        s.tokens += int(vals["tokens"])
        good = n - skipped
        if skipped:
            culprits = ", ".join(f"{k[10:]} in {int(v)}" for k, v in vals.items() if k.startswith("nonfinite/") and v)
            log.warning("step %d: %d of the last %d steps skipped for a non-finite loss or gradient (%s)",
                        s.step, skipped, n, culprits or "gradients")
        if int(vals["_max_run"]) >= self.cfg.max_nonfinite_steps:
            s.should_stop, s.failed = True, True
            s.stop_reason = f"{int(vals['_max_run'])} non-finite steps in a row (max_nonfinite_steps)"
            log.error("stopping: %s", s.stop_reason)
        self._agree_on_stop()
        if good == 0:
            return  # nothing trained in this interval: no means to report
        reduce = [k for k in acc if k not in ("skipped", "tokens") and not k.startswith("nonfinite/")]
        if self.dist.enabled:  # each process holds its part of every global mean: add them up
            t = torch.tensor([vals[k] for k in reduce], dtype=torch.float64, device=self.precision.device)
            vals.update(zip(reduce, all_reduce_sum(t, self.dist).tolist()))
            vals["grad_norm"] /= self.dist.world  # the same on every process: a mean, not a sum
        means = {k: vals[k] / good for k in reduce}
        tokens = vals["tokens"]
        record = {"kind": "train", "step": s.step, "epoch": s.epoch, "steps": n,
                  **{k: v for k, v in means.items() if not k.startswith("w/")},
                  "weighted": {k[2:]: v for k, v in means.items() if k.startswith("w/")},
                  "weights": self.curriculum.weights_at(s.step - 1),
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(seconds, 1e-9),
                  "interval_s": seconds,
                  "skipped_steps": s.skipped_steps, "skipped_in_interval": skipped}
        if self.precision.device.type == "cuda":  # the allocator's own counter: no device sync
            record["peak_mem_mib"] = torch.cuda.max_memory_allocated(self.precision.device) / 2**20
        if any(k.startswith("share/") for k in vals):
            record["grad_share"] = {k[6:]: v for k, v in vals.items() if k.startswith("share/")}
        if self.heads.last_router_stats:
            record["router"] = [
                {"entropy": vals[f"router{layer}/entropy"],
                 "utilisation": [vals[f"router{layer}/util{e}"] for e in range(len(stats["utilisation"]))]}
                for layer, stats in enumerate(self.heads.last_router_stats)]
        self.last_grad_shares = {}
        self._record(record)
        terms = " | ".join(f"{k} {record[k]:.4f}" for k in ALL_TERMS if k in record)
        active = {k: w for k, w in record["weights"].items() if k not in ("kd", "lm")}
        log.info("step %d/%d | loss %.4f | %s | lr %.2e | grad-norm %.3f | %.0f tok/s%s%s",
                 s.step, self.total_steps, record["loss"], terms, record["lr"], record["grad_norm"],
                 record["tokens_per_s"], f" | skipped {s.skipped_steps}" if s.skipped_steps else "",
                 (" | weights " + " ".join(f"{k} {w:.3f}" for k, w in active.items())) if active else "")
        if "router" in record:
            log.info("  router utilisation: %s", "; ".join(
                "layer %d [%s] H=%.2f" % (i, " ".join(f"{u:.2f}" for u in r["utilisation"]), r["entropy"])
                for i, r in enumerate(record["router"])))
        if "grad_share" in record:
            log.info("  grad-norm share: %s", ", ".join(f"{k} {v:.2f}" for k, v in record["grad_share"].items()))
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}")

    def _seed_verbose(self, out: dict[str, torch.Tensor]) -> None:
        """The seed's logging, kept to measure its cost: 36 printed lines per step, each number read
        with .item() (a host sync on CUDA), as the seed's prints did."""
        if not self.dist.is_main:
            return
        s, w = self.state, self.curriculum.weights_at(self.state.step - 1)
        zero = torch.zeros(())
        p = lambda line: print(line, file=sys.stdout)
        p("=" * 60)
        p(f"[CURRICULUM] Step {s.step}, Progress {100 * s.step / self.total_steps:.1f}%")
        for k in ALL_TERMS:
            p(f"  {k:<12} weight={torch.tensor(w.get(k, 0.0)).item():.4f}")
        p("=" * 60)
        for k in ALL_TERMS:
            raw, weighted = out.get(k, zero).item(), out.get(f"w/{k}", zero).item()
            p(f"[{k.upper()}] raw: {raw:.6f}")
            p(f"[{k.upper()}] weighted: {weighted:.6f}")
            p(f"[{k.upper()}] finite: {bool(torch.isfinite(out.get(k, zero)).item())}")
        p(f"[LM] Raw: {out['lm'].item():.4f}, Weight: {w.get('lm', 0.0):.3f}")
        p(f"[TOTAL] Loss: {out['loss'].item():.4f}, Components: {sum(1 for k in ALL_TERMS if k in out)}")
        p(f"[GRAD] norm: {out['grad_norm'].item():.4f}")
        p(f"[LR] {self.scheduler.get_last_lr()[0]:.3e}")
        p(f"[TOKENS] {int(out['tokens'].item())}")
        p(f"[SKIP] {int(out['skipped'].item())}")
        p(f"[DTYPE] teacher={self.precision.teacher_dtype} student=fp32")
        mem = torch.cuda.max_memory_allocated() / 2**20 if self.precision.device.type == "cuda" else float("nan")
        p(f"[MEM] peak allocated: {mem:.0f} MiB")
        p("-" * 60)


def train(cfg: KDConfig, callbacks=()) -> TrainState:
    """Build everything from `cfg` and run it; the function behind `kdlab train`."""
    return Trainer.from_config(cfg, callbacks).fit()


__all__ = ["Trainer", "TrainState", "train"]
