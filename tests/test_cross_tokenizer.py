"""Cross-tokenizer distillation: byte alignment, the three losses against float64 references written
here, the on-policy estimator's unbiasedness, the student's tokenizer and its embedding."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from kdlab.data.alignment import align_chunks, byte_ends, pair_documents
from kdlab.errors import KDLabError
from kdlab.loss.cross_tokenizer import (
    NO_CHUNK,
    chunk_likelihood_loss,
    chunk_log_probs,
    chunk_sampled_reverse_kl,
    chunk_starts,
    next_token_log_probs,
    shared_vocab_kd,
)
from kdlab.loss.divergences import IGNORE_INDEX, kd_loss, next_token_labels
from kdlab.manifest import load_manifest, sha256_file
from kdlab.vocab import REPO_DATA, STUDENT_TOKENIZERS, TokenizerPair, init_embedding, load_student_tokenizer


@pytest.fixture(scope="module")
def pair(tokenizer_dir):
    from transformers import AutoTokenizer

    return TokenizerPair(load_student_tokenizer("austen-bpe-8k"), AutoTokenizer.from_pretrained(tokenizer_dir))


def random_text(rng: random.Random, n: int = 60) -> str:
    """Words, several spaces in a row, newlines, 2-, 3- and 4-byte characters, a combining accent."""
    pieces = [
        "the",
        " the",
        "  ",
        " ",
        "\n\n",
        "Emma",
        "é",
        "e\u0301",
        "—",
        "“",
        "”",
        "日本",
        "😀",
        "ß",
        ",",
        "'s",
        "x",
        "\t",
    ]
    return "".join(rng.choice(pieces) for _ in range(n))


# ------------------------------------------------------------------------------ alignment
def test_identical_tokenizers_make_every_token_a_chunk(pair):
    t = pair.teacher
    ids = t("It is a truth universally acknowledged", add_special_tokens=False)["input_ids"]
    ends = byte_ends([pair.t_eos, *ids], pair.t_bytes)
    s_chunk, t_chunk = align_chunks(ends, ends)
    assert s_chunk == t_chunk == [NO_CHUNK, *range(len(ids))]


@pytest.mark.parametrize("seed", range(5))
def test_chunks_partition_the_bytes_of_random_utf8_text(pair, seed):
    """Multi-byte characters, leading and repeated spaces, an end-of-text token on the teacher's side only."""
    text = random_text(random.Random(seed))
    raw = text.encode()
    s_ids = pair.student(text, add_special_tokens=False)["input_ids"]
    t_ids = [pair.t_eos, *pair.teacher(text, add_special_tokens=False)["input_ids"]]
    s_ends, t_ends = byte_ends(s_ids, pair.s_bytes), byte_ends(t_ids, pair.t_bytes)
    assert s_ends[-1] == t_ends[-1] == len(raw)
    s_chunk, t_chunk = align_chunks(s_ends, t_ends)

    def spans(ends, chunk):  # chunk -> the bytes its tokens cover
        out, prev = {}, 0
        for e, c in zip(ends, chunk):
            if c != NO_CHUNK:
                lo, hi = out.get(c, (prev, prev))
                out[c] = (min(lo, prev), max(hi, e))
            prev = e
        return out

    s_spans, t_spans = spans(s_ends, s_chunk), spans(t_ends, t_chunk)
    assert s_spans == t_spans  # the same chunks, covering the same bytes on both sides
    covered = sorted(s_spans.values())
    assert covered[0][0] == 0 and covered[-1][1] == len(raw)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, no byte twice
    assert list(s_spans) == sorted(s_spans)  # numbered in text order

    # each model's chunk log-probabilities add up to its log-probability of the text
    torch.manual_seed(seed)
    for ids, chunk, V in ((s_ids, s_chunk, pair.s_size), (t_ids, t_chunk, pair.t_size)):
        ids_t, chunk_t = torch.tensor([ids]), torch.tensor([chunk])
        logp = next_token_log_probs(torch.randn(1, len(ids), V) * 3, ids_t).double()
        per_chunk, exists = chunk_log_probs(logp, chunk_t)
        assert bool(exists.all())
        text_tokens = chunk_t != NO_CHUNK
        assert float(per_chunk.sum()) == pytest.approx(float((logp * text_tokens).double().sum()), abs=1e-5)


def test_next_token_log_probs_equal_log_softmax():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    out = next_token_log_probs(logits, ids, chunk_tokens=5)
    ref = logits.double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert out[:, 0].abs().max() == 0
    torch.testing.assert_close(out[:, 1:].double(), ref, atol=1e-6, rtol=0)


def test_align_chunks_refuses_different_texts():
    with pytest.raises(ValueError, match="same text"):
        align_chunks([1, 3], [1, 2])


# ------------------------------------------------------------------------------ (a) shared-vocabulary KD
def _same_tokenizer_batch(pair, T: float):
    t = pair.teacher
    rows = ["It is a truth universally acknowledged, that a single man", "Emma Woodhouse, handsome, clever, and rich"]
    ids = [[pair.t_eos, *t(r, add_special_tokens=False)["input_ids"]] for r in rows]
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids])
    chunk = torch.tensor(
        [
            align_chunks(byte_ends(r, pair.t_bytes), byte_ends(r, pair.t_bytes))[0] + [NO_CHUNK] * (width - len(r))
            for r in ids
        ]
    )
    labels = input_ids.masked_fill(chunk == NO_CHUNK, IGNORE_INDEX)
    labels[:, 0] = input_ids[:, 0]  # the end-of-text token is an input, not a padding
    return input_ids, chunk, labels


@pytest.mark.parametrize("divergence,T", [("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 1.0), ("jsd", 1.5)])
def test_identical_tokenizers_equal_kdlab_full_kl(pair, divergence, T):
    _, chunk, labels = _same_tokenizer_batch(pair, T)
    V = pair.t_size
    torch.manual_seed(1)
    s = (torch.randn(*chunk.shape, V) * 2).requires_grad_()
    t = torch.randn(*chunk.shape, V) * 2
    mask = next_token_labels(labels) != IGNORE_INDEX
    every = torch.arange(V)
    ours = shared_vocab_kd(s, t, chunk, chunk, every, every, temperature=T, divergence=divergence)
    ref = kd_loss(s, t, mask, temperature=T, divergence=divergence)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6, abs=1e-7)
    g_ours = torch.autograd.grad(ours, s)[0]
    g_ref = torch.autograd.grad(kd_loss(s, t, mask, temperature=T, divergence=divergence), s)[0]
    torch.testing.assert_close(g_ours, g_ref, atol=1e-7, rtol=1e-5)


def test_shared_vocab_kd_matches_float64_reference():
    """Two toy vocabularies (7 and 9 tokens, 4 shared), rows of different lengths, T = 2."""
    torch.manual_seed(3)
    s_shared, t_shared = torch.tensor([0, 2, 3, 6]), torch.tensor([5, 1, 8, 0])
    s_chunk = torch.tensor([[NO_CHUNK, 0, 1, 1, 2, 3, NO_CHUNK], [NO_CHUNK, 0, 0, 1, 2, 2, 3]])
    t_chunk = torch.tensor([[NO_CHUNK, 0, 0, 1, 2, 3, 3, NO_CHUNK], [NO_CHUNK, 0, 1, 1, 2, 3, NO_CHUNK, NO_CHUNK]])
    s = torch.randn(2, 7, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 8, 9, dtype=torch.float64)
    T, N = 2.0, 11
    ours = shared_vocab_kd(s.float(), t.float(), s_chunk, t_chunk, s_shared, t_shared, temperature=T, num_valid=N)

    def buckets(row, shared):  # float64: shared probabilities, then the rest's total
        p = (row / T).softmax(-1)
        return torch.cat([p[shared], (1 - p[shared].sum()).reshape(1)])

    total = torch.zeros((), dtype=torch.float64)
    for b in range(2):
        s_pos = [i for i in range(6) if s_chunk[b, i + 1] != NO_CHUNK and s_chunk[b, i + 1] != s_chunk[b, i]]
        t_pos = [i for i in range(7) if t_chunk[b, i + 1] != NO_CHUNK and t_chunk[b, i + 1] != t_chunk[b, i]]
        assert len(s_pos) == len(t_pos) == 4
        for i, j in zip(s_pos, t_pos):
            p, q = buckets(t[b, j], t_shared), buckets(s[b, i], s_shared)
            total = total + (p * (p / q).log()).sum()
    ref = T**2 * total / N
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    s_f = s.detach().float().requires_grad_()
    g = torch.autograd.grad(
        shared_vocab_kd(s_f, t.float(), s_chunk, t_chunk, s_shared, t_shared, temperature=T, num_valid=N), s_f
    )[0]
    torch.testing.assert_close(g.double(), torch.autograd.grad(ref, s)[0], atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------ (b) chunk likelihood
def test_chunk_likelihood_matches_float64_binary_kl():
    torch.manual_seed(4)
    log_q = (-torch.rand(3, 5, dtype=torch.float64) * 6).requires_grad_()
    log_p = -torch.rand(3, 5, dtype=torch.float64) * 6
    log_p[0, 0] = -1e-3  # a chunk the teacher is nearly sure of
    mask = torch.rand(3, 5) > 0.3
    p, q = log_p.exp(), log_q.exp()
    ref = ((p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()) * mask).sum() / 7
    lq = log_q.detach().float().requires_grad_()
    ours = chunk_likelihood_loss(lq, log_p.float(), mask, num_valid=7)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(
        torch.autograd.grad(ours, lq)[0].double(), torch.autograd.grad(ref, log_q)[0], atol=1e-6, rtol=1e-4
    )
    # 0 where the student's chunk probabilities are the teacher's, and finite at probability 1
    assert float(chunk_likelihood_loss(log_p.float(), log_p.float(), mask)) == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(
        chunk_likelihood_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))
    )


# ------------------------------------------------------------------------------ (c) on-policy, per chunk
def _greedy(text: str, vocab: list[str]) -> list[int]:
    """Longest match first: the toy teacher's tokenization."""
    out, i = [], 0
    while i < len(text):
        j = max((k for k, v in enumerate(vocab) if text.startswith(v, i)), key=lambda k: len(vocab[k]))
        out.append(j)
        i += len(vocab[j])
    return out


def test_chunk_sampled_reverse_kl_is_unbiased_on_a_toy_pair_of_tokenizers():
    """Student: characters a, b; teacher: a, b, ab (longest match). Texts of 4 bytes. The estimator's
    value and gradient, exactly averaged over the student's distribution and by Monte Carlo, against
    KL(q || p) and its gradient computed by enumerating every text."""
    torch.manual_seed(5)
    L, s_vocab, t_vocab = 4, ["a", "b"], ["a", "b", "ab"]
    prefixes = ["".join(p) for n in range(L) for p in itertools.product("ab", repeat=n)]
    theta = {p: torch.randn(2, dtype=torch.float64, requires_grad=True) for p in prefixes}  # the student
    t_prefixes = {text[:i] for text in map("".join, itertools.product("ab", repeat=L)) for i in range(L)}
    teacher = {p: torch.randn(3, dtype=torch.float64) for p in t_prefixes}
    texts = ["".join(y) for y in itertools.product("ab", repeat=L)]

    def student_token_logp(y):  # [BOS-less] log q of each character given the bytes before it
        return torch.stack([theta[y[:i]].log_softmax(-1)[s_vocab.index(y[i])] for i in range(L)])

    def teacher_token_logp(y):
        ids, out, pos = _greedy(y, t_vocab), [], 0
        for j in ids:
            out.append(teacher[y[:pos]].log_softmax(-1)[j])
            pos += len(t_vocab[j])
        return ids, torch.stack(out)

    estimates, grads, log_q, rtg_grads = [], [], [], []
    for y in texts:
        s_lp = student_token_logp(y)
        t_ids, t_lp = teacher_token_logp(y)
        s_chunk, t_chunk = align_chunks(list(range(1, L + 1)), byte_ends(t_ids, [1, 1, 2]))
        s_c, exists = chunk_log_probs(s_lp[None].float(), torch.tensor([s_chunk]))
        t_c, _ = chunk_log_probs(t_lp[None].float(), torch.tensor([t_chunk]))
        value = chunk_sampled_reverse_kl(s_c, t_c, exists, num_valid=1)
        params = list(theta.values())
        g = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        grads.append(torch.cat([torch.zeros(2, dtype=torch.float64) if x is None else x.double() for x in g]))
        to_go = chunk_sampled_reverse_kl(s_c, t_c, exists, num_valid=1, discount=1.0)
        g = torch.autograd.grad(to_go, params, allow_unused=True, retain_graph=True)
        rtg_grads.append(torch.cat([torch.zeros(2, dtype=torch.float64) if x is None else x.double() for x in g]))
        estimates.append(float(value.detach()))
        log_q.append(s_lp.sum())
    log_q = torch.stack(log_q)
    q = log_q.exp()
    assert float(q.detach().sum()) == pytest.approx(1.0, abs=1e-12)
    log_p = torch.stack([teacher_token_logp(y)[1].sum() for y in texts])
    exact = (q * (log_q - log_p)).sum()
    exact_grad = torch.cat(torch.autograd.grad(exact, list(theta.values())))
    exact = exact.detach()
    est, grads, weights = torch.tensor(estimates, dtype=torch.float64), torch.stack(grads), q.detach()
    # the estimator's expectation under q, exactly
    assert float((weights * est).sum()) == pytest.approx(float(exact), abs=1e-5)
    torch.testing.assert_close((weights[:, None] * grads).sum(0), exact_grad, atol=1e-5, rtol=1e-4)
    # and by Monte Carlo: 20,000 texts sampled from the student, within 4 standard errors
    M = 20_000
    draws = torch.multinomial(weights, M, replacement=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(texts)).double() / M
    mc, mc_grad = (freq * est).sum(), (freq[:, None] * grads).sum(0)
    se = ((weights * (est - exact) ** 2).sum() / M).sqrt()
    se_grad = ((weights[:, None] * (grads - exact_grad) ** 2).sum(0) / M).sqrt()
    assert abs(float(mc - exact)) < 4 * float(se)
    assert bool(((mc_grad - exact_grad).abs() <= 4 * se_grad + 1e-9).all())
    # the return to go is biased here: a chunk's end depends on the bytes after it
    rtg_bias = ((weights[:, None] * torch.stack(rtg_grads)).sum(0) - exact_grad).abs().max()
    assert float(rtg_bias) > 1e-2


def test_the_token_level_score_gives_each_row_its_whole_log_ratio():
    """With `sampled_log_q`, the gradient is R x grad sum_t log q(y_t) per row, tokens outside the scored
    chunks included (float64 reference); the value is the chunks' log-ratio, unchanged."""
    torch.manual_seed(8)
    token_lq = (-torch.rand(2, 6, dtype=torch.float64) * 3).requires_grad_()
    sampled = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    chunk = torch.tensor([[NO_CHUNK, NO_CHUNK, 0, 1, 1, 2], [NO_CHUNK, NO_CHUNK, NO_CHUNK, 0, 1, NO_CHUNK]])
    t_c = -torch.rand(2, 3, dtype=torch.float64) * 3
    lq = token_lq.detach().float().requires_grad_()
    s_c, exists = chunk_log_probs(lq, chunk)
    t_c = t_c.float() * exists
    ours = chunk_sampled_reverse_kl(s_c, t_c, exists, num_valid=5, sampled_log_q=lq * sampled)
    R = [float(((s_c.detach() - t_c) * exists)[b].sum()) for b in range(2)]
    ref_value = sum(R) / 5
    ref_grad = torch.stack([R[b] * sampled[b].double() for b in range(2)]) / 5
    assert float(ours.detach()) == pytest.approx(ref_value, rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, lq)[0].double(), ref_grad, atol=1e-6, rtol=1e-5)


def test_special_token_text_in_the_corpus_is_read_as_text(pair):
    texts = ["She wrote <|endoftext|> and <|im_end|> in a letter, and nothing else."]
    split = pair_documents(texts, pair, seq_len=64)
    b = split.batch([0])
    s_ids = b["input_ids"][0][b["attention_mask"][0].bool()]
    t_ids = b["t_input_ids"][0][b["t_attention_mask"][0].bool()]
    assert pair.student.decode(s_ids[1:]) == texts[0] == pair.teacher.decode(t_ids[1:])
    assert int(pair.s_bytes[s_ids].sum()) == int(pair.t_bytes[t_ids].sum()) == len(texts[0].encode())


# ------------------------------------------------------------------------------ the student's tokenizer
def test_committed_tokenizer_matches_the_manifest_and_round_trips(pair):
    entry = load_manifest()["tokenizers"]["austen-bpe-8k"]
    path = REPO_DATA / STUDENT_TOKENIZERS["austen-bpe-8k"]
    assert sha256_file(path) == entry["sha256"] and path.stat().st_size <= 8 * 2**20
    assert pair.s_size == entry["vocab_size"] == 8192
    text = random_text(random.Random(9), 200)
    assert pair.student.decode(pair.student(text, add_special_tokens=False)["input_ids"]) == text


def test_student_tokenizer_bad_names_are_refused(tmp_path):
    with pytest.raises(KDLabError, match="austen-bpe-8k"):
        load_student_tokenizer("no-such-tokenizer")
    with pytest.raises(KDLabError, match="neither"):
        load_student_tokenizer(str(tmp_path))


def test_embedding_init_copies_shared_tokens_and_averages_the_rest(pair):
    torch.manual_seed(6)
    emb = torch.randn(pair.t_size, 8)
    out = init_embedding(pair, emb)
    assert out.shape == (pair.s_size, 8) and out.dtype == torch.float32
    # exact on a token the teacher also has
    s_id = pair.student.convert_tokens_to_ids("Ġthe")
    t_id = pair.teacher.convert_tokens_to_ids("Ġthe")
    assert torch.equal(out[s_id], emb[t_id])
    assert torch.equal(out[pair.s_shared], emb[pair.t_shared])
    # a token the teacher lacks: the mean of its tokenization's rows (float64 reference)
    shared = set(pair.s_shared.tolist())
    word = next(
        i
        for i, s in enumerate(pair.s_strings)
        if i not in shared and isinstance(s, bytes) and s.isalpha() and len(s) > 4
    )
    pieces = pair.teacher(pair.s_strings[word].decode(), add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    torch.testing.assert_close(out[word].double(), emb[pieces].double().mean(0), atol=1e-6, rtol=0)


def test_paired_blocks_cover_the_same_bytes_on_both_sides(pair):
    texts = [random_text(random.Random(s), 300) for s in range(3)] + ["short"]
    split = pair_documents(texts, pair, seq_len=32)
    for i in range(len(split)):
        b = split.batch([i])
        s_ids = b["input_ids"][0][b["attention_mask"][0].bool()]
        t_ids = b["t_input_ids"][0][b["t_attention_mask"][0].bool()]
        assert s_ids[0] == pair.s_eos and t_ids[0] == pair.t_eos
        assert int(pair.s_bytes[s_ids].sum()) == int(pair.t_bytes[t_ids].sum())
        assert pair.student.decode(s_ids[1:]) == pair.teacher.decode(t_ids[1:])
        assert int(chunk_starts(b["s_chunk"]).sum()) == int(chunk_starts(b["t_chunk"]).sum()) > 0
    text_ids = [split.input_ids[i][1:][split.attention_mask[i][1:].bool()] for i in range(len(split))]
    joined = "".join(pair.student.decode(ids) for ids in text_ids)
    assert joined == "".join(texts)
    share = split.aligned_share()
    assert 0 < share["student"] <= 1 and 0 < share["teacher"] <= 1


def test_austen_aligned_share(pair, austen_ready):
    rows = [
        json.loads(line)["text"] for line in (austen_ready / "austen" / "validation.jsonl").read_text().splitlines()
    ]
    share = pair_documents(rows[:2], pair, seq_len=256).aligned_share()
    assert share["student"] > 0.9 and share["teacher"] > 0.9  # measured on the whole split: 0.968 and 0.963
