"""Making student and teacher logits comparable when their vocabularies differ.

* Sizes that differ only by padding (the same tokenizer, one embedding matrix rounded up, e.g.
  49,152 vs 49,216): align by token id, with no parameters. The teacher's extra columns are
  dropped; if the student has extra columns, the teacher gets -inf there (probability 0).
* Genuinely different vocabularies: a learned projection on the *student* side maps the
  student's logits into the teacher's vocabulary. Its weights stay fp32 and it casts its input to
  its own dtype, so an fp16/bf16 input cannot raise the original framework's dtype error.

The original framework instead trained a projector on the *teacher's* probabilities; see
`kdlab.course.original.OriginalTeacherProjector` for why that target collapses.
"""

from __future__ import annotations

import torch
from torch import nn


def align_vocab(teacher_logits: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """(..., V_t) teacher logits -> (..., V_s) by token id: slice, or pad with -inf."""
    v_t = teacher_logits.shape[-1]
    if v_t == student_vocab:
        return teacher_logits
    if v_t > student_vocab:
        return teacher_logits[..., :student_vocab]
    pad = teacher_logits.new_full((*teacher_logits.shape[:-1], student_vocab - v_t), float("-inf"))
    return torch.cat([teacher_logits, pad], dim=-1)


class StudentLogitProjector(nn.Module):
    """Student logits (..., V_s) -> (..., V_t): a trainable linear map, fp32, on the student side."""

    def __init__(self, student_vocab: int, teacher_vocab: int):
        super().__init__()
        self.linear = nn.Linear(student_vocab, teacher_vocab, bias=False)
        with torch.no_grad():  # start as the identity on the shared ids
            self.linear.weight.zero_()
            n = min(student_vocab, teacher_vocab)
            self.linear.weight[:n, :n] = torch.eye(n)

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        return self.linear(student_logits.to(self.linear.weight.dtype))


__all__ = ["align_vocab", "StudentLogitProjector"]
