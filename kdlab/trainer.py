"""The distillation loop: one straight-through `fit()`, a few events, resumable state.

    cfg = kdlab.load_config(overrides={"max_steps": 20})
    trainer = kdlab.Trainer.from_config(cfg)
    state = trainer.fit()            # history of train/eval records; Ctrl-C returns it too
    print(kdlab.format_summary(state.history))

Per optimizer step: `grad_accum` micro-batches; the frozen teacher's logits (skipped when
alpha_kd = 0), the student's logits under the precision policy, then
    total = alpha_kd * KD + (1 - alpha_kd) * LM,
each a per-token mean whose denominator is the valid-token count of the *whole* accumulated
batch, so accumulating 4 micro-batches gives exactly the gradient of one 4x larger batch.

Callbacks are plain objects with any of on_train_begin(trainer), on_log(trainer, record),
on_eval(trainer, record), on_train_end(trainer); they stop a run by setting
`trainer.state.should_stop = True`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .balance import AdaptiveBalancer
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import KDConfig, save_config
from .data import PackedSplit, batches_per_epoch, epoch_order, prepare_data
from .errors import KDLabError
from .evaluation import evaluate
from .losses import IGNORE_INDEX, kd_loss, lm_loss, next_token_labels
from .models import build_student, count_parameters, load_teacher, load_tokenizer
from .precision import Precision, resolve_precision, student_outputs, teacher_outputs
from .terms import TERMS, DistillationHeads, needs

log = logging.getLogger("kdlab")

# fields that may differ between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = {"resume", "out_dir", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints"}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position of the next micro-batch: epoch ...
    batch_in_epoch: int = 0  # ... and batch index within it
    tokens: int = 0  # valid target tokens trained on
    should_stop: bool = False
    stop_reason: str = ""
    interrupted: bool = False
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss, in total ...
    bad_in_a_row: int = 0  # ... and in a row (the run stops at cfg.max_nonfinite_steps)
    history: list[dict[str, Any]] = field(default_factory=list)  # train and eval records, in order

    def evals(self, split: str = "validation") -> list[dict[str, Any]]:
        return [r for r in self.history if r["kind"] == "eval" and r["split"] == split]


def build_components(cfg: KDConfig):
    """(precision, tokenizer, teacher, data, student) as `cfg` describes them; shared by train and eval."""
    precision = resolve_precision(cfg.device, cfg.teacher_dtype, cfg.autocast_dtype)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher, cfg.data_dir)
    teacher = load_teacher(cfg.teacher, cfg.data_dir, precision)
    data = prepare_data(cfg.data, cfg.data_dir, tokenizer, cfg.seq_len)
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
        self.state = TrainState()
        self.out_dir = Path(cfg.out_dir)

        self.steps_per_epoch = batches_per_epoch(data["train"], cfg.batch_size) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise KDLabError(
                f"the train split has {len(data['train'])} blocks of {cfg.seq_len} tokens, fewer than "
                f"batch_size*grad_accum={cfg.batch_size * cfg.grad_accum}; use more data or a smaller batch"
            )
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch

        # the trainable student-side modules of the intermediate terms (routers, projections)
        self.heads = DistillationHeads.for_models(cfg, student, teacher)
        self.needs = needs(cfg)
        if self.needs.attentions:  # attention maps exist only in eager attention
            for model in (student, teacher):
                model.set_attn_implementation("eager")
        self.balancer = AdaptiveBalancer(cfg.balance_momentum) if cfg.adaptive_balance else None
        self.last_grad_shares: dict[str, torch.Tensor] = {}

        # AdamW with decay on matrices only (not norms/biases), as in nanoGPT
        params = [p for p in student.parameters() if p.requires_grad] + list(self.heads.parameters())
        self.trainable = params
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = precision.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.needs_grad_scaler)

    # ------------------------------------------------------------------ construction from config
    @classmethod
    def from_config(cls, cfg: KDConfig, callbacks=()) -> Trainer:
        """Load teacher, tokenizer and data, build the student: everything `kdlab train` does."""
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
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self._emit("on_eval" if record["kind"] == "eval" else "on_log", record)

    # ------------------------------------------------------------------ data
    def _next_micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], tuple[int, int]]:
        """The next grad_accum batches and the data position after them (committed after the step)."""
        train, bs = self.data["train"], self.cfg.batch_size
        n = batches_per_epoch(train, bs)
        epoch, pos = self.state.epoch, self.state.batch_in_epoch
        batches = []
        for _ in range(self.cfg.grad_accum):
            if pos == n:
                epoch, pos = epoch + 1, 0
            order = epoch_order(len(train), self.cfg.seed, epoch)
            batches.append(train.batch(order[pos * bs : (pos + 1) * bs]))
            pos += 1
        if pos == n:
            epoch, pos = epoch + 1, 0
        dev = self.precision.device
        return [{k: v.to(dev, non_blocking=True) for k, v in b.items()} for b in batches], (epoch, pos)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """One optimizer step; None if a non-finite loss made it skip (no backward, no update).

        Returns the step's unweighted terms, the total, the grad norm and the token count, as
        device tensors (no host sync): the step's terms are accumulated over micro-batches with
        each micro-batch's share of the step's tokens, so they equal the terms of one big batch.
        """
        cfg, alpha = self.cfg, self.cfg.alpha_kd
        targets = [next_token_labels(b["labels"]) for b in micro_batches]  # (B, T) each
        num_valid = sum((t != IGNORE_INDEX).sum() for t in targets)  # next-token targets of the step
        num_tokens = sum(b["attention_mask"].sum() for b in micro_batches)  # real tokens of the step
        weights = {"kd": alpha, "lm": 1.0 - alpha, **self.heads.weights}
        need = self.needs
        sums: dict[str, torch.Tensor | float] = {}
        want_shares = cfg.grad_share_every > 0 and (self.state.step + 1) % cfg.grad_share_every == 0
        for i, (batch, tgt) in enumerate(zip(micro_batches, targets)):
            s_out = student_outputs(self.student, batch, self.precision, need.hidden_states, need.attentions)
            # LM is always computed and logged (the seed lost track of it), even at weight 0
            with torch.set_grad_enabled(alpha < 1.0):
                terms = {"lm": lm_loss(s_out.logits, tgt, chunk_tokens=cfg.loss_chunk_tokens, num_valid=num_valid)}
            if alpha > 0.0 or self.heads.weights:  # an LM-only run never runs the teacher
                t_out = teacher_outputs(self.teacher, batch, need.hidden_states, need.attentions)
            if alpha > 0.0:
                s_kd, t_kd = self.heads.match_logits(s_out.logits, t_out.logits)
                terms["kd"] = kd_loss(s_kd, t_kd, tgt != IGNORE_INDEX, temperature=cfg.temperature,
                                      top_k=cfg.kd_top_k, chunk_tokens=cfg.loss_chunk_tokens, num_valid=num_valid,
                                      divergence=cfg.kd_divergence, beta=cfg.jsd_beta)
            if self.heads.weights:
                share = batch["attention_mask"].sum() / num_tokens  # this micro-batch's part of the step
                for name, value in self.heads(s_out, t_out, batch["attention_mask"].bool()).items():
                    terms[name] = value * (1.0 / len(micro_batches) if name == "contrastive" else share)
            scaled = self.balancer(terms) if self.balancer is not None else terms
            total = sum(weights[k] * v for k, v in scaled.items() if weights[k] > 0)
            # one host sync per micro-batch: replacing nan by 0 would still leave nan gradients, and
            # AdamW would still move the weights through momentum and decay, so the step is skipped
            if not torch.isfinite(total):
                bad = ", ".join(f"{k}={float(v.detach())}" for k, v in terms.items() if not torch.isfinite(v))
                log.warning("non-finite loss at step %d, micro-batch %d (epoch %d, batch %d): %s; step skipped",
                            self.state.step + 1, i, self.state.epoch, self.state.batch_in_epoch + i, bad)
                self.optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()  # the learning rate follows the step count, skipped or not
                return None
            if want_shares and i == 0:
                self.last_grad_shares = self._grad_shares(scaled, weights)
            self.scaler.scale(total).backward()
            for name, value in {"loss": total, **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**sums, "grad_norm": grad_norm.detach(), "tokens": num_valid}

    def _grad_shares(self, terms: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
        """Each weighted term's share of the sum of per-term gradient norms on the student's weights.

        One extra backward per active term on this micro-batch, so it runs every grad_share_every steps.
        """
        params = [p for p in self.student.parameters() if p.requires_grad]
        norms = {}
        for name, value in terms.items():
            if weights[name] > 0 and value.requires_grad:
                grads = torch.autograd.grad(weights[name] * value, params, retain_graph=True, allow_unused=True)
                norms[name] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None]))
        total = sum(norms.values())
        return {k: v / total for k, v in norms.items()}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "validation") -> dict[str, Any]:
        batches = self.data[split].eval_batches(self.cfg.batch_size, self.cfg.eval_batches)
        metrics = evaluate(self.student, self.teacher, batches, self.precision, self.cfg.loss_chunk_tokens,
                           self.heads.match_logits)
        record = {"kind": "eval", "split": split, "step": self.state.step, **metrics}
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
            "heads": self.heads.state_dict(),
            "balancer": self.balancer.state_dict() if self.balancer is not None else {},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self) -> Path:
        return save_checkpoint(self.out_dir, self.state.step, self.student, self._trainer_state(),
                               keep=self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        path = latest_checkpoint(self.out_dir)
        ckpt = load_checkpoint(path, self.student)
        old = ckpt["config"]
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.cfg.to_dict().items()
                   if k not in RESUMABLE_CHANGES and old.get(k) != v]
        if changed:
            raise KDLabError(f"cannot resume from {path}: the run's settings changed ({'; '.join(changed)})")
        self.heads.load_state_dict(ckpt["heads"])
        if self.balancer is not None:
            self.balancer.load_state_dict(ckpt["balancer"], self.precision.device)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        s = self.state
        s.step, s.epoch, s.batch_in_epoch, s.tokens = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["tokens"]
        s.skipped_steps, s.bad_in_a_row = ckpt["skipped_steps"], ckpt["bad_in_a_row"]
        s.history = ckpt["history"]
        # the metrics file may hold records written after this checkpoint: rewrite it from history
        tmp = self.out_dir / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in s.history))
        os.replace(tmp, self.out_dir / "metrics.jsonl")
        log.info("resumed from %s (step %d of %d)", path, s.step, self.total_steps)

    def save_final(self) -> Path:
        """The trained student (+ tokenizer) as a plain HF folder: out_dir/final."""
        final, tmp = self.out_dir / "final", self.out_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.student.save_pretrained(tmp)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg, s = self.cfg, self.state
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out_dir / "config.yaml")
        if cfg.resume:
            self._resume()
        else:
            (self.out_dir / "metrics.jsonl").write_text("")
        epochs_note = f"{self.total_steps / self.steps_per_epoch:.2f} epochs of {self.steps_per_epoch} steps"
        log.info("training %d optimizer steps (%s; %s), %d tokens per step, out_dir=%s", self.total_steps,
                 "max_steps" if cfg.max_steps > 0 else f"epochs={cfg.epochs}", epochs_note,
                 cfg.batch_size * cfg.grad_accum * cfg.seq_len, self.out_dir)
        self._emit("on_train_begin")
        if s.step == 0 and not s.evals("validation"):
            self.evaluate("validation")  # "student before" for the summary table
        acc: dict[str, torch.Tensor] = {}
        n_acc, t_interval = 0, time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=s.step, desc="distilling", unit="step", dynamic_ncols=True)
        try:
            with logging_redirect_tqdm():
                while s.step < self.total_steps and not s.should_stop:
                    batches, cursor = self._next_micro_batches()
                    out = self.train_step(batches)
                    s.step += 1
                    s.epoch, s.batch_in_epoch = cursor
                    bar.update(1)
                    if out is None:
                        s.skipped_steps += 1
                        s.bad_in_a_row += 1
                        if s.bad_in_a_row >= cfg.max_nonfinite_steps:
                            s.should_stop = True
                            s.stop_reason = f"{s.bad_in_a_row} non-finite steps in a row (max_nonfinite_steps)"
                            log.error("stopping: %s", s.stop_reason)
                    else:
                        s.bad_in_a_row = 0
                        for k, v in out.items():  # accumulate on the device: no per-step host sync
                            acc[k] = acc.get(k, 0) + v
                        n_acc += 1
                    if n_acc and (s.step % cfg.log_every == 0 or s.step == self.total_steps):
                        interval, n_interval, acc, n_acc = acc, n_acc, {}, 0
                        self._log_interval(interval, n_interval, time.perf_counter() - t_interval, bar)
                        t_interval = time.perf_counter()
                    if cfg.eval_every and s.step % cfg.eval_every == 0 and s.step < self.total_steps:
                        self.evaluate("validation")
                    if cfg.save_every and s.step % cfg.save_every == 0 and s.step < self.total_steps:
                        self.save()
                bar.close()
                self.evaluate("validation")
                self.evaluate("test")
                self.save()
                self.save_final()
        except KeyboardInterrupt:
            bar.close()
            s.interrupted = True
            if n_acc:  # the steps since the last log line, so history and token count are complete
                self._log_interval(acc, n_acc, time.perf_counter() - t_interval, bar)
            path = self.save()
            log.warning("interrupted at step %d; checkpoint %s; continue with --resume", s.step, path)
        self._emit("on_train_end")
        return s

    def _log_interval(self, acc: dict[str, torch.Tensor], n: int, seconds: float, bar) -> None:
        extra = {f"share/{k}": v for k, v in self.last_grad_shares.items()}
        for layer, stats in enumerate(self.heads.last_router_stats):
            extra[f"router{layer}/entropy"] = stats["entropy"]
            extra |= {f"router{layer}/util{e}": u for e, u in enumerate(stats["utilisation"])}
        keys = list(acc) + list(extra)
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).to("cpu")
                              for v in [*acc.values(), *extra.values()]]).tolist()  # one host sync
        sums, extra = dict(zip(keys[: len(acc)], values)), dict(zip(keys[len(acc):], values[len(acc):]))
        tokens = int(sums.pop("tokens"))
        self.state.tokens += tokens
        record = {"kind": "train", "step": self.state.step, "epoch": self.state.epoch,
                  **{k: v / n for k, v in sums.items()},
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(seconds, 1e-9),
                  "skipped_steps": self.state.skipped_steps,
                  "weights": {"kd": self.cfg.alpha_kd, "lm": 1.0 - self.cfg.alpha_kd, **self.heads.weights}}
        if any(k.startswith("share/") for k in extra):
            record["grad_share"] = {k[6:]: v for k, v in extra.items() if k.startswith("share/")}
        if self.heads.last_router_stats:
            record["router"] = [
                {"entropy": extra[f"router{layer}/entropy"],
                 "utilisation": [extra[f"router{layer}/util{e}"] for e in range(len(stats["utilisation"]))]}
                for layer, stats in enumerate(self.heads.last_router_stats)]
        self.last_grad_shares = {}
        self._record(record)
        terms = " | ".join(f"{k} {record[k]:.4f}" for k in ("kd", "lm", *TERMS) if k in record)
        log.info("step %d/%d | loss %.4f | %s | lr %.2e | grad-norm %.3f | %.0f tok/s",
                 self.state.step, self.total_steps, record["loss"], terms, record["lr"],
                 record["grad_norm"], record["tokens_per_s"])
        if "router" in record:
            log.info("  router utilisation: %s", "; ".join(
                "layer %d [%s] H=%.2f" % (i, " ".join(f"{u:.2f}" for u in r["utilisation"]), r["entropy"])
                for i, r in enumerate(record["router"])))
        if "grad_share" in record:
            log.info("  grad-norm share: %s", ", ".join(f"{k} {v:.2f}" for k, v in record["grad_share"].items()))
        bar.set_postfix(loss=f"{record['loss']:.3f}")


def train(cfg: KDConfig, callbacks=()) -> TrainState:
    """Build everything from `cfg` and run it; the function behind `kdlab train`."""
    return Trainer.from_config(cfg, callbacks).fit()


__all__ = ["Trainer", "TrainState", "train"]
