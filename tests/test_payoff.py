"""The payoff measures (kdlab.payoff): bytes per token, bits per byte, generation speed, the table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdlab
from kdlab.payoff import format_payoff, generation_speed, payoff_rows, token_bytes

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Émile's café — naïve façade, 10 € and ½ cup; 日本語 too 🎉",
    "  two leading spaces\nand a newline\tand a tab",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_add_up_to_the_texts_utf8_bytes(tok, text):
    tb = token_bytes(tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_special_tokens_carry_no_bytes(tok):
    tb = token_bytes(tok)
    assert all(int(tb[i]) == 0 for i in tok.all_special_ids)
    assert int((tb == 0).sum()) == len(set(tok.all_special_ids))


def test_bits_per_byte_against_a_float64_reference(tok, tiny_teacher):
    p = kdlab.resolve_precision("cpu")
    model = kdlab.load_teacher(str(tiny_teacher), "data", p)
    rows = [tok(t, add_special_tokens=False)["input_ids"][:16] for t in TEXTS]
    n = min(len(r) for r in rows)
    ids = torch.tensor([r[:n] for r in rows])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    m = kdlab.evaluate(model, None, [batch], p, token_bytes=token_bytes(tok))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    nats = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    n_bytes = sum(len(tok.decode(r[1:n]).encode("utf-8")) for r in rows)
    assert m["bytes"] == n_bytes
    assert m["student_bpb"] == pytest.approx(float(nats) / (math.log(2) * n_bytes), rel=1e-5)
    # with one model per token and per byte, bpb = ce * tokens / bytes / ln 2
    assert m["student_bpb"] == pytest.approx(m["student_ce"] * m["tokens"] / n_bytes / math.log(2), rel=1e-5)


def test_generation_speed_generates_exactly_the_tokens_it_counts(tiny_teacher, monkeypatch):
    p = kdlab.resolve_precision("cpu")
    model = kdlab.load_teacher(str(tiny_teacher), "data", p)
    shapes, generate = [], model.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(model, "generate", recording)
    prompts = torch.randint(3, 1000, (4, 5))
    speed = generation_speed(model, prompts, batch_size=2, new_tokens=7, repeats=2)
    assert speed > 0 and shapes == [(2, 12)] * 3  # warm-up + 2 timed, every row 5 + 7 tokens
    with pytest.raises(ValueError, match="needs 8 prompts, got 4"):
        generation_speed(model, prompts, batch_size=8)


def test_payoff_rows_put_the_teacher_first_at_ratio_one(tok, tiny_teacher, austen_ready):
    p = kdlab.resolve_precision("cpu")
    teacher = kdlab.load_teacher(str(tiny_teacher), "data", p)
    student = kdlab.build_student("tiny", teacher, "random", "data", p, depth=1)
    data = kdlab.prepare_data("austen", austen_ready, tok, 32)
    rows = payoff_rows(
        teacher, {"s": student}, data, p, tok, batch_size=2, eval_batches=1, speed_batches=(1, 2), new_tokens=4
    )
    t, s = rows
    assert t["model"] == "teacher" and t["ppl_x_teacher"] == 1.0 and t["speed_x_teacher_b2"] == 1.0
    assert "val_kl" not in t and s["val_kl"] > 0 and s["parameters"] < t["parameters"]
    assert s["ppl_x_teacher"] == pytest.approx(s["val_ppl"] / t["val_ppl"])
    table = format_payoff(rows).splitlines()
    assert table[0].split()[:4] == ["model", "params", "tok/s", "b1"] and len(table) == 4
