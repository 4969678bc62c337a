"""The intermediate distillation terms beyond KD and LM, and the student-side modules they train.

    heads = DistillationHeads.for_models(cfg, student, teacher)   # trainable, fp32, student side
    terms = heads(s_out, t_out, mask)                               # {"feature": ..., "attention": ...}

Only terms with a non-zero weight in the config are built and computed, and `needs(cfg)` tells the
trainer whether hidden states or attention maps must be requested from the models at all.

Terms (each unweighted, a per-token mean over the same valid mask):
    feature      per student block: a StudentAwareRouter over E evenly spaced teacher blocks
                 (LN-MSE or cosine, plus router_balance x its load-balancing term), averaged
    attention    MiniLM per-row KL between the attention maps of mapped blocks, averaged
    layerwise    LN-MSE between each student block's projected output and its mapped teacher
                 block's (fixed uniform map), averaged over layers
    contrastive  InfoNCE between the pooled, projected last student state and the pooled last
                 teacher state across the batch (temperature contrastive_tau)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import KDLabError
from .feature_losses import attention_kl, info_nce, ln_mse, masked_mean_pool, uniform_layer_map
from .projection import StudentLogitProjector, align_vocab
from .router import StudentAwareRouter

TERMS = ("feature", "attention", "layerwise", "contrastive")


def weights_of(cfg) -> dict[str, float]:
    return {"feature": cfg.w_feature, "attention": cfg.w_attention, "layerwise": cfg.w_layerwise,
            "contrastive": cfg.w_contrastive}


@dataclass(frozen=True)
class Needs:
    hidden_states: bool
    attentions: bool


def needs(cfg) -> Needs:
    w = weights_of(cfg)
    return Needs(hidden_states=any(w[t] > 0 for t in ("feature", "layerwise", "contrastive")),
                 attentions=w["attention"] > 0)


class DistillationHeads(nn.Module):
    """The trainable, student-side parts of the active terms (empty when none is active)."""

    def __init__(self, cfg, s_layers: int, t_layers: int, s_dim: int, t_dim: int):
        super().__init__()
        self.weights = {k: v for k, v in weights_of(cfg).items() if v > 0}
        self.layer_map = uniform_layer_map(s_layers, t_layers)  # student block i -> teacher block
        self.router_balance = cfg.router_balance
        self.tau = cfg.contrastive_tau
        if "feature" in self.weights:
            n_exp = min(cfg.router_experts, t_layers)
            self.experts = uniform_layer_map(n_exp, t_layers)
            self.routers = nn.ModuleList(
                StudentAwareRouter(s_dim, t_dim, n_exp, min(cfg.router_top_k, n_exp), cfg.feature_loss)
                for _ in range(s_layers))
        if "layerwise" in self.weights:
            self.layer_proj = nn.ModuleList(nn.Linear(s_dim, t_dim, bias=False) for _ in range(s_layers))
        if "contrastive" in self.weights:
            self.contrastive_proj = nn.Linear(s_dim, t_dim, bias=False)
        self.last_router_stats: list[dict[str, torch.Tensor]] = []
        self.logit_proj: StudentLogitProjector | None = None

    @classmethod
    def for_models(cls, cfg, student, teacher) -> DistillationHeads:
        s, t = student.config, teacher.config
        heads = cls(cfg, s.num_hidden_layers, t.num_hidden_layers, s.hidden_size, t.hidden_size)
        if s.vocab_size != t.vocab_size and cfg.logit_projection == "learned":
            n_params = s.vocab_size * t.vocab_size
            if n_params > 50_000_000:
                raise KDLabError(
                    f"logit_projection='learned' between vocabularies of {s.vocab_size} and {t.vocab_size} "
                    f"would train {n_params:,} parameters; use logit_projection=align for padded vocabularies"
                )
            heads.logit_proj = StudentLogitProjector(s.vocab_size, t.vocab_size)
        return heads.to(next(student.parameters()).device)

    def match_logits(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits over one vocabulary: learned student-side projection, or by id."""
        if s_logits.shape[-1] == t_logits.shape[-1]:
            return s_logits, t_logits
        if self.logit_proj is not None:
            return self.logit_proj(s_logits), t_logits
        return s_logits, align_vocab(t_logits, s_logits.shape[-1])

    def forward(self, s_out, t_out, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """s_out / t_out: HF outputs with hidden_states ((L+1) x (B, T, D)) and/or attentions."""
        terms: dict[str, torch.Tensor] = {}
        # hidden_states[0] is the embedding output; hidden_states[l + 1] is block l's output
        if "feature" in self.weights:
            values, self.last_router_stats = [], []
            experts = [t_out.hidden_states[e + 1] for e in self.experts]
            for layer, router in enumerate(self.routers):
                out = router(s_out.hidden_states[layer + 1], experts, mask)
                values.append(out.loss + self.router_balance * out.balance)
                self.last_router_stats.append({"utilisation": out.utilisation, "entropy": out.entropy,
                                               "balance": out.balance.detach()})
            terms["feature"] = torch.stack(values).mean()
        if "attention" in self.weights:
            terms["attention"] = torch.stack([attention_kl(s_out.attentions[i], t_out.attentions[j], mask)
                                              for i, j in enumerate(self.layer_map)]).mean()
        if "layerwise" in self.weights:
            terms["layerwise"] = torch.stack([
                ln_mse(proj(s_out.hidden_states[i + 1].to(proj.weight.dtype)), t_out.hidden_states[j + 1], mask)
                for i, (proj, j) in enumerate(zip(self.layer_proj, self.layer_map))]).mean()
        if "contrastive" in self.weights:
            s_pool = masked_mean_pool(s_out.hidden_states[-1], mask)  # (B, D_s)
            t_pool = masked_mean_pool(t_out.hidden_states[-1], mask)  # (B, D_t)
            terms["contrastive"] = info_nce(self.contrastive_proj(s_pool), t_pool, self.tau)
        return terms


__all__ = ["TERMS", "DistillationHeads", "Needs", "needs", "weights_of"]
