"""The seed framework's formulas, kept as named variants so the course can show before and after
on the same data. They are *not* used by kdlab's trainer; each docstring says what goes wrong.
docs/original-framework.md describes that framework; tests/test_seed.py and notebooks 02-06 measure each verdict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .early_stopping import EarlyStopping


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


def seed_feature_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The seed's feature loss before its fix: `mse_loss(reduction="mean")` on raw hidden states.

    Its size is set by the hidden states' scale (150-200 in the seed), dominated by a few tokens
    with massive activations; padding is averaged in.
    """
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def seed_feature_mse_per_dim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The seed's "normalised" feature loss: the raw MSE divided by the hidden size.

    `reduction="mean"` already divides by B*T*D; dividing by D again only multiplies the term's
    weight by 1/D (1/576 here), which switches the term off rather than normalising it.
    """
    return seed_feature_mse(pred, target) / target.shape[-1]


def seed_attention_batchmean(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """The seed's attention loss: `kl_div(log A_s, A_t, batchmean)` on (B, H, T, T) maps, x T^2, / T.

    `batchmean` divides by B only, so after the division by the sequence length the value is
    still H x (mean per-row KL): it grows with the number of heads. Causal zeros make it nan
    (0 * log 0), and padded rows are counted.
    """
    raw = F.kl_div(student_attn.float().log(), teacher_attn.float(), reduction="batchmean")
    return raw * temperature**2 / student_attn.shape[-1]


class SeedTeacherProjector(torch.nn.Module):
    """The seed's LogitProjector: a *trainable* linear map applied to the *teacher's* probabilities.

    Two faults, both reproduced in the course and the tests:
    * dtype: with an fp16 teacher and fp32 weights, calling it outside autocast raises
      `RuntimeError: mat1 and mat2 must have the same dtype, but got Half and Float` (the seed's
      evaluation crash). Casting the module to fp16 instead makes AdamW's first step non-finite.
    * collapse: the KD target now moves to meet the student. Minimising KL(projected teacher ||
      student) can drive the reported KD to ~0 while the true KL(teacher || student) stays large.
    """

    def __init__(self, teacher_vocab: int, student_vocab: int):
        super().__init__()
        self.proj = torch.nn.Linear(teacher_vocab, student_vocab)

    def forward(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.proj(F.softmax(teacher_logits, dim=-1))  # no cast: as in the seed


def seed_projected_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      projector: SeedTeacherProjector) -> torch.Tensor:
    """The KD the seed reported with its projector: KL(softmax(projector(p_t)) || q_s), per token."""
    target = F.log_softmax(projector(teacher_logits).float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="none").sum(-1).mean()


__all__ = ["seed_kd_batchmean", "seed_feature_mse", "seed_feature_mse_per_dim", "seed_attention_batchmean",
           "SeedTeacherProjector", "seed_projected_kd"]


# ---------------------------------------------------------------------------- early stopping (notebook 06)

class SeedTotalEarlyStopping(EarlyStopping):
    """The seed's early stopping: patience on the *curriculum-weighted total loss* (fix 7: patience
    10 at first, then 20 with a 1,000-step warmup), as a trainer callback.

    The seed checked its monitor at every evaluation; kdlab's evaluations report fixed-definition
    metrics only (val KL, val CE), so this callback feeds it the weighted total of each logged train
    interval (`record["loss"]`): with `log_every=1` every step is one check, which lets a short run
    show what patience 10 does. The rule is kdlab's EarlyStopping.update (improvement = below the
    reference by more than `min_delta`; checks before `warmup_steps` never count against patience),
    so only the monitored quantity differs from kdlab's. That quantity changes definition whenever a
    curriculum weight ramps, so it rises by design at every ramp: the fault this class reproduces.

    `stop=False` only records where the rule would have stopped (`stopped_step`, `reason`), so
    several monitors can watch one run. It never saves or restores weights (the seed did neither);
    `checks` holds (step, value, verdict) for every check. The trainer checkpoints callbacks by class
    name, so with two instances in one run a resumed run restores only one of them.
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.001, warmup_steps: int = 0, stop: bool = True):
        super().__init__("val_kl", patience, min_delta, "min", warmup_steps)
        self.monitor = "weighted total (train interval)"
        self.stop = stop
        self.checks: list[tuple[int, float, str]] = []

    def on_log(self, trainer, record) -> None:
        if record.get("kind") != "train" or self.stopped_step is not None:
            return
        verdict = self.update(record["step"], float(record["loss"]))
        self.checks.append((record["step"], float(record["loss"]), verdict))
        if verdict == "stop" and self.stop:
            self.request_stop(trainer, "seed early stopping")

    def on_eval(self, trainer, record) -> None:  # evaluations are not its monitor
        return

    def state_dict(self):
        return {**super().state_dict(), "checks": [list(c) for c in self.checks]}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.checks = [tuple(c) for c in state.get("checks", [])]


__all__ += ["SeedTotalEarlyStopping"]
