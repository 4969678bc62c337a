"""Losses against independent references: fp64 textbook formulas and PyTorch's own functions."""

import pytest
import torch
import torch.nn.functional as F

from kdlab.loss.divergences import (
    IGNORE_INDEX,
    kd_loss,
    kd_loss_reference,
    kd_loss_topk,
    lm_loss,
    next_token_labels,
    teacher_top_k,
)

V = 97  # a small prime vocabulary: chunks never line up with anything by accident


def _logits(*shape, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def ref_kd(s, t, mask, T=1.0, top_k=0):
    """Textbook forward KL in float64 with plain autograd-friendly ops (no chunking, no custom grad)."""
    s, t = s.double() / T, t.double() / T
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    p = log_p.exp()
    if top_k:
        idx = log_p.topk(top_k, -1).indices
        in_k = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
        p_tail = (p * ~in_k).sum(-1)
        q_tail = (log_q.exp() * ~in_k).sum(-1)
        per_tok = (p * (log_p - log_q) * in_k).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    else:
        per_tok = (p * (log_p - log_q)).sum(-1)
    m = mask.double()
    return T * T * (per_tok * m).sum() / m.sum()


@pytest.fixture
def batch():
    s, t = _logits(3, 11, V, seed=1), _logits(3, 11, V, seed=2)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False  # a padded sequence
    mask[:, -1] = False  # the last position has no next token
    return s, t, mask


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_kd_value_and_grad_match_float64_reference(batch, T, top_k, chunk):
    s, t, mask = batch
    s32 = s.clone().requires_grad_(True)
    loss = kd_loss(s32, t, mask, temperature=T, top_k=top_k, chunk_tokens=chunk)
    loss.backward()
    s64 = s.double().requires_grad_(True)
    ref = ref_kd(s64, t, mask, T, top_k)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_kd_t_squared_scaling(batch):
    s, t, mask = batch
    T = 3.0
    unscaled = ref_kd(s, t, mask, T) / T**2  # the plain KL between the tempered distributions
    assert torch.isclose(kd_loss(s, t, mask, temperature=T).double(), T**2 * unscaled, rtol=1e-5)


def test_kd_zero_when_student_equals_teacher(batch):
    s, _, mask = batch
    assert kd_loss(s, s.clone(), mask).abs() < 1e-6
    assert kd_loss(s, s.clone(), mask, top_k=7).abs() < 1e-6


def test_kd_masked_positions_have_no_effect_and_zero_gradient(batch):
    s, t, mask = batch
    s1 = s.clone().requires_grad_(True)
    loss1 = kd_loss(s1, t, mask)
    loss1.backward()
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e4  # garbage at masked positions
    t2[~mask] = -1e4
    assert torch.equal(kd_loss(s2, t2, mask), loss1.detach())
    assert torch.count_nonzero(s1.grad[~mask]) == 0
    assert torch.count_nonzero(s1.grad[mask]) > 0


def test_kd_invariant_to_batch_size_and_sequence_length(batch):
    s, t, mask = batch
    base = kd_loss(s, t, mask)
    # the same tokens twice in the batch, or twice as long a sequence: a per-token mean is unchanged
    torch.testing.assert_close(kd_loss(torch.cat([s, s]), torch.cat([t, t]), torch.cat([mask, mask])), base)
    torch.testing.assert_close(kd_loss(torch.cat([s, s], 1), torch.cat([t, t], 1), torch.cat([mask, mask], 1)), base)


def test_topk_is_at_most_full_and_equal_at_k_equals_v(batch):
    s, t, mask = batch
    full = kd_loss(s, t, mask)
    for k in (1, 2, 8, 32, 64):
        assert kd_loss(s, t, mask, top_k=k) <= full + 1e-6
    torch.testing.assert_close(kd_loss(s, t, mask, top_k=V), full)
    # k = V - 1 leaves a one-token tail bucket: the coarse-grained KL is then exactly the full KL,
    # this time computed through the top-k code path
    torch.testing.assert_close(kd_loss(s, t, mask, top_k=V - 1), full, rtol=1e-5, atol=1e-6)


def test_kd_num_valid_makes_grad_accumulation_exact(batch):
    s, t, mask = batch
    whole = kd_loss(s, t, mask)
    n = mask.sum()
    parts = kd_loss(s[:1], t[:1], mask[:1], num_valid=n) + kd_loss(s[1:], t[1:], mask[1:], num_valid=n)
    torch.testing.assert_close(parts, whole)
    # the naive alternative, a mean of per-micro-batch means, is biased when lengths differ
    mean_of_means = (kd_loss(s[:1], t[:1], mask[:1]) + kd_loss(s[1:], t[1:], mask[1:])) / 2
    assert not torch.isclose(mean_of_means, whole)


def test_kd_fp16_teacher_and_student_stay_finite_and_close(batch):
    s, t, mask = batch
    s16 = s.half().requires_grad_(True)
    loss = kd_loss(s16, t.half(), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s16.grad).all() and s16.grad.dtype == torch.float16
    # the only error left is the fp16 rounding of the inputs themselves
    torch.testing.assert_close(loss.double(), ref_kd(s.half(), t.half(), mask), rtol=1e-4, atol=1e-5)


def test_kd_teacher_minus_inf_logits_give_finite_loss(batch):
    s, t, mask = batch
    t = t.clone()
    t[..., -5:] = float("-inf")  # e.g. padded vocabulary entries
    s = s.clone().requires_grad_(True)
    loss = kd_loss(s, t, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_kd_rejects_mismatched_vocabularies(batch):
    s, t, mask = batch
    with pytest.raises(ValueError, match="vocabularies must match"):
        kd_loss(s, t[..., :-1], mask)


# ------------------------------------------------------------------------------- LM loss


def _targets(B=3, T=11, seed=3):
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    labels[1, 5:] = IGNORE_INDEX  # padding
    return next_token_labels(labels)


def test_next_token_labels_shifts_left_and_pads():
    labels = torch.tensor([[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]])
    assert next_token_labels(labels).tolist() == [[6, 7, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunked_ce_equals_plain_cross_entropy(chunk):
    logits, y = _logits(3, 11, V), _targets()
    a = logits.clone().requires_grad_(True)
    loss = lm_loss(a, y, chunk_tokens=chunk)
    loss.backward()
    b = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(b.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad, b.grad)


def test_chunked_ce_with_a_fully_padded_chunk():
    logits = _logits(2, 8, V)
    y = next_token_labels(torch.randint(0, V, (2, 8)))
    y[1] = IGNORE_INDEX  # rows 8..15 of the flattened batch: exactly the second chunk of 8
    a = logits.clone().requires_grad_(True)
    loss = lm_loss(a, y, chunk_tokens=8)
    loss.backward()
    ref = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref)
    assert torch.count_nonzero(a.grad[1]) == 0
    # what the chunked mean-of-means would have done: 0/0 for the padded chunk
    per_chunk = F.cross_entropy(logits[1], y[1], ignore_index=IGNORE_INDEX, reduction="mean")
    assert torch.isnan(per_chunk)


def test_chunked_ce_fp16_logits_upcast():
    logits, y = _logits(3, 11, V).half(), _targets()
    ref = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(lm_loss(logits, y, chunk_tokens=5), ref)


def test_no_grad_evaluation_gives_the_same_values(batch):
    s, t, mask = batch
    y = _targets()
    with torch.no_grad():
        values = (kd_loss(s, t, mask, top_k=5), lm_loss(s, y, chunk_tokens=4))
    s = s.clone().requires_grad_(True)
    assert torch.equal(values[0], kd_loss(s, t, mask, top_k=5).detach())
    assert torch.equal(values[1], lm_loss(s, y, chunk_tokens=4).detach())


# ------------------------------------------------------------------ reverse KL and generalised JSD


def ref_divergence(s, t, mask, T=1.0, top_k=0, divergence="reverse_kl", beta=0.5):
    """Textbook reverse KL / JSD(beta) in float64 on the full or (k+1)-bucket distributions."""
    log_q, log_p = (s.double() / T).log_softmax(-1), (t.double() / T).log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if top_k:
        idx = log_p.topk(top_k, -1).indices
        in_k = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
        p = torch.cat([p.gather(-1, idx), (p * ~in_k).sum(-1, keepdim=True)], -1)
        q = torch.cat([q.gather(-1, idx), (q * ~in_k).sum(-1, keepdim=True)], -1)
    if divergence == "reverse_kl":
        per_tok = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per_tok = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    mk = mask.double()
    return T * T * (per_tok * mk).sum() / mk.sum()


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)])
@pytest.mark.parametrize("T, top_k", [(1.0, 0), (2.0, 0), (1.0, 5), (1.5, 20)])
def test_reverse_kl_and_jsd_match_float64_reference(batch, divergence, beta, T, top_k):
    s, t, mask = batch
    s32 = s.clone().requires_grad_(True)
    loss = kd_loss(s32, t, mask, temperature=T, top_k=top_k, divergence=divergence, beta=beta, chunk_tokens=4)
    loss.backward()
    s64 = s.double().requires_grad_(True)
    ref = ref_divergence(s64, t, mask, T, top_k, divergence, beta)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(s32.grad[~mask]) == 0


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_divergences_vanish_at_equality_and_order_sensibly(batch, divergence):
    s, t, mask = batch
    assert kd_loss(s, s.clone(), mask, divergence=divergence).abs() < 1e-6
    full = kd_loss(s, t, mask, divergence=divergence)
    assert kd_loss(s, t, mask, divergence=divergence, top_k=8) <= full + 1e-6  # coarse-graining
    torch.testing.assert_close(kd_loss(s, t, mask, divergence=divergence, top_k=V - 1), full, rtol=1e-5, atol=1e-6)


def test_jsd_is_bounded_and_symmetric_at_half(batch):
    s, t, mask = batch
    jsd = kd_loss(s, t, mask, divergence="jsd", beta=0.5)
    assert 0 < jsd <= torch.log(torch.tensor(2.0)) + 1e-6  # JS divergence <= log 2
    torch.testing.assert_close(jsd, kd_loss(t, s, mask, divergence="jsd", beta=0.5))


def test_unknown_divergence_and_bad_beta_are_refused(batch):
    s, t, mask = batch
    with pytest.raises(ValueError, match="divergence='tvd' is not one of forward_kl, reverse_kl, jsd"):
        kd_loss(s, t, mask, divergence="tvd")
    with pytest.raises(ValueError, match=r"beta=1.0 must be in \(0, 1\)"):
        kd_loss(s, t, mask, divergence="jsd", beta=1.0)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_chunked_kd_equals_the_plain_autograd_version(batch, T):
    """kd_loss (chunked, gradient computed in the forward) against kd_loss_reference (whole-tensor
    F.kl_div, autograd): the two implementations `benchmarks/bench.py` compares, in fp32."""
    s, t, mask = batch
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    kd_loss(a, t, mask, temperature=T, chunk_tokens=4).backward()
    kd_loss_reference(b, t, mask, temperature=T).backward()
    torch.testing.assert_close(kd_loss(a, t, mask, temperature=T), kd_loss_reference(b, t, mask, temperature=T))
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_repeated_backward_gives_the_same_gradient(batch):
    """The backward scales its stored gradient in place; a second backward through the same graph
    (retain_graph, as the trainer's grad-share diagnostic does) must still be exact."""
    s, t, mask = batch
    targets = torch.randint(0, V, mask.shape).masked_fill(~mask, IGNORE_INDEX)
    x = s.clone().requires_grad_(True)
    y = x * 1.0  # a non-leaf, like a model's logits
    total = 0.3 * kd_loss(y, t, mask, chunk_tokens=4) + 0.7 * lm_loss(y, targets, chunk_tokens=4)
    first = torch.autograd.grad(total, x, retain_graph=True)[0]
    second = torch.autograd.grad(2.0 * total, x, retain_graph=True)[0]
    total.backward()
    ref = s.double().requires_grad_(True)
    (0.3 * ref_kd(ref, t, mask) + 0.7 * F.cross_entropy(ref.reshape(-1, V), targets.reshape(-1))).backward()
    torch.testing.assert_close(first.double(), ref.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(second, 2.0 * first, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(x.grad, first, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_from_a_top_k_teacher_equals_kd_top_k(batch, divergence, T):
    """kd_loss_topk on teacher_top_k(t) (what a cached teacher holds) is kd_loss(top_k=k) exactly."""
    s, t, mask = batch
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    top, ids, tail = teacher_top_k(t, 5, temperature=T, chunk_tokens=4)
    assert top.shape == ids.shape == (3, 11, 5) and tail.shape == (3, 11)
    cached = kd_loss_topk(a, top, ids, tail, mask, temperature=T, chunk_tokens=4, divergence=divergence)
    live = kd_loss(b, t, mask, top_k=5, temperature=T, chunk_tokens=4, divergence=divergence)
    cached.backward()
    live.backward()
    assert torch.equal(cached, live)
    assert torch.equal(a.grad, b.grad)


def test_kd_from_a_half_precision_top_k_is_close(batch):
    """A cache stores log-probs in fp16 and ids in 16 bits: the loss moves by < 0.1%."""
    s, t, mask = batch
    top, ids, tail = teacher_top_k(t, 5)
    exact = kd_loss_topk(s, top, ids, tail, mask)
    stored = kd_loss_topk(s, top.half(), ids.to(torch.int16), tail, mask)
    torch.testing.assert_close(stored, exact, rtol=1e-3, atol=0)


def test_kd_top_k_rejects_mismatched_shapes(batch):
    s, t, mask = batch
    top, ids, tail = teacher_top_k(t, 5)
    with pytest.raises(ValueError, match=r"do not match the teacher's top-k"):
        kd_loss_topk(s[:, :5], top, ids, tail, mask)
    with pytest.raises(ValueError, match=r"top_k=97 must be in \[1, 96\]"):
        teacher_top_k(t, 97)
