"""The seed framework's formulas, kept as named variants so the course can show before and after
on the same data. They are *not* used by kdlab's trainer; each docstring says what goes wrong.
See ../shared/research/loss-review.md for the measurements behind each verdict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def seed_kd_batchmean(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """The seed's KD: `kl_div(reduction="batchmean")` on (B, T, V) logits, times T^2.

    `batchmean` divides the sum over every token by B alone, so the value is (sequence length) x
    the per-token KL and it counts padding and each sequence's last position: this is why the
    seed's KD loss "read 30-40". Compare `kdlab.kd_loss`, a per-token mean over valid positions.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean") * temperature**2


__all__ = ["seed_kd_batchmean"]
