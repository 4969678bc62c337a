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

Across tokenizers (`pair`, batches of kdlab.data.alignment.PairedSplit) each model reads the text in
its own tokens: student_* and teacher_* are per token of each model's own tokenization (so ppl is
not comparable between them; bpb is, over the very same bytes), and kl / top1_agree are taken at the
aligned positions: KL over the shared vocabulary plus a tail bucket (kdlab.loss.cross_tokenizer), top-1
agreement among the shared tokens; their number in `aligned`.

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

from kdlab.data.alignment import teacher_batch
from kdlab.loss.cross_tokenizer import shared_vocab_rows
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


def _text_nats(logits, targets, mask, token_bytes, chunk_tokens) -> tuple[float, int, int]:
    """(nats over the targets that stand for text, their count, their UTF-8 bytes): special tokens
    (end of text) have 0 bytes and are out of both sums."""
    tb = token_bytes[targets.clamp_min(0)] * mask
    text_targets = targets.masked_fill(tb == 0, IGNORE_INDEX)
    n_text = int((tb > 0).sum())
    return float(lm_loss(logits, text_targets, chunk_tokens=chunk_tokens)) * n_text, n_text, int(tb.sum())


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
    pair=None,
) -> dict[str, float]:
    """`match_logits(s, t) -> (s, t)` makes the vocabularies comparable (an Objective's); default:
    by token id, so a student with a padded vocabulary is compared on the teacher's ids.
    `teacher_cache`: the teacher's logits from earlier calls on the same `batches` (see above).
    `token_bytes`: (V,) UTF-8 bytes per token id (kdlab.payoff.token_bytes); adds bits per byte.
    `pair`: a kdlab.vocab.TokenizerPair when student and teacher have different tokenizers (paired
    batches); the teacher's bits per byte then use its own bytes per token, pair.t_bytes."""
    if match_logits is None:
        match_logits = partial(match_by_id, None)
    was_training = student.training
    student.eval()
    sums = dict.fromkeys(("student_ce", "teacher_ce", "kl", "top1_agree", "student_nats", "teacher_nats"), 0.0)
    tokens, t_tokens, n_bytes, t_n_bytes, aligned = 0, 0, 0, 0, 0
    if token_bytes is not None:
        token_bytes = token_bytes.to(precision.device)
    t_token_bytes = token_bytes if pair is None or token_bytes is None else pair.t_bytes.to(precision.device)
    if pair is not None:
        shared = (pair.s_shared.to(precision.device), pair.t_shared.to(precision.device))
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
            nats, _, b = _text_nats(s, targets, mask, token_bytes, chunk_tokens)
            sums["student_nats"] += nats
            n_bytes += b
        if teacher is not None:
            t_batch = teacher_batch(batch) if pair is not None else batch  # the teacher reads its own tokens
            t_targets = next_token_labels(t_batch["labels"]) if pair is not None else targets
            t_mask = t_targets != IGNORE_INDEX
            n_t = int(t_mask.sum())
            cached = teacher_cache.get(i) if teacher_cache is not None else None
            if cached is None:
                t = teacher_logits(teacher, t_batch)  # (B, T_t, V_t)
                t_ce = float(lm_loss(t, t_targets, chunk_tokens=chunk_tokens))
                if teacher_cache is not None:
                    teacher_cache.put(i, t, t_ce)
            else:
                t, t_ce = cached
            sums["teacher_ce"] += t_ce * n_t
            t_tokens += n_t
            if token_bytes is not None:  # the teacher's, like its logits, computed once per cached batch
                known = teacher_cache.text_nats.get(i) if teacher_cache is not None else None
                t_nats, _, t_b = _text_nats(t, t_targets, t_mask, t_token_bytes, chunk_tokens)
                t_text = t_nats if known is None else known
                if teacher_cache is not None and i in teacher_cache.logits:
                    teacher_cache.text_nats[i] = t_text
                sums["teacher_nats"] += t_text
                t_n_bytes += t_b
            if pair is None:
                s, t = match_logits(s, t)
                sums["kl"] += float(kd_loss(s, t, mask, temperature=1.0, chunk_tokens=chunk_tokens)) * n
                sums["top1_agree"] += float(((s.argmax(-1) == t.argmax(-1)) & mask).sum())
            else:  # at the aligned positions, over the shared tokens and a tail bucket
                s_chunk, t_chunk = batch["s_chunk"], batch["t_chunk"]
                q, p = shared_vocab_rows(s, t, s_chunk, t_chunk, *shared, chunk_tokens=chunk_tokens)
                a, S = q.shape[0], len(pair.s_shared)
                every = torch.ones(1, a, dtype=torch.bool, device=q.device)
                sums["kl"] += float(kd_loss(q[None], p[None], every, num_valid=a, chunk_tokens=chunk_tokens)) * a
                # top-1 among the shared tokens (the tail bucket is no token: both "picking" it is no agreement)
                sums["top1_agree"] += float((q[:, :S].argmax(-1) == p[:, :S].argmax(-1)).sum())
                aligned += a
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
        out["teacher_ce"] = sums["teacher_ce"] / t_tokens
        out["teacher_ppl"] = math.exp(min(out["teacher_ce"], 700.0))
        per = tokens if pair is None else aligned
        out["kl"] = sums["kl"] / per
        out["top1_agree"] = sums["top1_agree"] / per
        if pair is not None:
            out["teacher_tokens"], out["aligned"] = t_tokens, aligned
        if token_bytes is not None:
            out["teacher_bpb"] = sums["teacher_nats"] / (math.log(2) * t_n_bytes) if t_n_bytes else float("nan")
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
