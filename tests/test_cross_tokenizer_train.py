"""Cross-tokenizer distillation end to end: a run with the student's own tokenizer (offline and
on-policy), the objective's override against the plain objective when the tokenizers are one, and
the teacher's side of generated text."""

from __future__ import annotations

import json
import random

import pytest
import torch

import kdlab
from kdlab.data.alignment import pair_documents, pair_generated
from kdlab.loss.cross_tokenizer import NO_CHUNK
from kdlab.loss.objective import Objective, StepCounts
from kdlab.precision import resolve_precision
from kdlab.training.cross_tokenizer import CrossTokenizerObjective
from kdlab.vocab import TokenizerPair, load_student_tokenizer


def _records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_the_students_own_tokenizer(tiny_overrides, tmp_path):
    over = {**tiny_overrides, "student_tokenizer": "austen-bpe-8k", "term_weights": {"chunk": 0.5},
            "max_steps": 3, "early_stopping": False}  # fmt: skip
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    assert isinstance(trainer.objective, CrossTokenizerObjective)
    assert trainer.student.config.vocab_size == 8192 and len(trainer.tokenizer) == 8192
    trainer.fit()
    out = tmp_path / "run"
    records = _records(out)
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(all(torch.isfinite(torch.tensor(r[k])) for k in ("kd", "lm", "chunk")) for r in train)
    evals = [r for r in records if r["kind"] == "eval"]
    for r in evals:  # bits per byte over the same bytes on both sides, KL at the aligned positions
        assert r["student_bpb"] > 0 and r["teacher_bpb"] > 0 and 0 < r["aligned"] <= r["tokens"]
        assert 0 <= r["top1_agree"] <= 1 and r["kl"] >= 0
    final = kdlab.vocab.load_student_tokenizer(str(out / "final"))
    assert len(final) == 8192  # the student is saved with its own tokenizer


def test_identical_tokenizers_the_override_equals_the_plain_objective(tiny_overrides, tiny_teacher):
    """Pairing a tokenizer with itself: every token is a chunk, and the cross-tokenizer objective's
    KD, chunk and LM terms equal the plain objective's on the same text (unfused: the same math)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    pair = TokenizerPair(tok, tok)
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
             "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"]  # fmt: skip
    split = pair_documents(texts, pair, seq_len=16)
    batch = split.batch(list(range(len(split))))
    over = {**tiny_overrides, "fused_loss": False, "term_weights": {"chunk": 0.5}, "temperature": 2.0}
    cfg = kdlab.load_config(overrides=over)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    precision = resolve_precision("cpu", "float32", "float32")
    counts = StepCounts.of([batch])
    plain = Objective(cfg, student, teacher, 10).loss(student, teacher, batch, precision, counts)
    cross = CrossTokenizerObjective(cfg, student, teacher, 10, pair).loss(student, teacher, batch, precision, counts)
    for name in ("kd", "lm", "chunk"):
        assert cross.terms[name].item() == pytest.approx(plain.terms[name].item(), rel=1e-6, abs=1e-7), name


def test_the_teacher_reads_generated_text_re_tokenized(tokenizer_dir):
    from transformers import AutoTokenizer

    pair = TokenizerPair(load_student_tokenizer("austen-bpe-8k"), AutoTokenizer.from_pretrained(tokenizer_dir))
    s = pair.student
    prompt_text = "She was the youngest of the two daughters of a most affectionate"
    prompt = torch.tensor([[pair.s_eos, *s(prompt_text, add_special_tokens=False)["input_ids"]]] * 3)
    rng = random.Random(0)
    good = s(" father; and had, in consequence — “dear” café", add_special_tokens=False)["input_ids"]
    noise = [rng.randrange(1, 8192) for _ in range(12)]  # any student tokens: partial characters included
    rows = [good + [pair.s_eos] + good, good + noise, noise + good]
    G = max(map(len, rows))
    cont = torch.tensor([r + [pair.s_eos] * (G - len(r)) for r in rows])
    out = pair_generated(prompt, cont, pair)
    P = prompt.shape[1]
    for b in range(3):
        s_chunk, t_chunk = out["s_chunk"][b], out["t_chunk"][b]
        assert (s_chunk[:P] == NO_CHUNK).all()  # the prompt is not scored
        scored = s_chunk != NO_CHUNK
        assert set(s_chunk[scored].tolist()) == set(t_chunk[t_chunk != NO_CHUNK].tolist())
        # the scored student tokens and the scored teacher tokens stand for the same bytes
        s_bytes = b"".join(pair.s_strings[i] for i in torch.cat([prompt[b], cont[b]])[scored].tolist())
        t_ids = out["t_input_ids"][b][t_chunk != NO_CHUNK].tolist()
        assert s_bytes == b"".join(pair.t_strings[i] for i in t_ids) and len(s_bytes) > 0
        # the teacher read the prompt and the kept text, after its end-of-text token
        t_all = out["t_input_ids"][b][out["t_attention_mask"][b].bool()]
        assert t_all[0] == pair.t_eos and pair.teacher.decode(t_all[1:]).startswith(prompt_text)
    # row 0: scoring stops at the student's end-of-text token (nothing after it is scored), which is the
    # last token the score covers; rows 1 and 2 (no special token): every generated token is scored
    assert not (out["s_chunk"][0][P + len(good) :] != NO_CHUNK).any()
    assert out["s_sampled"][0].tolist() == [False] * P + [True] * (len(good) + 1) + [False] * (G - len(good) - 1)
    assert out["s_sampled"][1][P : P + len(rows[1])].all() and not out["s_sampled"][:, :P].any()


def test_cross_tokenizer_on_policy_scores_chunks_of_the_students_text(tiny_overrides, tmp_path):
    over = {**tiny_overrides, "student_tokenizer": "austen-bpe-8k", "on_policy": 1.0, "prompt_tokens": 12,
            "on_policy_loss": "sampled_reverse_kl", "max_steps": 2, "early_stopping": False}  # fmt: skip
    kdlab.train(kdlab.load_config(overrides=over))
    train = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert train and all("gen/kd" in r and torch.isfinite(torch.tensor(r["gen/kd"])) for r in train)
    assert all(r["weights"]["lm"] >= 0 for r in train)
