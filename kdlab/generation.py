"""Text, not only numbers: continue held-out prompts with a model and measure the continuations.

    prompts = held_out_prompts(cfg.data, cfg.data_dir, n=4)
    greedy = generate(student, tokenizer, prompts, precision=trainer.precision)             # deterministic
    sampled = generate(student, tokenizer, prompts, sample=True, seed=0, precision=...)     # reproducible
    distinct_n(greedy, 2), teacher_nll(teacher, tokenizer, greedy, precision=...)

`generate` is Hugging Face's `model.generate` (KV cache, greedy or nucleus sampling) on all prompts at
once, padded on the left (the side a decoder-only model continues from), under the run's precision
policy (the student's autocast, the teacher in its own dtype), with the RNG forked so that sampling
never moves the training run's random stream. Two measures go beside the text:

    distinct-n    unique n-grams / all n-grams over the continuations' token ids (Li et al., 2016):
                  a student stuck in "a a a a" scores near 0, varied text near 1
    teacher NLL   -1/N sum_t log p_teacher(x_t | prompt, x_<t) over the continuation tokens: how
                  likely the teacher finds the student's own text (lower = more teacher-like)
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kdlab.precision import Precision


@dataclass(frozen=True)
class Continuation:
    prompt: str
    text: str  # the continuation only, decoded
    token_ids: tuple[int, ...]  # its token ids, as generated (the measures use these, not a re-tokenisation)


def held_out_prompts(data: str, data_dir: str | Path, n: int = 4, words: int = 12) -> list[str]:
    """`n` prompts from the corpus' test split (never trained on): the first `words` words of sentences
    of 20+ words, taken at evenly spaced places so they come from different chapters."""
    from kdlab.data.corpus import load_documents

    docs = load_documents(data, data_dir)["test"]["text"]
    sentences = [
        s
        for d in docs
        for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split()))
        if len(s.split()) >= 20 and s[0].isupper() and "--" not in s and not s.isupper()
    ]
    if len(sentences) < n:
        raise ValueError(f"the test split of {data!r} has {len(sentences)} sentences of 20+ words; need {n}")
    picks = [sentences[round(i * (len(sentences) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else sentences[:1]
    return [" ".join(s.split()[:words]) for s in picks]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 32,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    precision: Precision | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[Continuation]:
    """Continue each prompt with `model` (greedy, or sampled at `temperature` / `top_p` with `seed`).

    `repetition_penalty` > 1 makes tokens already in the text less likely (CTRL, Keskar et al.
    2019); `no_repeat_ngram_size` n > 0 forbids any n-gram from occurring twice. Both apply to greedy
    and sampled decoding alike: HF's own logits processors.

    The model's training/eval mode is restored afterwards; the global RNG is untouched (forked)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    options = dict(
        do_sample=sample,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    if sample:
        options |= dict(temperature=temperature, top_p=top_p, top_k=0)
    else:  # greedy: say so, so a model's generation_config (sampling defaults) does not warn or win
        options |= dict(temperature=None, top_p=None, top_k=None)
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
            torch.manual_seed(seed)
            ids = model.generate(**enc, **options)[:, enc["input_ids"].shape[1] :]
    finally:
        tokenizer.padding_side = pad_side
        model.train(was_training)
    out = []
    for prompt, row in zip(prompts, ids.tolist()):
        if options["pad_token_id"] in row:  # finished early (end of text): what follows is padding
            row = row[: row.index(options["pad_token_id"])]
        out.append(Continuation(prompt, tokenizer.decode(row, skip_special_tokens=True), tuple(row)))
    return out


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) logits with every token outside the nucleus set to -inf: the smallest set of most
    likely tokens whose probabilities sum to at least `top_p` (the most likely token always stays)."""
    if top_p >= 1.0:
        return logits
    ranked, order = logits.sort(-1, descending=True)
    probs = ranked.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
    return logits.scatter(-1, order, ranked.masked_fill(outside, float("-inf")))


class RowSeededSampler:
    """A logits processor that samples by the Gumbel-max trick, one random stream per row.

    argmax(logits / T + g), g ~ Gumbel(0, 1) i.i.d. per token, is an exact sample of softmax(logits / T)
    (restricted to the top-p nucleus when top_p < 1). Drawing g from a generator seeded per row makes
    each row's continuation a function of its own seed and prompt only, not of the other rows in its
    batch: gradient-accumulation micro-batches and torchrun processes sample what one process with the
    whole batch samples, and a resumed run samples what the uninterrupted one did. Used with greedy
    decoding (HF then takes the argmax of the processed scores).
    """

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0, device="cpu"):
        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = top_p_filter(scores.float() / self.temperature, self.top_p)
        shape, device = scores.shape[1:], scores.device
        u = torch.stack([torch.rand(shape, generator=g, device=device) for g in self.generators])
        return scores - torch.log(-torch.log(u.clamp_min(1e-30)))  # + Gumbel noise


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    seeds: list[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    precision: Precision | None = None,
) -> torch.Tensor:
    """(B, P) prompt ids -> (B, max_new_tokens) continuation ids, with HF `generate` (KV cache).

    `seeds` (one per row) samples each row from its own stream (`RowSeededSampler`); None is greedy.
    Every row runs the full length: end-of-text does not stop it (as in the packed training blocks,
    a continuation may run on into a new document). The model's train/eval mode is restored; under
    `precision` the student's autocast applies."""
    from transformers import LogitsProcessorList

    was_training = model.training
    model.eval()
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    processors = LogitsProcessorList()
    if seeds is not None:
        if len(seeds) != input_ids.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {input_ids.shape[0]} prompts")
        processors.append(RowSeededSampler(seeds, temperature, top_p, input_ids.device))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    try:
        with autocast:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=None,
                do_sample=False,  # the processor samples (or not): HF takes the argmax
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=None,  # never stop early: every row is max_new_tokens long
                pad_token_id=pad,
                logits_processor=processors,
            )
    finally:
        model.train(was_training)
    new = out[:, input_ids.shape[1] :]
    if new.shape[1] != max_new_tokens:  # a model whose generation config still stops early
        raise RuntimeError(f"generate returned {new.shape[1]} new tokens, not {max_new_tokens}")
    return new


def distinct_n(continuations: list[Continuation], n: int = 2) -> float:
    """Unique n-grams / all n-grams of the continuations' token ids, pooled (0.0 when there are none)."""
    grams = [c.token_ids[i : i + n] for c in continuations for i in range(len(c.token_ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def teacher_nll(teacher, tokenizer, continuations: list[Continuation], precision: Precision | None = None) -> float:
    """Mean per-token negative log-likelihood (nats) the teacher gives the continuation tokens, each
    conditioned on its prompt and the continuation before it (the prompt's own tokens not counted)."""
    total, count = 0.0, 0
    device = _device_of(teacher)
    for c in continuations:
        if not c.token_ids:
            continue
        prompt_ids = tokenizer(c.prompt, return_tensors="pt")["input_ids"][0]
        ids = torch.cat([prompt_ids, torch.tensor(c.token_ids)]).to(device)[None]
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits = teacher(input_ids=ids).logits[0].float()
        start = len(prompt_ids)
        logp = logits[start - 1 : -1].log_softmax(-1)  # position t-1 predicts token t
        target = ids[0, start:]
        total -= logp.gather(-1, target[:, None]).sum().item()
        count += len(target)
    return total / count if count else float("nan")


def sample_table(rows: dict[str, list[Continuation]], width: int = 100) -> str:
    """A plain-text table: for each prompt, every model's continuation on one line (cut at `width`)."""
    names = list(rows)
    prompts = [c.prompt for c in rows[names[0]]]
    pad = max(len(n) for n in names)
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(f"prompt: {prompt} ...")
        for name in names:
            text = " ".join(rows[name][i].text.split())
            lines.append(f"  {name:{pad}s} | {text[:width]}{'…' if len(text) > width else ''}")
    return "\n".join(lines)


__all__ = [
    "Continuation",
    "held_out_prompts",
    "generate",
    "generate_ids",
    "RowSeededSampler",
    "top_p_filter",
    "distinct_n",
    "teacher_nll",
    "sample_table",
]
