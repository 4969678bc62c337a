"""Distillation across tokenizers: losses over text both models read, lined up by bytes.

The teacher and the student cut the same text into different tokens, so their position t are not
the same place in the text and their vocabularies are not the same outcomes. kdlab.data.alignment
lines them up: chunk ids per token (the text between two byte positions where both have a token
boundary) and aligned positions (the position before a chunk's first token: both predict from the
same bytes). Three losses use that, each a plain function of logits or log-probabilities:

    shared_vocab_kd         (a) at aligned positions, the divergence between the next-token
                            distributions restricted to the tokens both vocabularies hold with the
                            same bytes, plus one tail bucket each for the rest (with identical
                            tokenizers: exactly kdlab's full-vocabulary KD)
    chunk_likelihood_loss   (b) a binary KL between the two models' probabilities of each chunk
                            (ALM, Minixhofer et al. 2025, arXiv 2503.20083)
    chunk_sampled_reverse_kl (c) on text the student sampled: the reverse KL's sampled estimator,
                            per chunk (the teacher scores the text in its own tokens)

`chunk_log_probs` turns per-token log-probabilities into per-chunk ones. All math in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.loss.divergences import _valid_count, discounted_returns, kd_loss

NO_CHUNK = -1  # the chunk id of a token with no bytes (end of text, padding)


def chunk_starts(chunk: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: position p predicts a token that opens a chunk (the aligned positions).

    Chunks are numbered in text order on both sides, so the k-th True of a row on the student side
    and the k-th True of the same row on the teacher side predict from the same byte prefix."""
    nxt, cur = chunk[:, 1:], chunk[:, :-1]
    return (nxt != NO_CHUNK) & (nxt != cur)


def next_token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """(B, T) fp32: out[:, p] = log softmax(logits[:, p - 1])[input_ids[:, p]], the model's log-probability
    of token p given the tokens before it; out[:, 0] = 0 (nothing predicts the first token).

    Up to `chunk_tokens` positions of a row at a time (slices of a row are views, not copies), so
    without gradient the fp32 log-softmax never exists whole; with gradient, autograd keeps each
    slice's (an 8,192-token student: 32 KB a position)."""
    B, T, _ = logits.shape
    rows = []
    for b in range(B):
        row, targets = logits[b, : T - 1], input_ids[b, 1:]  # position p predicts token p + 1
        parts = [
            -F.cross_entropy(row[i : i + chunk_tokens].float(), targets[i : i + chunk_tokens], reduction="none")
            for i in range(0, T - 1, chunk_tokens)
        ]
        rows.append(torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32))
    return F.pad(torch.stack(rows), (1, 0))


def chunk_log_probs(
    token_log_probs: torch.Tensor, chunk: torch.Tensor, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk log-probabilities: (B, C) sums of `token_log_probs` (B, T) over each chunk's tokens,
    and a (B, C) bool mask of the chunks that exist. Tokens of chunk NO_CHUNK (no bytes: end of text,
    padding) are left out. C = `n`, any bound above the chunk ids (in a step: the shorter side's
    width, since every chunk holds a token of each side), else the most chunks in a row, which
    costs a device sync."""
    if n is None:
        n = int(chunk.max()) + 1 if chunk.numel() else 0
    valid = chunk != NO_CHUNK
    index = chunk.clamp_min(0)
    out = token_log_probs.new_zeros(chunk.shape[0], n).scatter_add(1, index, token_log_probs * valid)
    counts = torch.zeros(chunk.shape[0], n, dtype=torch.int64, device=chunk.device)
    exists = counts.scatter_add(1, index, valid.long()) > 0
    return out, exists


def _bucket_log_probs(
    rows: torch.Tensor, shared: torch.Tensor, tail: bool, temperature: float, chunk_tokens: int = 128
) -> torch.Tensor:
    """(N, V) logits -> (N, S [+ 1]) log-probabilities at temperature T: the S shared tokens, then the
    rest merged into one tail bucket (`tail`), or without it the distribution over the shared tokens.

    `chunk_tokens` rows at a time: only a (chunk, V) fp32 block exists at once (without gradient; with
    gradient autograd keeps each block's log-softmax, as for any logits it differentiates)."""

    def buckets(z: torch.Tensor) -> torch.Tensor:  # (c, V) fp32 logits at T -> (c, S [+ 1])
        if not tail:
            return z[:, shared].log_softmax(-1)
        logp = z.log_softmax(-1)
        rest = logp.index_fill(-1, shared, float("-inf")).logsumexp(-1, keepdim=True)  # the unshared mass
        return torch.cat([logp[:, shared], rest], -1)

    parts = []
    for i in range(0, rows.shape[0], chunk_tokens):
        z = rows[i : i + chunk_tokens].float()
        parts.append(buckets(z / temperature if temperature != 1.0 else z))
    return torch.cat(parts) if parts else rows.new_zeros(0, len(shared) + tail, dtype=torch.float32)


def shared_vocab_rows(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    s_chunk: torch.Tensor,
    t_chunk: torch.Tensor,
    s_shared: torch.Tensor,
    t_shared: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, S [+ 1]) bucket log-probabilities of student and teacher at the N aligned positions,
    in text order (the distributions `shared_vocab_kd` compares; the teacher's without gradient)."""
    s_at, t_at = chunk_starts(s_chunk), chunk_starts(t_chunk)  # (B, T - 1) each, the same count per row
    if not torch.equal(s_at.sum(1), t_at.sum(1)):  # the k-th of a row must pair with the k-th
        raise ValueError("student and teacher rows have different numbers of aligned positions")
    s_rows = s_logits[:, :-1][s_at]  # (N, V_s)
    tail = len(s_shared) < s_logits.shape[-1] and len(t_shared) < t_logits.shape[-1]
    q = _bucket_log_probs(s_rows, s_shared, tail, temperature, chunk_tokens)
    with torch.no_grad():
        p = _bucket_log_probs(t_logits[:, :-1][t_at], t_shared, tail, temperature, chunk_tokens)
    return q, p


def shared_vocab_kd(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    s_chunk: torch.Tensor,
    t_chunk: torch.Tensor,
    s_shared: torch.Tensor,
    t_shared: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_valid: torch.Tensor | int | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    chunk_tokens: int = 128,
) -> torch.Tensor:
    """(a) The KD divergence at aligned positions over the shared vocabulary plus a tail bucket.

    At the k-th aligned position of a row (the position before chunk k's first token, on each side)
    both models predict the next token from the same bytes. Token v_s of the student and v_t of the
    teacher are the same outcome when they stand for the same bytes (s_shared[i], t_shared[i]); every
    other token of a vocabulary is merged into its side's tail bucket, the top-k bucket's idea:

        p = (p_T(t_shared[0]), ..., p_T(t_shared[S-1]), 1 - sum_i p_T(t_shared[i]))     teacher at T
        q = (q_T(s_shared[0]), ..., q_T(s_shared[S-1]), 1 - sum_i q_T(s_shared[i]))     student at T
        L = T^2 / N * sum over aligned positions of D(p, q)       (D: kd_divergence, as kd_loss)

    The tail is the mass of the tokens the other vocabulary cannot name: the student is taught how
    much of it there is, not how it splits. When one side has no token outside the shared set its
    tail would be 0 (and forward KL infinite), so both distributions are then conditioned on the
    shared set instead (no tail). With identical tokenizers every token is a chunk and shared, and L
    is kd_loss's full-vocabulary value. N is `num_valid`: the step's student targets (so positions
    that do not align add 0, and a step's micro-batches add up to the step's mean).

    Args:
        s_logits: (B, T_s, V_s) student logits; t_logits: (B, T_t, V_t) teacher logits (a constant).
        s_chunk, t_chunk: (B, T_s), (B, T_t) chunk ids (kdlab.data.alignment), NO_CHUNK where none.
        s_shared, t_shared: (S,) ids of the shared tokens, pairwise (kdlab.vocab.TokenizerPair).
    Returns:
        scalar fp32 tensor.
    """
    q, p = shared_vocab_rows(s_logits, t_logits, s_chunk, t_chunk, s_shared, t_shared, temperature, chunk_tokens)
    n = _valid_count(chunk_starts(s_chunk), num_valid)
    mask = torch.ones(1, q.shape[0], dtype=torch.bool, device=q.device)
    # kd_loss on bucket log-probabilities at T = 1 (log_softmax leaves them as they are), times T^2
    kd = kd_loss(q[None], p[None], mask, num_valid=n, divergence=divergence, beta=beta, chunk_tokens=chunk_tokens)
    return temperature**2 * kd


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chunk_likelihood_loss(
    s_chunk_logp: torch.Tensor,
    t_chunk_logp: torch.Tensor,
    chunk_mask: torch.Tensor,
    *,
    num_valid: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """(b) Chunk likelihood matching: the binary KL between the teacher's and the student's
    probability of each chunk, summed over chunks, over N = `num_valid`.

        p_c = p_teacher(chunk c | bytes before it),  q_c = p_student(chunk c | the same bytes)
        L = 1/N sum_c [ p_c log(p_c / q_c) + (1 - p_c) log((1 - p_c) / (1 - q_c)) ]

    Why this divergence. The two models share no outcome space beyond the bytes: a chunk's
    probability is each model's probability of one event, "the next bytes are these", and the
    only distribution both define over it is the Bernoulli {the event, not the event}. The binary KL
    between those is a true divergence (>= 0, 0 only when q_c = p_c), it is the forward KL's own
    form (so (a) and (b) pull the same way), and, unlike a squared difference of log-probabilities,
    it weighs a chunk by how likely the teacher finds it: a chunk the teacher gives 1e-6 costs
    little whatever the student says, while one it is sure of is pulled hard to certainty
    (ALM uses binarised f-divergences for the same reason). Its gradient in log q_c is
    (q_c - p_c) / (1 - q_c): 0 at q_c = p_c, and both logs are taken in log space (log1mexp), so
    probabilities near 1 do not round to log 0.

    Args:
        s_chunk_logp, t_chunk_logp: (B, C) chunk log-probabilities (`chunk_log_probs`); the
            teacher's is a constant.
        chunk_mask: (B, C) bool, the chunks to score.
    Returns:
        scalar fp32 tensor.
    """
    eps = -1e-6  # a chunk of probability 1 would give log(1 - q) = -inf: cap log q just below 0
    log_q = s_chunk_logp.float().clamp(max=eps)
    log_p = t_chunk_logp.detach().float().clamp(max=eps)
    p = log_p.exp()
    per_chunk = p * (log_p - log_q) + (1 - p) * (_log1mexp(log_p) - _log1mexp(log_q))
    return (per_chunk * chunk_mask).sum() / _valid_count(chunk_mask, num_valid)


def chunk_sampled_reverse_kl(
    s_chunk_logp: torch.Tensor,
    t_chunk_logp: torch.Tensor,
    chunk_mask: torch.Tensor,
    *,
    num_valid: torch.Tensor | int | None = None,
    discount: float | None = None,
    sampled_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """(c) The on-policy estimator of KL(student || teacher) per chunk, on text the student sampled.

    The student wrote the text (its tokens); the teacher scores the same bytes in its own tokens;
    per chunk c, with the chunk log-probabilities of both (teacher-forced):

        r_c = log q(c) - log p(c)                          the sampled log-ratio (no gradient)
        A_c = sum_k r_k over the row                       (discount None, the default)
            = sum_{k >= c} discount^(k - c) r_k            (a float discount: the return to go)
        value    = 1/N sum_c r_c                           sums per row to log q(y) - log p(y)
        gradient = 1/N sum_c A_c * grad log q(c)
                 = 1/N sum_rows R * grad sum_t log q(y_t)      (discount None, with `sampled_log_q`)

    With y ~ q, E[log q(y) - log p(y)] = KL(q || p) over texts, so the value is unbiased; and since
    E[grad log q(y)] = 0, giving every chunk its row's whole log-ratio (the default) is an unbiased
    estimate of grad KL(q || p) (REINFORCE). The return to go, unbiased for a per-token estimator
    (kdlab.loss.divergences.sampled_reverse_kl), is not here: where a chunk ends depends on the bytes
    after it (the teacher's tokens there), so an earlier chunk's log-ratio is not independent of a
    later chunk's choice; tests/test_cross_tokenizer.py measures that bias on a toy pair. A float
    discount trades it for less variance. Unlike (a) this needs no shared vocabulary: only each
    model's probability of the bytes.

    The score must cover every sampled token the log-ratio depends on, not only those inside scored
    chunks: a generated token in the chunk that straddles the prompt's end, or one the scoring cut
    dropped (bytes that are not whole text), still shapes the text the later chunks are scored on.
    `sampled_log_q` gives the per-token log q of all of them (zeros elsewhere), and the score becomes
    R * sum_t log q(y_t) per row (discount None only).

    Args:
        s_chunk_logp: (B, C) the student's chunk log-probabilities (gradients flow into it).
        t_chunk_logp: (B, C) the teacher's (a constant).
        chunk_mask: (B, C) bool, the chunks the student generated.
        sampled_log_q: (B, T) the student's log-probability of each token it sampled that the
            scored text depends on, 0 elsewhere (with gradient); default: the chunks' own.
    Returns:
        scalar fp32 tensor.
    """
    log_q = s_chunk_logp.float()
    mask = chunk_mask.float()
    with torch.no_grad():
        ratio = (log_q - t_chunk_logp.float()) * mask
        if discount is None:
            advantage = ratio.sum(1, keepdim=True) * mask
        else:
            advantage = discounted_returns(ratio, discount) * mask
    n = _valid_count(chunk_mask, num_valid)
    if sampled_log_q is not None and discount is None:
        surrogate = (ratio.sum(1) * sampled_log_q.float().sum(1)).sum() / n  # R of each row x its score
    else:
        surrogate = (advantage * log_q * mask).sum() / n
    return ratio.sum() / n + (surrogate - surrogate.detach())


__all__ = [
    "NO_CHUNK",
    "chunk_starts",
    "next_token_log_probs",
    "chunk_log_probs",
    "shared_vocab_rows",
    "shared_vocab_kd",
    "chunk_likelihood_loss",
    "chunk_sampled_reverse_kl",
]
