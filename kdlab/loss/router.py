"""A student-aware router: each student token chooses which teacher layers to learn from.

For one student layer, a gate on the *student* side reads the student's hidden state per token and
picks the top-k of E teacher layers (the experts). The target is the gate-weighted mix of the
experts' hidden states, each LayerNorm'ed without parameters before mixing (teacher layers differ
in scale) and computed without gradient; the prediction is a student-side projection of the
student's state. Everything trainable sits on the student side, so the teacher's signal cannot
be moved to meet the student (the collapse of the original framework's teacher-side projector), and LN'ed
targets cannot shrink towards a trivial zero.

A Switch-Transformer load-balancing term (Fedus et al. 2021), E * sum_e f_e P_e, equal to 1 when
the tokens spread evenly, keeps every expert in use; the router reports per-expert utilisation
and its entropy, answering the original framework's open question "is the router actually routing?".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.loss.features import FEATURE_LOSSES


@dataclass
class RouterOutput:
    loss: torch.Tensor  # feature loss between prediction and routed target (unweighted)
    balance: torch.Tensor  # load-balancing term, 1 at perfect balance
    utilisation: torch.Tensor  # (E,) fraction of routed (token, slot) pairs per expert
    entropy: torch.Tensor  # entropy of `utilisation` in nats; log E when all experts share evenly


class StudentAwareRouter(nn.Module):
    def __init__(self, student_dim: int, teacher_dim: int, n_experts: int, top_k: int = 2, loss: str = "ln_mse"):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
        self.n_experts, self.top_k, self.loss_fn = n_experts, top_k, FEATURE_LOSSES[loss]
        self.gate = nn.Linear(student_dim, n_experts)
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(
        self, student_hidden: torch.Tensor, expert_hiddens: Sequence[torch.Tensor], mask: torch.Tensor
    ) -> RouterOutput:
        """student_hidden (B, T, D_s); expert_hiddens E x (B, T, D_t) without grad; mask (B, T) bool."""
        x = student_hidden.to(self.proj.weight.dtype)  # fp32 weights whatever the input's dtype
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (B, T, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (B, T, k)
        weights = top_p / top_p.sum(-1, keepdim=True)  # renormalised over the chosen experts
        d = expert_hiddens[0].shape[-1]
        experts = torch.stack([F.layer_norm(h.detach().float(), (d,)) for h in expert_hiddens], dim=-2)  # (B,T,E,D)
        chosen = experts.gather(-2, top_i.unsqueeze(-1).expand(*top_i.shape, d))  # (B, T, k, D)
        target = (weights.unsqueeze(-1) * chosen).sum(-2)  # (B, T, D)
        loss = self.loss_fn(self.proj(x), target, mask)

        m = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
        n = m.sum().clamp_min(1)
        assigned = F.one_hot(top_i, self.n_experts).float().sum(-2)  # (B, T, E) slots per expert
        utilisation = (assigned * m).sum((0, 1)) / (n * self.top_k)  # (E,)
        top1 = F.one_hot(top_i[..., 0], self.n_experts).float()
        balance = self.n_experts * ((top1 * m).sum((0, 1)) / n * (probs * m).sum((0, 1)) / n).sum()
        entropy = -torch.where(utilisation > 0, utilisation * utilisation.clamp_min(1e-12).log(), 0.0).sum()
        return RouterOutput(loss, balance, utilisation.detach(), entropy.detach())


__all__ = ["StudentAwareRouter", "RouterOutput"]
