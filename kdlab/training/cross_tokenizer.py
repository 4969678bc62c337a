"""Cross-tokenizer distillation: the objective's override for a student with a tokenizer of its own.

    cfg = kdlab.load_config(overrides={"student_tokenizer": "austen-bpe-8k", "term_weights": {"chunk": 0.5}})
    trainer = kdlab.build_trainer(cfg)         # paired blocks + CrossTokenizerObjective

The batches are kdlab.data.alignment's paired blocks: the student's tokens (input_ids, ...), the
teacher's tokens of the same text (t_input_ids, ...) and each token's chunk id. Two things change
from the Objective, and nothing else:

  * the teacher's forward reads its own tokens (t_input_ids), not the student's (`teacher_inputs`);
  * the KD term is kdlab.loss.cross_tokenizer.shared_vocab_kd: the same divergence, temperature and
    weight (alpha_kd, the curriculum), at the aligned positions over the tokens both vocabularies
    hold plus a tail bucket. The `chunk` term (chunk likelihood) and LM need no change: chunk reads
    the paired batch's chunk ids, LM the student's own tokens.

On text the student generated (on_policy > 0; kdlab.training.on_policy, whose override this extends:
the student's own text gets no LM weight, terms are logged as gen/<term>), the teacher reads the
text re-tokenized (kdlab.data.alignment.pair_generated), and with on_policy_loss=sampled_reverse_kl
the KD term is the per-chunk estimator, kdlab.loss.cross_tokenizer.chunk_sampled_reverse_kl.

Terms that compare the two models position by position or layer by layer (feature, attention,
layerwise, contrastive) and the fused loss (one position grid) do not apply; config refuses them.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.data.alignment import teacher_batch
from kdlab.errors import KDLabError
from kdlab.loss.cross_tokenizer import chunk_log_probs, chunk_sampled_reverse_kl, next_token_log_probs, shared_vocab_kd
from kdlab.loss.terms import TermContext
from kdlab.training.on_policy import OnPolicyObjective
from kdlab.vocab import TokenizerPair

CROSS_TERMS = ("lm", "kd", "chunk")  # the terms that apply across tokenizers


class CrossTokenizerObjective(OnPolicyObjective):
    """The Objective for paired batches (kdlab.data.alignment.PairedSplit): the teacher reads its own
    tokens, and KD is taken over the shared vocabulary at aligned positions."""

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module, total_steps: int, pair: TokenizerPair):
        super().__init__(cfg, student, teacher, total_steps)
        other = [n for n in self.active if n not in CROSS_TERMS]
        if other:
            raise KDLabError(
                f"student_tokenizer={cfg.student_tokenizer!r}: term(s) {', '.join(other)} compare the models position "
                f"by position, which two tokenizers do not share; across tokenizers use {', '.join(CROSS_TERMS)}"
            )
        if student.config.vocab_size != pair.s_size:  # kdlab.models.check_vocabulary says it before loading
            raise KDLabError(
                f"the student's embedding has {student.config.vocab_size:,} rows but student_tokenizer="
                f"{cfg.student_tokenizer!r} has {pair.s_size:,} tokens; they must match"
            )
        self.pair = pair
        self.fused, self.fused_off = False, "the two models read different tokens"
        device = next(student.parameters()).device
        self._shared = (pair.s_shared.to(device), pair.t_shared.to(device))

    def teacher_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return teacher_batch(batch)  # the teacher reads its own tokens of the same text

    def compute(self, name: str, ctx: TermContext) -> torch.Tensor:
        if name != "kd":
            return super().compute(name, ctx)
        cfg, b = self.cfg, ctx.batch
        if b.get("policy") == "student" and cfg.on_policy_loss == "sampled_reverse_kl":
            token_lp = next_token_log_probs(ctx.student.logits, b["input_ids"])
            n = min(b["s_chunk"].shape[1], b["t_chunk"].shape[1])  # a bound on the chunk ids, no device sync
            s_lp, exists = chunk_log_probs(token_lp, b["s_chunk"], n)
            with torch.no_grad():
                t_lp, _ = chunk_log_probs(next_token_log_probs(ctx.teacher.logits, b["t_input_ids"]), b["t_chunk"], n)
            # the score covers every sampled token the scored text depends on (kdlab.data.alignment.pair_generated)
            sampled = token_lp * b["s_sampled"]
            return chunk_sampled_reverse_kl(s_lp, t_lp, exists, num_valid=ctx.num_valid, sampled_log_q=sampled)
        return shared_vocab_kd(
            ctx.student.logits,
            ctx.teacher.logits,
            b["s_chunk"],
            b["t_chunk"],
            *self._shared,
            temperature=cfg.temperature,
            num_valid=ctx.num_valid,
            divergence=cfg.kd_divergence,
            beta=cfg.jsd_beta,
            chunk_tokens=cfg.loss_chunk_tokens,
        )


__all__ = ["CrossTokenizerObjective", "CROSS_TERMS"]
