"""Held-out evaluation: how well the student predicts the text, and how close it is to the teacher.

Uses the same precision policy and the same loss functions as training (kdlab.precision,
kdlab.loss.divergences), so evaluation cannot fail where training ran, as the original framework's did.

Metrics (all per-token means over valid next-token positions):
    student_ce / student_ppl   cross-entropy on the text and exp of it
    teacher_ce / teacher_ppl   the same for the teacher (the floor the student aims at)
    kl                         KL(teacher || student) at T = 1, full vocabulary
    top1_agree                 fraction of positions where both models' argmax agree
    student_bpb / teacher_bpb  bits per byte, with `token_bytes` (kdlab.payoff): nats over the
                               targets' UTF-8 bytes / ln 2, a measure free of the tokenizer

The teacher is frozen and a run evaluates the same batches every time, so its logits there never
change: `TeacherEvalCache` keeps them between evaluations up to a byte budget (config
`eval_cache_mb`). On the 2-core CPU the teacher's forward is ~60% of an evaluation (2.6 of 4.5 s per
4 x 128 batch at one thread, measured), so a cached evaluation costs ~40% of the first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch

from kdlab.loss.divergences import IGNORE_INDEX, kd_loss, lm_loss, next_token_labels
from kdlab.loss.terms import match_logits as match_by_id
from kdlab.precision import Precision, student_logits, teacher_logits


class TeacherEvalCache:
    """The teacher's logits on evaluation batches, by batch index, kept while they fit `max_bytes`.

    Batches past the budget are recomputed every time, so memory stays bounded whatever the split's
    size; a cached tensor is the very tensor the forward returned, so results equal recomputing them.
    One cache per fixed sequence of batches (a split at one batch size): the caller keys it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.logits: dict[int, torch.Tensor] = {}
        self.teacher_ce: dict[int, float] = {}  # per-token mean CE of the teacher on batch i
        self.text_nats: dict[int, float] = {}  # the teacher's summed CE over batch i's text tokens (bits per byte)

    def get(self, i: int) -> tuple[torch.Tensor, float] | None:
        return (self.logits[i], self.teacher_ce[i]) if i in self.logits else None

    def put(self, i: int, logits: torch.Tensor, teacher_ce: float) -> None:
        size = logits.numel() * logits.element_size()
        if self.bytes + size <= self.max_bytes:
            self.logits[i], self.teacher_ce[i] = logits, teacher_ce
            self.bytes += size


@torch.no_grad()
def evaluate(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batches: Iterable[dict[str, torch.Tensor]],
    precision: Precision,
    chunk_tokens: int = 128,
    match_logits=None,
    teacher_cache: TeacherEvalCache | None = None,
    token_bytes: torch.Tensor | None = None,
) -> dict[str, float]:
    """`match_logits(s, t) -> (s, t)` makes the vocabularies comparable (an Objective's); default:
    by token id, so a student with a padded vocabulary is compared on the teacher's ids.
    `teacher_cache`: the teacher's logits from earlier calls on the same `batches` (see above).
    `token_bytes`: (V,) UTF-8 bytes per token id (kdlab.payoff.token_bytes); adds bits per byte."""
    if match_logits is None:
        match_logits = partial(match_by_id, None)
    was_training = student.training
    student.eval()
    sums = {
        "student_ce": 0.0,
        "teacher_ce": 0.0,
        "kl": 0.0,
        "top1_agree": 0.0,
        "student_nats": 0.0,
        "teacher_nats": 0.0,
    }
    tokens, n_bytes = 0, 0
    if token_bytes is not None:
        token_bytes = token_bytes.to(precision.device)
    for i, batch in enumerate(batches):
        batch = {k: v.to(precision.device) for k, v in batch.items()}
        targets = next_token_labels(batch["labels"])  # (B, T)
        mask = targets != IGNORE_INDEX
        n = int(mask.sum())
        if n == 0:
            continue
        s = student_logits(student, batch, precision)  # (B, T, V)
        # losses return per-token means; times n gives sums that add up across batches exactly
        sums["student_ce"] += float(lm_loss(s, targets, chunk_tokens=chunk_tokens)) * n
        if token_bytes is not None:  # bits per byte over the targets that stand for text
            tb = token_bytes[targets.clamp_min(0)] * mask
            text_targets = targets.masked_fill(tb == 0, IGNORE_INDEX)  # special tokens have 0 bytes: out of both sums
            n_text = int((tb > 0).sum())
            n_bytes += int(tb.sum())
            sums["student_nats"] += float(lm_loss(s, text_targets, chunk_tokens=chunk_tokens)) * n_text
        if teacher is not None:
            cached = teacher_cache.get(i) if teacher_cache is not None else None
            if cached is None:
                t = teacher_logits(teacher, batch)  # (B, T, V_t)
                t_ce = float(lm_loss(t, targets, chunk_tokens=chunk_tokens))
                if teacher_cache is not None:
                    teacher_cache.put(i, t, t_ce)
            else:
                t, t_ce = cached
            sums["teacher_ce"] += t_ce * n
            if token_bytes is not None:  # the teacher's, like its logits, computed once per cached batch
                known = teacher_cache.text_nats.get(i) if teacher_cache is not None else None
                t_text = float(lm_loss(t, text_targets, chunk_tokens=chunk_tokens)) * n_text if known is None else known
                if teacher_cache is not None and i in teacher_cache.logits:
                    teacher_cache.text_nats[i] = t_text
                sums["teacher_nats"] += t_text
            s, t = match_logits(s, t)
            sums["kl"] += float(kd_loss(s, t, mask, temperature=1.0, chunk_tokens=chunk_tokens)) * n
            sums["top1_agree"] += float(((s.argmax(-1) == t.argmax(-1)) & mask).sum())
        tokens += n
    student.train(was_training)
    if tokens == 0:
        raise ValueError("evaluation got no valid tokens")
    out = {"tokens": tokens, "student_ce": sums["student_ce"] / tokens}
    out["student_ppl"] = math.exp(min(out["student_ce"], 700.0))
    if token_bytes is not None:
        out["bytes"] = n_bytes
        out["student_bpb"] = sums["student_nats"] / (math.log(2) * n_bytes) if n_bytes else float("nan")
    if teacher is not None:
        out["teacher_ce"] = sums["teacher_ce"] / tokens
        out["teacher_ppl"] = math.exp(min(out["teacher_ce"], 700.0))
        out["kl"] = sums["kl"] / tokens
        out["top1_agree"] = sums["top1_agree"] / tokens
        if token_bytes is not None:
            out["teacher_bpb"] = sums["teacher_nats"] / (math.log(2) * n_bytes) if n_bytes else float("nan")
    return out


def format_summary(history: list[dict]) -> str:
    """The end-of-run table: teacher, student before training, student after (from eval records)."""
    evals = [r for r in history if r.get("kind") == "eval"]
    val = [r for r in evals if r["split"] == "validation"]
    test = [r for r in evals if r["split"] == "test"]
    if not val:
        return "(no evaluation recorded)"
    before, after = val[0], val[-1]
    after_test = test[-1] if test else None

    def cells(v: dict | None, t: dict | None, who: str) -> list[str]:
        def f(r, key, fmt):
            return format(r[key], fmt) if r is not None and key in r else "-"

        if who == "teacher":
            return [f(v, "teacher_ppl", ".2f"), f(v, "teacher_bpb", ".4f"), "0", "1",
                    f(t, "teacher_ppl", ".2f"), f(t, "teacher_bpb", ".4f"), "0", "1"]  # fmt: skip
        return [
            f(v, "student_ppl", ".2f"),
            f(v, "student_bpb", ".4f"),
            f(v, "kl", ".4f"),
            f(v, "top1_agree", ".3f"),
            f(t, "student_ppl", ".2f"),
            f(t, "student_bpb", ".4f"),
            f(t, "kl", ".4f"),
            f(t, "top1_agree", ".3f"),
        ]

    rows = [
        ["teacher", *cells(after, after_test, "teacher")],
        [f"student before (step {before['step']})", *cells(before, None, "student")],
        [f"student after (step {after['step']})", *cells(after, after_test, "student")],
    ]
    head = ["", "val ppl", "val bpb", "val KL", "val top-1", "test ppl", "test bpb", "test KL", "test top-1"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    tokens = f"(validation: {after['tokens']:,} tokens" + (
        f", test: {after_test['tokens']:,} tokens)" if after_test else ")"
    )
    return "\n".join([line(head), *(line(r) for r in rows), tokens])


__all__ = ["TeacherEvalCache", "evaluate", "format_summary"]
