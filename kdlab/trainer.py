"""The distillation loop: one straight-through `fit()`, callbacks, resumable state.

    cfg = kdlab.load_config(overrides={"max_steps": 20})
    trainer = kdlab.Trainer.from_config(cfg)
    state = trainer.fit()            # history of train/eval records; Ctrl-C returns it too
    print(kdlab.format_summary(state.history))

The trainer wires three seams together and owns the loop and the optimizer:
    batches     a BatchSource (kdlab.batches): each step's micro-batches and its data position
    objective   an Objective (kdlab.objective): forwards, every loss term, weights, the total
    callbacks   Callback objects (kdlab.callbacks): the progress bar, early stopping, the best
                weights, live plots; each owns its state (checkpointed under its state_key) and
                stops a run through `trainer.state.should_stop`

Per optimizer step, `grad_accum` micro-batches; every term is a part of the step's per-token mean
over the whole accumulated (and all-process) batch, so accumulation and torchrun are exact. Values
stay on the device between log lines (kdlab.metrics: no host sync in a step), and a non-finite loss
or gradient makes the fused AdamW skip its update on the device (`found_inf`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .batches import BatchSource
from .callbacks import check_state_keys, default_callbacks, fire
from .checkpoint import resume_run, run_state, save_checkpoint
from .components import batches_for_run, build_components, check_positions, objective_for_run, quiet_hf_progress
from .config import KDConfig
from .data import PackedSplit
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, broadcast_object, init_from_env
from .errors import KDLabError
from .evaluation import TeacherEvalCache, evaluate
from .metrics import IntervalMetrics, log_run_start, log_train_record, train_record
from .objective import Objective, StepCounts, phase
from .payoff import token_bytes
from .precision import Precision
from .run_folder import open_run_folder, save_final, save_student_record
from .schedule import lr_scheduler
from .state import TrainState
from .terms import display_order

log = logging.getLogger("kdlab")

# fields that may differ between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = frozenset(
    "resume overwrite out_dir log_every log_first log_style eval_every eval_batches save_every keep_checkpoints "
    "checkpoints compile".split()
)


class Trainer:
    def __init__(
        self,
        cfg: KDConfig,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        data: dict[str, PackedSplit],
        precision: Precision,
        tokenizer=None,
        callbacks=(),
        *,
        batches: BatchSource | None = None,
        objective: Objective | None = None,
    ):
        self.cfg, self.student, self.teacher, self.data = cfg, student, teacher, data
        self.precision, self.tokenizer = precision, tokenizer
        self.dist: DistInfo = init_from_env(precision.device.type)
        self.state, self.out_dir = TrainState(), Path(cfg.out_dir)
        self._eval_caches: dict[str, TeacherEvalCache] = {}  # split -> the teacher's logits there
        # UTF-8 bytes per token id: evaluations report bits per byte too (kdlab.payoff)
        self.token_bytes = token_bytes(tokenizer) if tokenizer is not None else None
        if not self.dist.is_main:  # only rank 0 talks
            log.setLevel(logging.WARNING)
        check_positions(cfg.seq_len, teacher, student)
        self.batches = batches or batches_for_run(cfg, data["train"], tokenizer, student, teacher, precision, self.dist)
        if cfg.max_steps <= 0 and not self.batches.steps_per_epoch:
            raise KDLabError("max_steps=-1 (train `epochs`) needs a batch source with epochs; set max_steps")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.batches.steps_per_epoch
        self.objective = objective or objective_for_run(cfg, student, teacher, self.total_steps)
        if self.objective.needs.attentions:  # attention maps exist only in eager attention
            for model in (student, teacher):
                model.set_attn_implementation("eager")
        # DDP averages the student's gradients across processes; the heads are small and all-reduced
        # by hand (their parameters are unused while a ramp holds their weight at 0)
        self.model, self.teacher_step = student, teacher
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [precision.device.index] if precision.device.type == "cuda" else None
            self.model = DistributedDataParallel(student, device_ids=ids)
        if cfg.compile:  # compiled forwards for the training step only; evaluation runs eager
            self.model, self.teacher_step = torch.compile(self.model), torch.compile(teacher)
        # AdamW with decay on matrices only (not norms/biases), as in nanoGPT. Fused (CPU and CUDA):
        # one kernel, and it takes `found_inf`, which skips a step on the device without a host sync.
        self.trainable = [p for p in student.parameters() if p.requires_grad] + list(self.objective.heads.parameters())
        groups = [
            {"params": [p for p in self.trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in self.trainable if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
        self.scheduler = lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.needs_grad_scaler)
        self.metrics = IntervalMetrics(precision.device, self.dist)
        self.callbacks = [*callbacks, *default_callbacks(cfg, list(callbacks))]
        check_state_keys(self.callbacks)
        self._metrics_file: Path | None = None  # written while fit() runs

    @classmethod
    def from_config(cls, cfg: KDConfig, callbacks=(), **seams) -> Trainer:
        """Load teacher, tokenizer and data, build the student: everything `kdlab train` does."""
        with quiet_hf_progress():
            precision, tokenizer, teacher, data, student = build_components(cfg)
        return cls(cfg, student, teacher, data, precision, tokenizer, callbacks, **seams)

    def callback(self, kind: type) -> Any | None:
        """The callback of exactly type `kind` (e.g. the EarlyStopping the config built), else the
        first instance of a subclass, else None."""
        exact = [cb for cb in self.callbacks if type(cb) is kind]
        return (exact or [cb for cb in self.callbacks if isinstance(cb, kind)] or [None])[0]

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimizer step (skipped on the device if any loss or gradient is non-finite).

        Returns device tensors (no host sync): each term unweighted ("kd", "lm", ...) and weighted
        ("w/kd", ...), the weighted total "loss", "grad_norm", the valid "tokens", and "skipped"
        (1.0 for a skipped step, whose other values are then 0 so interval means stay finite).
        """
        cfg, info, obj = self.cfg, self.dist, self.objective
        counts = StepCounts.of(micro_batches, info.world, lambda t: all_reduce_sum(t, info))
        reduce = (lambda t: all_reduce_sum(t, info)) if info.enabled else None
        weights = obj.weights()  # = weights_at(steps done); stepped below, like the LR
        want_shares = cfg.grad_share_every > 0 and (self.state.step + 1) % cfg.grad_share_every == 0
        sums: dict[str, torch.Tensor] = {}
        term_names: set[str] = set()  # as the objective named them (an on-policy step's are "gen/<term>")
        bad = torch.zeros((), dtype=torch.bool, device=self.precision.device)
        for i, batch in enumerate(micro_batches):
            # DDP all-reduces gradients in the backward of the last micro-batch only
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or not info.enabled else self.model.no_sync():
                loss = obj.loss(self.model, self.teacher_step, batch, self.precision, counts, weights, reduce)
                bad |= ~torch.isfinite(loss.total)
                if want_shares and i == 0:  # kept by the objective for the next log line
                    obj.grad_shares(loss.weighted, [p for p in self.student.parameters() if p.requires_grad])
                if loss.total.requires_grad:
                    # DDP averages gradients over processes; each process's terms are already its
                    # part of the global mean, so undo the average to get their sum
                    with phase("backward"):
                        self.scaler.scale(loss.total * info.world).backward()
            term_names |= loss.terms.keys()
            for name, value in {
                "loss": loss.total,
                **loss.terms,
                **{f"w/{k}": v for k, v in loss.weighted.items()},
            }.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        for p in obj.heads.parameters():  # the heads are outside DDP: sum their gradients by hand
            if info.enabled and p.grad is not None:
                all_reduce_sum(p.grad, info)
        with phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
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
            obj.step()
            self.optimizer.zero_grad(set_to_none=True)
        ok = 1.0 - found
        # which terms were non-finite (summed over the interval they name the culprit)
        nonfinite = {f"nonfinite/{k}": (~torch.isfinite(v)).float() for k, v in sums.items() if k in term_names}
        return {
            **{k: torch.nan_to_num(v * ok) for k, v in sums.items()},
            "grad_norm": torch.nan_to_num(grad_norm.detach().float() * ok),
            "tokens": counts.num_valid * ok,
            "skipped": found,
            **nonfinite,
        }

    def step(self) -> None:
        """One iteration of fit()'s loop: the next batches, `train_step`, then the log line, the
        evaluation and the checkpoint when they are due."""
        cfg, s = self.cfg, self.state
        position = self.batches.state_dict()
        try:
            out = self.train_step(self.batches.next_step())
        except BaseException:  # an unfinished step trained nothing: a resumed run trains its data
            self.batches.load_state_dict(position)
            raise
        s.step += 1
        self.metrics.add(out)  # on the device: no per-step host sync
        fire(self.callbacks, "on_step_end", self, out)
        if s.step <= cfg.log_first or s.step % cfg.log_every == 0 or s.step == self.total_steps:
            self._log_interval()
        if cfg.eval_every and s.step % cfg.eval_every == 0 and s.step < self.total_steps:
            self.evaluate("validation")
            self._agree_on_stop()
        if cfg.save_every and s.step % cfg.save_every == 0 and s.step < self.total_steps:
            self.save()

    # ------------------------------------------------------------------ records
    def _record(self, record: dict[str, Any]) -> None:
        if self._metrics_file is None:  # outside fit(): a measurement, not part of the run
            return
        self.state.history.append(record)
        if self.dist.is_main:
            with open(self._metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        fire(self.callbacks, "on_eval" if record["kind"] == "eval" else "on_log", self, record)

    def _agree_on_stop(self) -> None:
        """Rank 0 decides whether to stop, so processes never disagree (and deadlock)."""
        s = self.state
        s.should_stop, s.stop_reason, s.failed = broadcast_object((s.should_stop, s.stop_reason, s.failed), self.dist)

    def _log_interval(self) -> None:
        """One train record (and log line) of the interval's means: the only host sync between lines."""
        s, obj = self.state, self.objective
        iv = self.metrics.read(obj.diagnostics())  # grad shares (when measured) and router statistics
        s.skipped_steps, s.bad_in_a_row = s.skipped_steps + iv.skipped, iv.bad_run
        s.tokens += int(iv.sums["tokens"])
        if iv.skipped:
            culprits = ", ".join(
                f"{k[10:]} in {int(v)}" for k, v in iv.sums.items() if k.startswith("nonfinite/") and v
            )
            log.warning(
                "step %d: %d of the last %d steps skipped for a non-finite loss or gradient (%s)",
                s.step,
                iv.skipped,
                iv.steps,
                culprits or "gradients",
            )
        if iv.max_run >= self.cfg.max_nonfinite_steps:
            s.should_stop, s.failed = True, True
            s.stop_reason = f"{iv.max_run} non-finite steps in a row (max_nonfinite_steps)"
            log.error("stopping: %s", s.stop_reason)
        self._agree_on_stop()
        if iv.trained == 0:
            return  # nothing trained in this interval: no means to report
        record = train_record(
            iv,
            self.metrics.means(iv),
            step=s.step,
            fields=self.batches.log_fields(),
            weights=obj.curriculum.weights_at(s.step - 1),
            lr=self.scheduler.get_last_lr()[0],
            skipped_steps=s.skipped_steps,
            device=self.precision.device,
        )
        self._record(record)
        log_train_record(record, self.total_steps, tuple(t for t in display_order() if t in obj.terms))

    def evaluate(self, split: str = "validation", **extra) -> dict[str, Any]:
        """Evaluate the student on `split` (the first eval_batches global batches, the same every time).
        During fit() the record joins the run's history and callbacks; before it, it is only returned."""
        # every process evaluates the same global batches, so a torchrun run evaluates what one
        # process with the same global batch would
        batches = self.data[split].eval_batches(self.cfg.batch_size * self.dist.world, self.cfg.eval_batches)
        # the same batches every time and a frozen teacher: its logits are computed once per split,
        # within one budget for all splits (validation, evaluated most often, asks first)
        if split not in self._eval_caches:
            left = self.cfg.eval_cache_mb * 2**20 - sum(c.bytes for c in self._eval_caches.values())
            self._eval_caches[split] = TeacherEvalCache(max(0, left))
        cache = self._eval_caches[split]
        metrics = evaluate(
            self.student,
            self.teacher,
            batches,
            self.precision,
            self.cfg.loss_chunk_tokens,
            self.objective.match_logits,
            teacher_cache=cache,
            token_bytes=self.token_bytes,
        )
        record = {"kind": "eval", "split": split, "step": self.state.step, **metrics, **extra}
        self._record(record)
        log.info(
            "eval %-10s step %d | student ppl %.2f | teacher ppl %.2f | KL %.4f | top-1 agree %.3f",
            split,
            self.state.step,
            metrics["student_ppl"],
            metrics["teacher_ppl"],
            metrics["kl"],
            metrics["top1_agree"],
        )
        return record

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """A resumable checkpoint of the whole run (kdlab.checkpoint), unless checkpoints=false."""
        if not self.cfg.checkpoints:
            return None
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.out_dir,
                self.state.step,
                self.student,
                self.objective.heads,
                run_state(self),
                keep=self.cfg.keep_checkpoints,
            )
        barrier(self.dist)
        return path

    def _resume(self) -> None:
        log.info(
            "resumed from %s (step %d of %d)", resume_run(self, RESUMABLE_CHANGES), self.state.step, self.total_steps
        )

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg, s = self.cfg, self.state
        with quiet_hf_progress():
            self._metrics_file = open_run_folder(cfg, self.dist, self._resume, lambda: self.state.history)
            if not cfg.resume:
                save_student_record(self.out_dir, self.student, self.dist)
            log_run_start(self)
            fire(self.callbacks, "on_train_begin", self)
            if s.step == 0 and not s.evals("validation"):
                self.evaluate("validation")  # "student before" for the summary table
            self.metrics.start_clock()
            try:
                with logging_redirect_tqdm():
                    while s.step < self.total_steps and not s.should_stop:
                        self.step()
                    if self.metrics.steps:  # stopped between log lines: their record, so the history is complete
                        self._log_interval()
                    if s.evals("validation")[-1]["step"] != s.step:
                        self.evaluate("validation")
                    fire(self.callbacks, "on_loop_end", self)  # BestWeights puts the best weights back here
                    restored = {"restored_from": s.restored_from} if s.restored_from is not None else {}
                    self.evaluate("test", **restored)
                    self.save()
                    save_final(self.out_dir, self.student, self.tokenizer, self.dist)
            except KeyboardInterrupt:
                s.interrupted = True
                if self.metrics.steps:  # the steps since the last log line, so the history is complete
                    self._log_interval()
                path = self.save()
                log.warning(
                    "interrupted at step %d; %s",
                    s.step,
                    f"checkpoint {path}; continue with --resume"
                    if path
                    else "no checkpoint written (checkpoints=false)",
                )
            fire(self.callbacks, "on_train_end", self)
            self._metrics_file = None
        return s


def train(cfg: KDConfig, callbacks=()) -> TrainState:
    """Build everything from `cfg` and run it; the function behind `kdlab train`."""
    return Trainer.from_config(cfg, callbacks).fit()


__all__ = ["Trainer", "TrainState", "train", "default_callbacks"]
