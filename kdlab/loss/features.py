"""Losses on intermediate representations: hidden states, attention maps, pooled sequences.

Same conventions as kdlab.loss.divergences: per-token means over valid positions (mask (B, T), True where the
token is real), fp32 math whatever the input dtype, values returned unweighted. Teacher tensors
come from a no-grad forward; a feature target may still carry gradient into the student-side
router's mixing weights (kdlab.loss.router), so `ln_mse` and `cosine_distance` do not detach it.
Each is scale-free, so its weight is an importance ratio rather than a unit
conversion (docs/original-framework.md, fixes 2 and 3; notebooks/03_loss_normalization.ipynb).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def ln_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Layer-normalised MSE, a per-token mean over valid tokens.

        L = 1/N sum_{(b,t) valid} (1/D) || LN(pred) - LN(target) ||^2  =  1/N sum 2 (1 - rho_{b,t})

    LN is parameter-free (zero mean, unit variance over the D channels) and rho is the per-token
    Pearson correlation across channels, so L lies in [0, 4] whatever the scale of the hidden
    states: the residual stream's growth with depth and its massive activations (Sun et al. 2024)
    no longer set the loss's size, as they did in the original framework's raw MSE of 150-200.

    Args:
        pred: (B, T, D) the student's (projected) states.
        target: (B, T, D) the teacher's states (or a router's mix of them).
        mask: (B, T) bool.
    """
    d = pred.shape[-1]
    p = F.layer_norm(pred.float(), (d,))
    t = F.layer_norm(target.float(), (d,))
    return _masked_token_mean((p - t).pow(2).mean(-1), mask)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - cos(pred, target) per token, masked mean; in [0, 2] (DistilBERT's cosine loss).

    Shapes as in `ln_mse`.
    """
    per_token = 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)
    return _masked_token_mean(per_token, mask)


FEATURE_LOSSES = {"ln_mse": ln_mse, "cosine": cosine_distance}


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM attention transfer: KL(teacher row || student row), a mean over valid query rows.

        L = 1/(N H) sum_{(b,i) valid} sum_h sum_j A_t[b,h,i,j] log(A_t[b,h,i,j] / A_s[b,h,i,j])

    (Wang et al. 2020, MiniLM.) The maps are attention *probabilities* as HF's eager attention
    returns them: causal and padded keys hold exact zeros, which contribute 0 here (the original framework's
    `kl_div(A_s.log(), A_t)` made them 0 * -inf = nan). No temperature: the rows already are
    distributions. When the head counts differ, each model's maps are averaged over its heads first.

    Args:
        student_attn: (B, H_s, T, T) rows summing to 1.
        teacher_attn: (B, H_t, T, T).
        mask: (B, T) bool; rows of padded queries are excluded.
    """
    s, t = student_attn.float(), teacher_attn.detach().float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)  # (B, 1, T, T)
    log_s = s.clamp_min(torch.finfo(torch.float32).tiny).log()
    log_t = t.clamp_min(torch.finfo(torch.float32).tiny).log()
    per_row = torch.where(t > 0, t * (log_t - log_s), 0.0).sum(-1).mean(1)  # (B, T): mean over heads
    return _masked_token_mean(per_row, mask)


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states -> (B, D) mean over the valid tokens of each sequence."""
    m = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1)


def info_nce(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """InfoNCE across the batch: each student sequence must pick its own teacher sequence.

        L = -1/B sum_b log softmax_c( cos(s_b, t_c) / tau )[b]

    (van den Oord et al. 2018; CRD, Tian et al. 2020, for distillation.) The minimum is 0 only in
    the limit; with B = 1 there are no negatives and the loss is exactly 0.

    Args:
        student: (B, D) pooled (projected) student representations.
        teacher: (B, D) pooled teacher representations (detached).
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    logits = s @ t.T / tau  # (B, B)
    return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student block i -> teacher block round((i + 1) * L_t / L_s) - 1: evenly spaced, last to last.

    Indices count transformer blocks from 0 (hidden_states[l + 1] in HF's output is block l's output).
    """
    return [int((i + 1) * n_teacher / n_student + 0.5) - 1 for i in range(n_student)]  # round half up


__all__ = [
    "ln_mse",
    "cosine_distance",
    "FEATURE_LOSSES",
    "attention_kl",
    "masked_mean_pool",
    "info_nce",
    "uniform_layer_map",
]
