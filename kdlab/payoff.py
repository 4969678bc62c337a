"""What distillation is for, measured: a smaller, faster model that keeps most of the teacher's quality.

    tb = token_bytes(tokenizer)                                     # UTF-8 bytes of every token id
    m = evaluate(student, teacher, batches, precision, token_bytes=tb)   # + student_bpb, teacher_bpb
    speed = generation_speed(student, prompts, batch_size=8)        # tokens/s, KV cache, greedy
    rows = payoff_rows(teacher, {"student": student}, data, ...)   # the table `kdlab eval` prints

Bits per byte: a model's nats over a text divided by the text's UTF-8 bytes and by ln 2,

    bpb = sum_t -ln p(x_t | x_<t)  /  (ln 2 * sum_t bytes(x_t))

the code length per byte of text, which does not depend on how the text was cut into tokens (a
tokenizer with longer tokens has higher perplexity per token for the same model quality). Special
tokens (end of text) carry no bytes and are left out of both sums, as nanochat's evaluation does.

Generation speed: Hugging Face `generate` with its KV cache, greedy, exactly `new_tokens` tokens
per row after a prompt of `prompt_tokens` held-out tokens, one untimed warm-up call, then the best of
`repeats` timed calls (the least disturbed by the rest of the machine). Tokens/s counts generated
tokens of all rows.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

LN2 = math.log(2.0)


def token_bytes(tokenizer) -> torch.Tensor:
    """(V,) int64: the UTF-8 bytes each token id stands for; 0 for special tokens.

    Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3) write each byte as one printable character;
    mapping the characters back gives the exact byte count. Other tokenizers: the length of the
    token decoded alone (exact for whole characters). kdlab.vocab.token_strings does the mapping."""
    from kdlab.vocab import byte_lengths, token_strings

    return byte_lengths(token_strings(tokenizer))


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / (LN2 * n_bytes) if n_bytes else float("nan")


@torch.no_grad()
def generation_speed(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    batch_size: int,
    new_tokens: int = 64,
    repeats: int = 3,
) -> float:
    """Generated tokens per second: greedy, KV cache, `batch_size` rows of `prompts` ((N, P) ids)."""
    ids = prompts[:batch_size].to(next(model.parameters()).device)
    if ids.shape[0] < batch_size:
        raise ValueError(f"generation_speed needs {batch_size} prompts, got {ids.shape[0]}")
    options = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # every row the same length: tokens/s counts real work only
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
    )
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    try:
        model.generate(ids, attention_mask=torch.ones_like(ids), **options)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **options)
            sync()
            best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return batch_size * new_tokens / best


def payoff_rows(
    teacher: torch.nn.Module,
    students: dict[str, torch.nn.Module],
    data: dict[str, Any],
    precision,
    tokenizer,
    *,
    batch_size: int = 4,
    eval_batches: int = 0,
    speed_batches: tuple[int, ...] = (1, 8),
    new_tokens: int = 64,
    prompt_tokens: int = 32,
    splits: tuple[str, ...] = ("validation", "test"),
    repeats: int = 3,
    pair=None,
) -> list[dict[str, Any]]:
    """One row per model (the teacher first): parameters, tokens/s at each batch size, validation and
    test perplexity and bits per byte, KL(teacher || student) and top-1 agreement, and the ratios to
    the teacher (perplexity, bits per byte and speed x teacher).

    `pair` (kdlab.vocab.TokenizerPair): the students have a tokenizer of their own, `tokenizer`, and
    `data` is paired (kdlab.data.alignment); the teacher reads the same text in its own tokens, so bits
    per byte are over the same bytes, while perplexities and tokens/s are each per its own token."""
    from kdlab.data.alignment import teacher_batch
    from kdlab.models import count_parameters
    from kdlab.training.evaluation import evaluate

    tb = token_bytes(tokenizer)
    n = max(speed_batches, default=1)
    prompts = data["validation"].input_ids[:n, :prompt_tokens]
    t_prompts = data["validation"].t_input_ids[:n, :prompt_tokens] if pair is not None else prompts
    models = {"teacher": teacher, **students}
    rows = []
    for name, model in models.items():
        own = pair is not None and model is not teacher  # a student with its own tokenizer
        row: dict[str, Any] = {"model": name, "parameters": count_parameters(model), "own_tokenizer": own}
        ids = t_prompts if model is teacher else prompts
        for b in speed_batches:
            row[f"tokens_per_s_b{b}"] = generation_speed(model, ids, b, new_tokens, repeats)
        for split in splits:
            batches = data[split].eval_batches(batch_size, eval_batches)
            if model is teacher and pair is not None:  # its own tokens of the same text
                m = evaluate(model, None, map(teacher_batch, batches), precision, token_bytes=token_bytes(pair.teacher))
            else:
                m = evaluate(
                    model, None if model is teacher else teacher, batches, precision, token_bytes=tb, pair=pair
                )
            key = "val" if split == "validation" else "test"
            row[f"{key}_ppl"], row[f"{key}_bpb"], row[f"{key}_tokens"] = m["student_ppl"], m["student_bpb"], m["tokens"]
            row[f"{key}_bytes"] = m["bytes"]
            if model is not teacher:
                row[f"{key}_kl"], row[f"{key}_top1"] = m["kl"], m["top1_agree"]
        rows.append(row)
    t, key = rows[0], "val" if "validation" in splits else "test"
    for row in rows:
        row["ppl_x_teacher"] = row[f"{key}_ppl"] / t[f"{key}_ppl"]
        row["bpb_x_teacher"] = row[f"{key}_bpb"] / t[f"{key}_bpb"]
        for b in speed_batches:
            row[f"speed_x_teacher_b{b}"] = row[f"tokens_per_s_b{b}"] / t[f"tokens_per_s_b{b}"]
    return rows


def format_payoff(rows: list[dict[str, Any]]) -> str:
    """The table `kdlab eval` prints: one line per model, the teacher first; columns for what was measured."""
    t = rows[0]
    speeds = sorted(int(k.rsplit("b", 1)[1]) for k in t if k.startswith("tokens_per_s_b"))
    cols = [("model", 24, lambda r: r["model"][:24]), ("params", 7, lambda r: f"{r['parameters'] / 1e6:.1f}M")]
    cols += [(f"tok/s b{b}", 9, lambda r, b=b: f"{r[f'tokens_per_s_b{b}']:.1f}") for b in speeds]
    for key, name in (("val", "val"), ("test", "test")):
        if f"{key}_ppl" in t:
            cols += [
                (f"{name} ppl", 8, lambda r, k=key: f"{r[f'{k}_ppl']:.2f}"),
                (f"{name} bpb", 8, lambda r, k=key: f"{r[f'{k}_bpb']:.4f}"),
                (f"{name} KL", 7, lambda r, k=key: f"{r[f'{k}_kl']:.4f}" if f"{k}_kl" in r else "0"),
                (f"{name} top-1", 9, lambda r, k=key: f"{r[f'{k}_top1']:.3f}" if f"{k}_top1" in r else "1"),
            ]
    if any(r.get("own_tokenizer") for r in rows):  # perplexities per different tokens: compare bits per byte
        cols.append(("bpb x T", 7, lambda r: f"{r['bpb_x_teacher']:.3f}"))
    else:
        cols.append(("ppl x T", 7, lambda r: f"{r['ppl_x_teacher']:.2f}"))
    if speeds:
        cols.append(("speed x T", 9, lambda r: "/".join(f"{r[f'speed_x_teacher_b{b}']:.2f}" for b in speeds)))
    lines = ["  ".join(f"{name:{'<' if i == 0 else '>'}{w}}" for i, (name, w, _) in enumerate(cols))]
    for r in rows:
        lines.append("  ".join(f"{f(r):{'<' if i == 0 else '>'}{w}}" for i, (_, w, f) in enumerate(cols)))
    sizes = [
        f"{name} {t[f'{k}_tokens']:,} tokens / {t[f'{k}_bytes']:,} bytes"
        for k, name in (("val", "validation"), ("test", "test"))
        if f"{k}_tokens" in t
    ]
    if speeds:
        sizes.append(f"speed: greedy, KV cache, batch {' and '.join(map(str, speeds))}")
    lines.append(f"({'; '.join(sizes)})")
    return "\n".join(lines)


__all__ = ["token_bytes", "bits_per_byte", "generation_speed", "payoff_rows", "format_payoff"]
