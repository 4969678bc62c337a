"""The distillation loop: one straight-through `fit()`, callbacks, resumable state.

    cfg = kdlab.load_config(overrides={"max_steps": 20})
    trainer = kdlab.build_trainer(cfg)  # kdlab.build: the config made into parts, handed to Trainer
    state = trainer.fit()               # history of train/eval records; Ctrl-C returns it too
    print(kdlab.format_summary(state.history))

The trainer takes built parts (it never reads the config to choose them) and owns the loop, the
optimizer and the run's state:
    batches     a BatchSource (kdlab.data.batches): each step's micro-batches and its data position
    objective   an Objective (kdlab.loss.objective): forwards, every loss term, weights, the total
    callbacks   Callback objects (kdlab.training.callbacks): the progress bar, early stopping, the best
                weights, live plots; each owns its state (checkpointed under its state_key) and
                stops a run through `trainer.state.should_stop`
    engine      an Engine (kdlab.training.engine): one process, DDP or FSDP2; every question about the
                other processes goes to it

Per optimizer step, `grad_accum` micro-batches; every term is a part of the step's per-token mean
over the whole accumulated (and all-process) batch, so accumulation and torchrun are exact. Values
stay on the device between log lines (kdlab.training.metrics: no host sync in a step), and a non-finite loss
or gradient makes the fused AdamW skip its update on the device (`found_inf`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdlab.data.batches import BatchSource
from kdlab.data.corpus import PackedSplit
from kdlab.errors import KDLabError
from kdlab.loss.objective import Objective, StepCounts, phase
from kdlab.loss.terms import display_order
from kdlab.models import check_positions
from kdlab.payoff import token_bytes
from kdlab.precision import Precision
from kdlab.quiet import quiet_hf_progress
from kdlab.training.callbacks import check_state_keys, fire, has_state, state_key_of
from kdlab.training.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from kdlab.training.engine import Engine, engine_from_env
from kdlab.training.evaluation import TeacherEvalCache, evaluate
from kdlab.training.metrics import IntervalMetrics, log_run_start, log_train_record, train_record
from kdlab.training.run_folder import open_run_folder, save_final, save_student_record
from kdlab.training.schedule import lr_scheduler
from kdlab.training.state import TrainState

if TYPE_CHECKING:
    from kdlab.config import KDConfig

log = logging.getLogger("kdlab")

# fields that may differ between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = frozenset(
    "resume overwrite out_dir log_every log_first eval_every eval_batches save_every keep_checkpoints "
    "checkpoints compile distributed".split()
)


# trainer_state.pt's layout: 2 = the optimizer's state keyed by parameter name (kdlab.training.engine)
STATE_FORMAT = 2


def refuse_unsupported(cfg: KDConfig, engine: Engine, objective: Objective, precision: Precision) -> None:
    """One clear line, before any model is wrapped, for what FSDP2 does not run."""
    if engine.kind != "fsdp2":
        return
    why = [
        # each process generates its own continuations, whose lengths differ: the layers' all-gathers
        # would fall out of step
        (cfg.on_policy > 0, "on-policy distillation (on_policy > 0)"),
        # the fused loss reads the teacher's whole output weight every step, and FSDP2 shards it
        (bool(cfg.teacher_cache) and cfg.teacher_cache_kind == "hidden", "a hidden-state teacher cache"),
        # each term's own gradient is taken on the parameters, which FSDP2 holds as shards
        (cfg.grad_share_every > 0, "gradient shares (grad_share_every > 0)"),
        # the loss scaler unscales the sharded and the heads' plain gradients in one call
        (
            precision.needs_grad_scaler and len(list(objective.heads.parameters())) > 0,
            "float16 autocast with trainable heads (their gradients and the student's are unscaled together)",
        ),
    ]
    for failed, what in why:
        if failed:
            raise KDLabError(f"distributed='fsdp2' does not run {what}; use distributed='ddp'")


def total_steps(cfg: KDConfig, batches: BatchSource) -> int:
    """The run's optimizer steps: max_steps, or `epochs` passes over the batch source's data."""
    if cfg.max_steps <= 0 and not batches.steps_per_epoch:
        raise KDLabError("max_steps=-1 (train `epochs`) needs a batch source with epochs; set max_steps")
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * batches.steps_per_epoch


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
        batches: BatchSource,
        objective: Objective,
        engine: Engine | None = None,
    ):
        """Built parts (kdlab.build.build_trainer makes them from a config): the callbacks are all
        the run's, the defaults the config asks for included."""
        self.cfg, self.student, self.teacher, self.data = cfg, student, teacher, data
        self.precision, self.tokenizer = precision, tokenizer
        self.batches, self.objective = batches, objective
        self.engine = engine or engine_from_env(precision.device.type, cfg.distributed)
        self.state, self.out_dir = TrainState(), Path(cfg.out_dir)
        self._eval_caches: dict[str, TeacherEvalCache] = {}  # split -> the teacher's logits there
        # UTF-8 bytes per token id: evaluations report bits per byte too (kdlab.payoff)
        self.token_bytes = token_bytes(tokenizer) if tokenizer is not None else None
        if not self.engine.is_main:  # only rank 0 talks
            log.setLevel(logging.WARNING)
        check_positions(cfg.seq_len, teacher, student)
        refuse_unsupported(cfg, self.engine, objective, precision)
        self.total_steps = total_steps(cfg, batches)
        if self.objective.needs.attentions:  # attention maps exist only in eager attention
            for model in (student, teacher):
                model.set_attn_implementation("eager")
        self.model, self.teacher_step = self.engine.wrap(student, teacher, precision.device)
        if cfg.compile:  # compiled forwards for the training step only; evaluation runs eager
            self.model, self.teacher_step = torch.compile(self.model), torch.compile(self.teacher_step)
        # AdamW with decay on matrices only (not norms/biases), as in nanoGPT. Fused (CPU and CUDA):
        # one kernel, and it takes `found_inf`, which skips a step on the device without a host sync.
        # The heads get groups of their own: under FSDP2 the student's parameters are DTensors, and
        # the fused kernel takes one kind of tensor per group.
        self.student_params = [p for p in student.parameters() if p.requires_grad]
        head_params = list(self.objective.heads.parameters())
        groups = [
            group
            for params in (self.student_params, head_params)
            for group in (
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            )
            if group["params"]
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
        # the parameters the optimizer steps, by name (its checkpointed state is keyed by these)
        self._trained = torch.nn.ModuleDict({"student": student, "heads": self.objective.heads})
        self.scheduler = lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.needs_grad_scaler)
        self.metrics = IntervalMetrics(precision.device, self.engine)
        self.callbacks = list(callbacks)
        check_state_keys(self.callbacks)
        self._metrics_file: Path | None = None  # written while fit() runs

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
        cfg, engine, obj = self.cfg, self.engine, self.objective
        counts = StepCounts.of(micro_batches, engine.world, engine.all_reduce_sum)
        reduce = engine.all_reduce_sum if engine.launched else None
        weights = obj.weights()  # = weights_at(steps done); stepped below, like the LR
        want_shares = cfg.grad_share_every > 0 and (self.state.step + 1) % cfg.grad_share_every == 0
        sums: dict[str, torch.Tensor] = {}
        term_names: set[str] = set()  # as the objective named them (an on-policy step's are "gen/<term>")
        bad = torch.zeros((), dtype=torch.bool, device=self.precision.device)
        for i, batch in enumerate(micro_batches):
            # gradients are reduced over processes in the backward of the last micro-batch only
            with engine.sync_context(self.model, last=i == len(micro_batches) - 1):
                loss = obj.loss(self.model, self.teacher_step, batch, self.precision, counts, weights, reduce)
                bad |= ~torch.isfinite(loss.total)
                if want_shares and i == 0:  # kept by the objective for the next log line
                    obj.grad_shares(loss.weighted, self.student_params)
                if loss.total.requires_grad:
                    # each process's terms are already its part of the global mean; the engine's
                    # scale undoes the processes' gradient average (1 in a single process)
                    with phase("backward"):
                        self.scaler.scale(loss.total * engine.loss_scale).backward()
            term_names |= loss.terms.keys()
            for name, value in {
                "loss": loss.total,
                **loss.terms,
                **{f"w/{k}": v for k, v in loss.weighted.items()},
            }.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        engine.sync_heads(obj.heads)  # the heads are outside DDP/FSDP: their gradients averaged by hand
        with phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = engine.clip_grad_norm(self.student_params, list(obj.heads.parameters()), max_norm)
            found = (bad | ~torch.isfinite(grad_norm)).float()
            engine.all_reduce_max(found)  # one process's nan loss skips the step everywhere
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
        if cfg.save_every and s.step % cfg.save_every == 0 and s.step < self.total_steps:
            self.save()
        # after every hook of the step (on_step_end, on_log, on_eval) had its say: a callback's decision
        # on one process stops all of them, or the others would wait in the next collective for ever
        self._agree_on_stop()

    # ------------------------------------------------------------------ records
    def _record(self, record: dict[str, Any]) -> None:
        if self._metrics_file is None:  # outside fit(): a measurement, not part of the run
            return
        self.state.history.append(record)
        if self.engine.is_main:
            with open(self._metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        fire(self.callbacks, "on_eval" if record["kind"] == "eval" else "on_log", self, record)

    def _agree_on_stop(self) -> None:
        """Rank 0 decides whether to stop, so processes never disagree (and deadlock)."""
        s = self.state
        s.should_stop, s.stop_reason, s.failed = self.engine.broadcast_object((s.should_stop, s.stop_reason, s.failed))

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
        batches = self.data[split].eval_batches(self.cfg.batch_size * self.engine.world, self.cfg.eval_batches)
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
            pair=getattr(self.objective, "pair", None),  # two tokenizers: the teacher reads its own tokens
        )
        record = {"kind": "eval", "split": split, "step": self.state.step, **metrics, **extra}
        self._record(record)
        # two tokenizers: perplexities are per different tokens, so bits per byte compare the models
        unit, fmt = ("bpb", ".4f") if "aligned" in metrics else ("ppl", ".2f")
        log.info(
            "eval %-10s step %d | student %s %s | teacher %s %s | KL %.4f | top-1 agree %.3f",
            split,
            self.state.step,
            unit,
            format(metrics[f"student_{unit}"], fmt),
            unit,
            format(metrics[f"teacher_{unit}"], fmt),
            metrics["kl"],
            metrics["top1_agree"],
        )
        return record

    # ------------------------------------------------------------------ run state and checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs to continue exactly (collective
        under FSDP2: the optimizer's state is gathered from every process)."""
        s = self.state
        return {
            "step": s.step,
            "tokens": s.tokens,
            "skipped_steps": s.skipped_steps,
            "bad_in_a_row": s.bad_in_a_row,
            "history": s.history,
            "format": STATE_FORMAT,
            "config": self.cfg.to_dict(),
            "world": self.engine.world,
            "objective": self.objective.state_dict(),
            "batches": self.batches.state_dict(),
            "callbacks": {state_key_of(cb): cb.state_dict() for cb in self.callbacks if has_state(cb)},
            "optimizer": self.engine.optimizer_state_dict(self._trained, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "metrics": self.metrics.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            # this process's device only: a run may resume on another number of GPUs
            "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The counterpart of `state_dict` (the weights are loaded by kdlab.training.checkpoint)."""
        self.objective.load_state_dict(state["objective"], self.precision.device)
        self.batches.load_state_dict(state["batches"])
        for cb in self.callbacks:
            if has_state(cb) and state_key_of(cb) in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][state_key_of(cb)])
        self.engine.load_optimizer_state_dict(self._trained, self.optimizer, state["optimizer"])
        for part in ("scheduler", "scaler", "metrics"):
            getattr(self, part).load_state_dict(state[part])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])
        s = self.state
        s.step, s.tokens, s.skipped_steps, s.bad_in_a_row = (
            state["step"],
            state["tokens"],
            state["skipped_steps"],
            state["bad_in_a_row"],
        )
        s.history = state["history"]

    def save(self) -> Path | None:
        """A resumable checkpoint of the whole run (kdlab.training.checkpoint), unless checkpoints=false.
        Every process calls it; rank 0 writes."""
        if not self.cfg.checkpoints:
            return None
        weights, state = self.engine.full_state_dict(self.student), self.state_dict()  # collective
        path = None
        if self.engine.is_main:
            path = save_checkpoint(
                self.out_dir,
                self.state.step,
                self.student,
                self.objective.heads,
                state,
                keep=self.cfg.keep_checkpoints,
                weights=weights,
            )
        self.engine.barrier()
        return path

    def _resume(self) -> None:
        """Load the latest checkpoint of out_dir; settings other than RESUMABLE_CHANGES must be the run's own."""
        path = latest_checkpoint(self.out_dir)
        state = read_trainer_state(path)  # settings first: nothing is loaded into a run it does not fit
        if state.get("format") != STATE_FORMAT:
            raise KDLabError(
                f"checkpoint {path} was written by an earlier kdlab (its optimizer state is stored otherwise); "
                f"start a new run (another --out-dir), or resume it with the kdlab that wrote it"
            )
        old = state["config"]
        changed = [
            f"{k}: {old.get(k)!r} -> {v!r}"
            for k, v in self.cfg.to_dict().items()
            if k not in RESUMABLE_CHANGES | {"batch_size"} and old.get(k) != v
        ]
        # batch_size is per process: a run may resume on another number of processes (FSDP2 on two
        # into one, say) as long as every step still trains the same global batch
        before, now = old["batch_size"] * state.get("world", 1), self.cfg.batch_size * self.engine.world
        if before != now:
            changed.append(f"global batch (batch_size x processes): {before} -> {now}")
        if changed:
            raise KDLabError(f"cannot resume from {path}: the run's settings changed ({'; '.join(changed)})")
        load_checkpoint(path, self.student, self.objective.heads, state=False, engine=self.engine)
        self.load_state_dict(state)
        log.info("resumed from %s (step %d of %d)", path, self.state.step, self.total_steps)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg, s = self.cfg, self.state
        with quiet_hf_progress():
            self._metrics_file = open_run_folder(cfg, self.engine, self._resume, lambda: self.state.history)
            if not cfg.resume:
                save_student_record(self.out_dir, self.student, self.engine)
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
                    save_final(self.out_dir, self.student, self.tokenizer, self.engine)
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


__all__ = ["Trainer", "TrainState", "total_steps", "refuse_unsupported", "RESUMABLE_CHANGES", "STATE_FORMAT"]
