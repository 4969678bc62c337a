"""kdlab.generation: continuations against a hand-written argmax rollout, the measures against hand counts
and PyTorch's own cross-entropy, sampling reproducible without touching the global RNG."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.generation import Continuation, distinct_n, generate, held_out_prompts, sample_table, teacher_nll


@pytest.fixture(scope="module")
def tiny(tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32)
    return model.eval(), tok


PROMPTS = ["It is a truth universally acknowledged,", "She was"]  # different lengths: left padding is used


def test_greedy_equals_a_hand_rollout(tiny):
    model, tok = tiny
    got = generate(model, tok, PROMPTS, max_new_tokens=6)
    for prompt, cont in zip(PROMPTS, got):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        want = []
        with torch.no_grad():
            for _ in range(6):  # no cache, no padding: the textbook loop
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tok.pad_token_id:
                    break
                want.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert cont.prompt == prompt
        assert list(cont.token_ids) == want
        assert cont.text == tok.decode(want, skip_special_tokens=True)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tok = tiny
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=8, sample=True, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, PROMPTS, max_new_tokens=8, sample=True, seed=3)
    c = generate(model, tok, PROMPTS, max_new_tokens=8, sample=True, seed=4)
    assert a == b
    assert a != c
    assert model.training is False


def test_mode_is_restored(tiny):
    model, tok = tiny
    model.train()
    generate(model, tok, PROMPTS[:1], max_new_tokens=2)
    assert model.training
    model.eval()


def test_distinct_n_by_hand():
    c = [Continuation("p", "", (1, 2, 1, 2, 3)), Continuation("q", "", (1, 2))]
    # bigrams: (1,2) (2,1) (1,2) (2,3) | (1,2) -> 5 in all, 3 unique
    assert distinct_n(c, 2) == pytest.approx(3 / 5)
    assert distinct_n(c, 1) == pytest.approx(3 / 7)
    assert distinct_n([Continuation("p", "", (5,))], 2) == 0.0


def test_teacher_nll_equals_cross_entropy_on_the_continuation(tiny):
    model, tok = tiny
    conts = generate(model, tok, PROMPTS, max_new_tokens=5, sample=True, seed=0)
    want_sum, count = 0.0, 0
    for c in conts:
        p = tok(c.prompt, return_tensors="pt")["input_ids"][0]
        ids = torch.cat([p, torch.tensor(c.token_ids)])
        with torch.no_grad():
            logits = model.double()(input_ids=ids[None]).logits[0]
        model.float()
        labels = ids.clone()
        labels[: len(p)] = -100  # the prompt's own tokens are not scored
        want_sum += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        count += len(c.token_ids)
    assert teacher_nll(model, tok, conts) == pytest.approx(want_sum / count, rel=1e-5)


def test_held_out_prompts_come_from_the_test_split(tmp_path):
    from kdlab.data.corpus import load_documents

    text = "\n\n".join(
        f"Paragraph {i} begins here and it goes on for quite a while with many words in it, "
        f"twenty at the very least, so that it counts as a sentence number {i}."
        for i in range(3000)
    )
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    prompts = held_out_prompts(str(f), tmp_path, n=3, words=5)
    test_text = " ".join(load_documents(str(f), tmp_path)["test"]["text"])
    assert len(prompts) == 3 and len(set(prompts)) == 3
    assert all(len(p.split()) == 5 and p in test_text for p in prompts)


def test_sample_table_lines():
    rows = {"teacher": [Continuation("A", "b c", (1,))], "student": [Continuation("A", "x " * 80, (2,))]}
    lines = sample_table(rows, width=10).splitlines()
    assert lines[0] == "prompt: A ..."
    assert lines[1] == "  teacher | b c"
    assert lines[2].startswith("  student | x x x x x") and lines[2].endswith("…")
