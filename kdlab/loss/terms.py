"""The loss terms: a registry of named terms, and kdlab's six built-in ones.

A term is one named scalar of the objective (kdlab.loss.objective): what it needs from the models,
how its value reduces to the step's mean, how it is computed and, if it trains parameters of its
own (a router, a projection), how those are built. Register one and every part of kdlab that
lists terms picks it up: config checks (`term_weights`, `ramps`), the curriculum, the objective,
the train records, the live plot.

    def my_term(ctx: kdlab.TermContext) -> torch.Tensor:          # a per-token mean of this micro-batch
        return ctx.student.logits.float().square().mean(-1)[ctx.mask].mean()
    kdlab.register_term(kdlab.Term("logit_l2", my_term, reduce="tokens"))
    cfg = kdlab.load_config(overrides={"term_weights": {"logit_l2": 0.01}})

Built-in terms (each unweighted):
    lm           next-token cross-entropy on the text (always computed and logged, even at weight 0)
    kd           the teacher->student divergence of `kd_divergence` at `temperature` (T^2-scaled),
                 full vocabulary or top-k buckets, or read from a teacher cache
    feature      per student block: a StudentAwareRouter over E evenly spaced teacher blocks
                 (LN-MSE or cosine, plus router_balance x its load-balancing term), averaged
    attention    MiniLM per-row KL between the attention maps of mapped blocks, averaged
    layerwise    LN-MSE between each student block's projected output and its mapped teacher
                 block's, averaged over layers
    contrastive  InfoNCE between the pooled, projected last student state and the pooled last
                 teacher state across the batch (temperature contrastive_tau)
    chunk        binary KL between teacher's and student's probability of each chunk of text
                 (kdlab.loss.cross_tokenizer.chunk_likelihood_loss; weight term_weights.chunk): across
                 tokenizers the chunks of kdlab.data.alignment, with one tokenizer every token is one

The layer map. Two different maps relate student blocks to teacher blocks, on purpose:
  * initialisation (kdlab.models, `student_init="teacher-layers"`): student block i is a copy of
    teacher block round(i * (L_t - 1) / (L_s - 1)), the first and the last included
    (30 -> 4: [0, 10, 19, 29]), so the copied stack still starts and ends like the teacher's;
  * distillation (`attention`, `layerwise`; `uniform_layer_map`): student block i is compared with
    teacher block round((i + 1) * L_t / L_s) - 1, the *end* of its share of the teacher
    (30 -> 4: [7, 14, 22, 29]), as in MiniLM and PKD: block i is asked to have done the work of
    the teacher blocks it replaces. Both are printed by `kdlab train -v`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from kdlab.errors import KDLabError
from kdlab.loss.cross_tokenizer import NO_CHUNK, chunk_likelihood_loss, chunk_log_probs, next_token_log_probs
from kdlab.loss.divergences import IGNORE_INDEX, kd_loss, kd_loss_topk, lm_loss
from kdlab.loss.features import attention_kl, info_nce, ln_mse, masked_mean_pool, uniform_layer_map
from kdlab.loss.projection import StudentLogitProjector, align_vocab
from kdlab.loss.router import StudentAwareRouter

# keys of a batch that carries the teacher's cached top-k (kdlab.data.teacher_cache): no teacher forward
CACHED_TEACHER_KEYS = ("t_top", "t_ids", "t_tail")
Reduce = Literal["global", "tokens", "batch"]


@dataclass(frozen=True)
class Needs:
    """What a term reads from the models' forwards."""

    teacher: bool = True  # the teacher's forward (logits at least)
    hidden_states: bool = False
    attentions: bool = False  # attention maps (switches both models to eager attention)


@dataclass
class TermContext:
    """Everything a term may read for one micro-batch.

    student / teacher: HF outputs (logits (B, T, V); hidden_states (L+1) x (B, T, D) and attentions
    L x (B, H, T, T) when requested); teacher is None when no term needs its forward.
    """

    cfg: Any  # the run's KDConfig
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (B, T) and any extra keys
    student: Any
    teacher: Any | None
    targets: torch.Tensor  # (B, T) next-token ids, IGNORE_INDEX where there is none
    mask: torch.Tensor  # (B, T) bool, True where a position has a next token to predict
    num_valid: torch.Tensor  # valid targets of the whole step (all micro-batches, all processes)
    module: nn.Module | None  # the term's own trainable module, if it has one
    match_logits: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Term:
    """A named loss term.

    compute: TermContext -> scalar fp32 tensor, reduced as `reduce` says:
        "global"  its part of the step's per-token mean: a sum over this micro-batch's valid tokens
                  divided by ctx.num_valid (as kd and lm do, exact under accumulation and DDP)
        "tokens"  a per-token mean over this micro-batch; the objective weights it by the
                  micro-batch's share of the step's tokens
        "batch"   a per-batch statistic (InfoNCE); the objective averages it over micro-batches and
                  processes
    weight: the config field holding the term's maximum weight (or a function of the config), or
        None to read it from `cfg.term_weights[name]` (0 when absent: the term is off).
    build: (cfg, student, teacher) -> nn.Module or None: its trainable parameters (fp32, student side).
    always: computed and logged even at weight 0 (no gradient then).
    reads_cache: it can read the teacher's cached top-k from the batch (CACHED_TEACHER_KEYS) instead of
        the teacher's forward, so a cached batch needs no teacher forward for it.
    reads_logits: it reads the models' [B, T, V] logits. The fused KD + LM loss (kdlab.loss.fused) never
        builds them, so it applies only when no other active term does (a term registered from outside
        is assumed to, unless it says otherwise).
    """

    name: str
    compute: Callable[[TermContext], torch.Tensor]
    reduce: Reduce = "tokens"
    needs: Needs = Needs()
    weight: str | Callable[[Any], float] | None = None
    build: Callable[[Any, nn.Module, nn.Module], nn.Module | None] | None = None
    always: bool = False
    reads_cache: bool = False
    reads_logits: bool = True

    def max_weight(self, cfg) -> float:
        if callable(self.weight):
            return float(self.weight(cfg))
        if self.weight is not None:
            return float(getattr(cfg, self.weight))
        return float((getattr(cfg, "term_weights", None) or {}).get(self.name, 0.0))


TERMS: dict[str, Term] = {}  # the registry, in the order terms are summed and listed


def register_term(term: Term, *, replace: bool = False) -> Term:
    """Add `term` to the registry (its name must be new unless replace=True)."""
    if term.reduce not in ("global", "tokens", "batch"):
        raise KDLabError(f"term {term.name!r}: reduce={term.reduce!r} is not allowed; choose global, tokens or batch")
    if not term.name.isidentifier():
        raise KDLabError(f"term name {term.name!r} must be an identifier (letters, digits, _)")
    if term.name in TERMS and not replace:
        raise KDLabError(f"a term named {term.name!r} is already registered; pass replace=True to replace it")
    TERMS[term.name] = term
    return term


def unregister_term(name: str) -> None:
    TERMS.pop(name, None)


def display_order() -> tuple[str, ...]:
    """kd and lm first, then every other registered term in registration order (logs and plots)."""
    return ("kd", "lm", *(t for t in TERMS if t not in ("kd", "lm")))


# ---------------------------------------------------------------------------- the built-in terms
def _lm(ctx: TermContext) -> torch.Tensor:
    return lm_loss(ctx.student.logits, ctx.targets, chunk_tokens=ctx.cfg.loss_chunk_tokens, num_valid=ctx.num_valid)


def _kd(ctx: TermContext) -> torch.Tensor:
    cfg, b = ctx.cfg, ctx.batch
    common = dict(
        temperature=cfg.temperature,
        chunk_tokens=cfg.loss_chunk_tokens,
        num_valid=ctx.num_valid,
        divergence=cfg.kd_divergence,
        beta=cfg.jsd_beta,
    )
    if "t_top" in b:  # the teacher's stored top-k, joined to the batch by the batch source
        return kd_loss_topk(ctx.student.logits, b["t_top"], b["t_ids"], b["t_tail"], ctx.mask, **common)
    s, t = ctx.match_logits(ctx.student.logits, ctx.teacher.logits)
    return kd_loss(s, t, ctx.mask, top_k=cfg.kd_top_k, **common)


def _kd_module(cfg, student, teacher) -> nn.Module | None:
    s, t = student.config.vocab_size, teacher.config.vocab_size
    if s == t or cfg.logit_projection != "learned":
        return None  # same vocabulary, or padded ones aligned by id (kdlab.loss.projection.align_vocab)
    if s * t > 50_000_000:
        raise KDLabError(
            f"logit_projection='learned' between vocabularies of {s} and {t} would train {s * t:,} "
            f"parameters; use logit_projection=align for padded vocabularies"
        )
    return StudentLogitProjector(s, t)


def match_logits(
    module: nn.Module | None, s_logits: torch.Tensor, t_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits over one vocabulary: the learned student-side projection, or by id."""
    if s_logits.shape[-1] == t_logits.shape[-1]:
        return s_logits, t_logits
    if module is not None:
        return module(s_logits), t_logits
    return s_logits, align_vocab(t_logits, s_logits.shape[-1])


class FeatureRouters(nn.Module):
    """One StudentAwareRouter per student block, over E evenly spaced teacher blocks."""

    def __init__(self, cfg, s_layers: int, t_layers: int, s_dim: int, t_dim: int):
        super().__init__()
        n_exp = min(cfg.router_experts, t_layers)
        self.experts = uniform_layer_map(n_exp, t_layers)
        self.routers = nn.ModuleList(
            StudentAwareRouter(s_dim, t_dim, n_exp, min(cfg.router_top_k, n_exp), cfg.feature_loss)
            for _ in range(s_layers)
        )
        self.balance = cfg.router_balance
        self.last_stats: list[dict[str, torch.Tensor]] = []  # per block: utilisation, entropy (train records)

    def forward(self, s_out, t_out, mask: torch.Tensor) -> torch.Tensor:
        values, self.last_stats = [], []
        experts = [t_out.hidden_states[e + 1] for e in self.experts]  # [0] is the embedding output
        for layer, router in enumerate(self.routers):
            out = router(s_out.hidden_states[layer + 1], experts, mask)
            values.append(out.loss + self.balance * out.balance)
            self.last_stats.append({"utilisation": out.utilisation, "entropy": out.entropy})
        return torch.stack(values).mean()


def _shape(student, teacher) -> tuple[int, int, int, int]:
    s, t = student.config, teacher.config
    return s.num_hidden_layers, t.num_hidden_layers, s.hidden_size, t.hidden_size


def _feature(ctx: TermContext) -> torch.Tensor:
    return ctx.module(ctx.student, ctx.teacher, ctx.batch["attention_mask"].bool())


def _attention(ctx: TermContext) -> torch.Tensor:
    s, t = ctx.student.attentions, ctx.teacher.attentions
    mask = ctx.batch["attention_mask"].bool()
    return torch.stack([attention_kl(s[i], t[j], mask) for i, j in enumerate(uniform_layer_map(len(s), len(t)))]).mean()


def _layerwise(ctx: TermContext) -> torch.Tensor:
    s, t = ctx.student.hidden_states, ctx.teacher.hidden_states
    mask = ctx.batch["attention_mask"].bool()
    layer_map = uniform_layer_map(len(s) - 1, len(t) - 1)
    return torch.stack(
        [
            ln_mse(proj(s[i + 1].to(proj.weight.dtype)), t[j + 1], mask)
            for i, (proj, j) in enumerate(zip(ctx.module, layer_map))
        ]
    ).mean()


def _contrastive(ctx: TermContext) -> torch.Tensor:
    mask = ctx.batch["attention_mask"].bool()
    s_pool = masked_mean_pool(ctx.student.hidden_states[-1], mask)  # (B, D_s)
    t_pool = masked_mean_pool(ctx.teacher.hidden_states[-1], mask)  # (B, D_t)
    return info_nce(ctx.module(s_pool), t_pool, ctx.cfg.contrastive_tau)


def token_chunks(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) chunk ids when both models share a tokenizer: every predicted token is its own chunk (the
    first token of a row, which nothing predicts, and padding have none)."""
    T = labels.shape[1]
    ids = torch.arange(-1, T - 1, device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, ids, NO_CHUNK)


def _chunk(ctx: TermContext) -> torch.Tensor:
    b = ctx.batch
    if "s_chunk" in b:  # two tokenizers: the teacher read its own tokens (kdlab.data.alignment)
        s_chunk, t_chunk, t_ids = b["s_chunk"], b["t_chunk"], b["t_input_ids"]
    else:
        s_chunk = t_chunk = token_chunks(b["labels"])
        t_ids = b["input_ids"]
    n = min(s_chunk.shape[1], t_chunk.shape[1])  # a bound on the chunk ids, without a device sync
    s_lp, exists = chunk_log_probs(next_token_log_probs(ctx.student.logits, b["input_ids"]), s_chunk, n)
    with torch.no_grad():
        t_lp, _ = chunk_log_probs(next_token_log_probs(ctx.teacher.logits, t_ids), t_chunk, n)
    return chunk_likelihood_loss(s_lp, t_lp, exists, num_valid=ctx.num_valid)


def _feature_routers(cfg, student, teacher) -> FeatureRouters:
    return FeatureRouters(cfg, *_shape(student, teacher))


def _layer_projections(cfg, student, teacher) -> nn.ModuleList:
    s_layers, _, s_dim, t_dim = _shape(student, teacher)
    return nn.ModuleList(nn.Linear(s_dim, t_dim, bias=False) for _ in range(s_layers))


def _pooled_projection(cfg, student, teacher) -> nn.Linear:
    _, _, s_dim, t_dim = _shape(student, teacher)
    return nn.Linear(s_dim, t_dim, bias=False)


HIDDEN = Needs(hidden_states=True)
# registration order is the order terms are summed (and their modules built: the RNG order)
for _term in (
    Term("lm", _lm, "global", Needs(teacher=False), weight=lambda cfg: 1.0 - cfg.alpha_kd, always=True),
    Term("kd", _kd, "global", Needs(), weight="alpha_kd", build=_kd_module, reads_cache=True),
    Term("feature", _feature, "tokens", HIDDEN, weight="w_feature", build=_feature_routers, reads_logits=False),
    Term("attention", _attention, "tokens", Needs(attentions=True), weight="w_attention", reads_logits=False),
    Term("layerwise", _layerwise, "tokens", HIDDEN, weight="w_layerwise", build=_layer_projections, reads_logits=False),
    Term(
        "contrastive",
        _contrastive,
        "batch",
        HIDDEN,
        weight="w_contrastive",
        build=_pooled_projection,
        reads_logits=False,
    ),
    Term("chunk", _chunk, "global", Needs()),
):
    register_term(_term)

__all__ = [
    "Term",
    "TermContext",
    "Needs",
    "TERMS",
    "register_term",
    "unregister_term",
    "display_order",
    "match_logits",
    "FeatureRouters",
    "CACHED_TEACHER_KEYS",
    "token_chunks",
]
