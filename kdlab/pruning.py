"""Which of the teacher's layers a student keeps (depth pruning before distillation).

A student with the teacher's width starts as a copy of the teacher's embeddings, final norm and
head plus `depth` of its decoder layers. Which layers matters more than anything the first training
steps do: measured on SmolLM2-135M (30 layers), with no training, 15 evenly spaced layers predict the
validation text at perplexity ~2 million, the 15 of highest block influence at ~500.

    scores = layer_scores(teacher, calibration_batches, "importance")   # one score per teacher layer
    layers = choose_layers(scores, depth=15)                           # the 15 highest, in order

The choices (config `student_layers`):

    even        evenly spaced, always the first and the last (no data needed)
    importance  block influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean over tokens of
                cos(h_in, h_out), the input and output of layer l. A layer that barely turns its
                input adds little; keep the highest. One teacher forward per calibration batch.
    drop-one    the teacher's cross-entropy with layer l skipped (made the identity), on the same
                batches: keep the layers whose removal hurts most. L + 1 forwards per batch: the
                costlier, more direct check of the first.

Both scores are deterministic for the same batches (the first blocks of the training split; the
teacher in eval mode), so a run's choice can be recomputed and is recorded with the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

LAYER_CHOICES = ("even", "importance", "drop-one")


def even_layers(depth: int, n_layers: int) -> list[int]:
    """`depth` evenly spaced layers of `n_layers`, always including the first and the last."""
    if not 1 <= depth <= n_layers:
        raise ValueError(f"depth={depth} must be in [1, {n_layers}]")
    if depth == 1:
        return [n_layers - 1]
    return [round(i * (n_layers - 1) / (depth - 1)) for i in range(depth)]


def choose_layers(scores: Sequence[float], depth: int) -> list[int]:
    """The `depth` layers of highest score, in model order; ties go to the earlier layer."""
    if not 1 <= depth <= len(scores):
        raise ValueError(f"depth={depth} must be in [1, {len(scores)}]")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:depth])


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """A Llama-style model's decoder layers (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers; layer choice needs a Llama-style model")
    return layers


@contextlib.contextmanager
def skipped(layer: torch.nn.Module):
    """Within the block, `layer` returns its input unchanged (the residual stream passes through)."""

    def identity(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    handle = layer.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _mean_ce(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of next-token CE over the batch's valid positions, their count), in float64."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = out.logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum", ignore_index=-100)
    return float(ce), int((labels != -100).sum())


@torch.no_grad()
def block_influence(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[float]:
    """BI_l = 1 - mean cos(h_in, h_out) of every decoder layer, over the valid tokens of `batches`.

    Hooks read each layer's input and output: no reliance on how a model reports hidden states.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask: torch.Tensor | None = None

    def hook(i: int):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in.double(), h_out.double(), dim=-1)  # (B, T)
            sums[i] += float((1.0 - cos)[mask].sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            am = batch.get("attention_mask")
            mask = (am != 0) if am is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
            count += int(mask.sum())
            model(input_ids=batch["input_ids"], attention_mask=am, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("block influence got no tokens")
    return (sums / count).tolist()


@torch.no_grad()
def drop_one_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[float]:
    """The model's mean next-token cross-entropy with each decoder layer skipped in turn, minus its
    cross-entropy with every layer: how much the text's loss rises without that layer."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    was_training = model.training
    model.eval()

    def mean_ce() -> float:
        total, n = 0.0, 0
        for b in batches:
            s, c = _mean_ce(model, b)
            total, n = total + s, n + c
        if n == 0:
            raise ValueError("drop-one scoring got no tokens")
        return total / n

    try:
        full = mean_ce()
        out = []
        for layer in layers:
            with skipped(layer):
                out.append(mean_ce() - full)
    finally:
        model.train(was_training)
    return out


def layer_scores(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], method: str) -> list[float]:
    """One importance score per decoder layer (higher = keep): block influence or drop-one loss."""
    if method == "importance":
        return block_influence(model, batches)
    if method == "drop-one":
        return drop_one_loss(model, batches)
    raise ValueError(f"method={method!r} has no scores; choose importance or drop-one")


def parse_layer_list(text: str) -> list[int] | None:
    """'0, 4, 29' -> [0, 4, 29]; a named choice (even, importance, drop-one) -> None."""
    if text in LAYER_CHOICES:
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"student_layers={text!r} is neither one of {', '.join(LAYER_CHOICES)} nor a list of layer numbers "
            f"such as 0,5,29"
        ) from None
    if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"student_layers={text!r} must list distinct layer numbers >= 0, such as 0,5,29")
    return sorted(layers)


__all__ = [
    "LAYER_CHOICES",
    "even_layers",
    "choose_layers",
    "block_influence",
    "drop_one_loss",
    "layer_scores",
    "parse_layer_list",
    "decoder_layers",
    "skipped",
]
