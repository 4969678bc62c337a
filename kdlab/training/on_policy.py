"""On-policy and mixed-policy distillation: a batch source that generates, and the objective's override.

    cfg = kdlab.load_config(overrides={"on_policy": 0.5})     # GKD's lambda: half the steps on generated text
    trainer = kdlab.build_trainer(cfg)                  # GeneratedBatches + OnPolicyObjective

Off-policy distillation (`on_policy=0`, kdlab's default) scores the student on the corpus' own text;
at generation time it then continues its *own* prefixes, which it never trained on (exposure bias).
With probability `on_policy` (lambda) per optimizer step, `GeneratedBatches` instead cuts each
training block to its first `prompt_tokens`, lets `generator` continue it for `gen_tokens` (the
student: on-policy distillation, GKD (Agarwal et al., 2024); the teacher: sequence-level KD (Kim and
Rush, 2016)), and hands the trainer prompt + continuation with labels on the continuation only. The
teacher scores the whole sequence in the ordinary forward, so every divergence kdlab has (forward,
reverse, JSD, top-k buckets) applies to the generated positions unchanged, and the step's per-token
means count generated tokens over all micro-batches and processes, as on the corpus.

`OnPolicyObjective` is the one override: on a batch the student wrote, the LM term's weight is 0
(likelihood of its own samples would train it towards itself; it is still logged) and, with
`on_policy_loss="sampled_reverse_kl"`, the KD term is the on-policy estimator
(`kdlab.loss.divergences.sampled_reverse_kl`: log q - log p of each sampled token as its advantage). Terms of
generated steps are logged as "gen/<term>", so a record keeps the corpus and the generated curves
apart; records also carry `on_policy_share`, `generate_s` / `generate_share` (the share of the
interval's time spent generating) and a few prompt -> continuation `samples`.

The step's coin and each row's sampling stream are functions of (seed, step, prompt), not of a
running RNG: every process flips the same coin, micro-batches sample what one big batch would
(`kdlab.generation.RowSeededSampler`), and a resumed run generates exactly what the uninterrupted
one did. Cost: a generated step runs `gen_tokens` forward passes of the generator (KV-cached)
before its training forward; the records' generate_share says how much of the time that is.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

import torch
from torch import nn

from kdlab.data.alignment import pair_generated
from kdlab.data.batches import BatchSource, PackedBatches
from kdlab.generation import generate_ids
from kdlab.loss.divergences import IGNORE_INDEX, sampled_reverse_kl
from kdlab.loss.objective import Loss, Objective
from kdlab.loss.terms import TermContext
from kdlab.models import check_positions
from kdlab.precision import Precision
from kdlab.training.metrics import GENERATED


def _row_seed(seed: int, step: int, prompt: list[int]) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:".encode() + bytes(str(prompt), "ascii")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class GeneratedBatches(BatchSource):
    """Each optimizer step: with probability `on_policy`, the corpus step of `base` with every block
    cut to a prompt and continued by `model`; otherwise the corpus step unchanged.

    A generated micro-batch has input_ids (B, prompt_tokens + gen_tokens), labels IGNORE_INDEX on the
    prompt (only generated tokens are scored), `policy` = `generated_by` ("student" or "teacher").
    """

    def __init__(
        self,
        base: PackedBatches,
        model: nn.Module,
        *,
        on_policy: float,
        prompt_tokens: int,
        gen_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        precision: Precision | None = None,
        generated_by: str = "student",
        tokenizer=None,
        samples: int = 2,
        pair=None,
    ):
        self.base, self.model, self.on_policy = base, model, on_policy
        self.prompt_tokens, self.gen_tokens = prompt_tokens, gen_tokens
        self.temperature, self.top_p, self.seed, self.precision = temperature, top_p, seed, precision
        self.generated_by, self.tokenizer, self.samples = generated_by, tokenizer, samples
        self.pair = pair  # a student tokenizer of its own (kdlab.vocab.TokenizerPair): the teacher re-tokenizes
        self.steps_per_epoch = base.steps_per_epoch
        self.step = 0  # steps drawn so far
        self._interval = {"steps": 0, "generated": 0, "generate_s": 0.0}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # prompts, continuations (decoded at log time)

    @classmethod
    def for_run(cls, cfg, base: PackedBatches, tokenizer, student, teacher, precision, pair=None) -> GeneratedBatches:
        gen = cfg.gen_tokens or cfg.seq_len - cfg.prompt_tokens
        check_positions(cfg.prompt_tokens + gen, teacher, student, name="prompt_tokens + gen_tokens")
        return cls(
            base,
            student if cfg.generator == "student" else teacher,  # the raw student: never its DDP/compiled wrapper
            on_policy=cfg.on_policy,
            prompt_tokens=cfg.prompt_tokens,
            gen_tokens=gen,
            temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p,
            seed=cfg.seed,
            precision=precision if cfg.generator == "student" else None,  # the teacher runs in its own dtype
            generated_by=cfg.generator,
            tokenizer=tokenizer,
            samples=cfg.gen_samples,
            pair=pair,
        )

    def generates(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) trains on generated text: the same on every process."""
        return self.on_policy > 0 and random.Random(f"{self.seed}:{step}").random() < self.on_policy

    def next_step(self) -> list[dict[str, Any]]:
        batches = self.base.next_step()
        step, self.step = self.step, self.step + 1
        self._interval["steps"] += 1
        if not self.generates(step):
            return batches
        t0 = time.perf_counter()
        out = [self._generate(b, step) for b in batches]
        self._interval["generated"] += 1
        self._interval["generate_s"] += time.perf_counter() - t0
        return out

    def _generate(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        prompt = batch["input_ids"][:, : self.prompt_tokens]
        seeds = [_row_seed(self.seed, step, row) for row in prompt.tolist()]
        cont = generate_ids(
            self.model,
            prompt,
            self.gen_tokens,
            seeds=seeds,
            temperature=self.temperature,
            top_p=self.top_p,
            precision=self.precision,
        )
        ids = torch.cat([prompt, cont], dim=1)
        labels = ids.clone()
        labels[:, : self.prompt_tokens] = IGNORE_INDEX  # position P-1 predicts the first generated token
        if self.tokenizer is not None and self.samples:
            self._last = (prompt[: self.samples], cont[: self.samples])
        out = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "policy": self.generated_by,
            "no_padding": True,
        }
        if self.pair is not None:  # the teacher reads the same text in its own tokens (kdlab.data.alignment)
            out |= {k: v.to(ids.device) for k, v in pair_generated(prompt.cpu(), cont.cpu(), self.pair).items()}
        return out

    def log_fields(self) -> dict[str, Any]:
        iv = self._interval
        fields = {
            **self.base.log_fields(),
            "on_policy_share": iv["generated"] / max(iv["steps"], 1),
            "generate_s": iv["generate_s"],
        }
        if iv["generated"] and self._last is not None:
            prompts, conts = self._last
            fields["samples"] = [
                {"prompt": self.tokenizer.decode(p), "continuation": self.tokenizer.decode(c)}
                for p, c in zip(prompts.tolist(), conts.tolist())
            ]
        self._interval = {"steps": 0, "generated": 0, "generate_s": 0.0}
        return fields

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "step": self.step, "interval": dict(self._interval)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.step, self._interval = state["step"], dict(state["interval"])


class OnPolicyObjective(Objective):
    """The Objective, overridden for batches a model generated (batch["policy"]): the student's own
    text gets no LM weight and, with on_policy_loss="sampled_reverse_kl", the sampled-token estimator
    as its KD term; a generated step's terms are named "gen/<term>"."""

    def compute(self, name: str, ctx: TermContext) -> torch.Tensor:
        if name == "kd" and ctx.batch.get("policy") == "student" and self.cfg.on_policy_loss == "sampled_reverse_kl":
            s, t = ctx.match_logits(ctx.student.logits, ctx.teacher.logits)
            return sampled_reverse_kl(
                s, t, ctx.targets, ctx.mask, num_valid=ctx.num_valid, discount=self.cfg.rkl_discount
            )
        return super().compute(name, ctx)

    def terms_of(self, s_out, t_out, batch, counts, weights=None, reduce=None) -> Loss:
        policy = batch.get("policy")
        if policy is None:  # a corpus batch
            return super().terms_of(s_out, t_out, batch, counts, weights, reduce)
        weights = dict(self.weights() if weights is None else weights)
        if policy == "student":
            weights["lm"] = 0.0  # likelihood of its own samples would train the student towards itself
        out = super().terms_of(s_out, t_out, batch, counts, weights, reduce)
        return Loss(
            {GENERATED + k: v for k, v in out.terms.items()},
            {GENERATED + k: v for k, v in out.weighted.items()},
            out.total,
        )


__all__ = ["GeneratedBatches", "OnPolicyObjective", "GENERATED"]
