"""The original framework's formulas, kept as named variants so the course can show before and after
on the same data. kdlab's trainer uses none of them; its logging can be put back as a callback
(`OriginalVerboseLogging`, notebook 05); each docstring says what goes wrong.
docs/original-framework.md describes that framework; tests/test_original.py and notebooks 02-06 measure each verdict.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from kdlab.training.callbacks import Callback
from kdlab.training.early_stopping import EarlyStopping


def original_kd_batchmean(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The original framework's KD: `kl_div(reduction="batchmean")` on (B, T, V) logits, times T^2.

    `batchmean` divides the sum over every token by B alone, so the value is (sequence length) x
    the per-token KL and it counts padding and each sequence's last position: this is why the
    seed's KD loss "read 30-40". Compare `kdlab.kd_loss`, a per-token mean over valid positions.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean") * temperature**2


def original_feature_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original framework's feature loss before its fix: `mse_loss(reduction="mean")` on raw hidden states.

    Its size is set by the hidden states' scale (150-200 in the original framework), dominated by a few tokens
    with massive activations; padding is averaged in.
    """
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def original_feature_mse_per_dim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original framework's "normalised" feature loss: the raw MSE divided by the hidden size.

    `reduction="mean"` already divides by B*T*D; dividing by D again only multiplies the term's
    weight by 1/D (1/576 here), which switches the term off rather than normalising it.
    """
    return original_feature_mse(pred, target) / target.shape[-1]


def original_attention_batchmean(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The original framework's attention loss: `kl_div(log A_s, A_t, batchmean)` on (B, H, T, T) maps, x T^2, / T.

    `batchmean` divides by B only, so after the division by the sequence length the value is
    still H x (mean per-row KL): it grows with the number of heads. Causal zeros make it nan
    (0 * log 0), and padded rows are counted.
    """
    raw = F.kl_div(student_attn.float().log(), teacher_attn.float(), reduction="batchmean")
    return raw * temperature**2 / student_attn.shape[-1]


class OriginalTeacherProjector(torch.nn.Module):
    """The original framework's LogitProjector: a *trainable* linear map applied to the *teacher's* probabilities.

    Two faults, both reproduced in the course and the tests:
    * dtype: with an fp16 teacher and fp32 weights, calling it outside autocast raises
      `RuntimeError: mat1 and mat2 must have the same dtype, but got Half and Float` (the original framework's
      evaluation crash). Casting the module to fp16 instead makes AdamW's first step non-finite.
    * collapse: the KD target now moves to meet the student. Minimising KL(projected teacher ||
      student) can drive the reported KD to ~0 while the true KL(teacher || student) stays large.
    """

    def __init__(self, teacher_vocab: int, student_vocab: int):
        super().__init__()
        self.proj = torch.nn.Linear(teacher_vocab, student_vocab)

    def forward(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.proj(F.softmax(teacher_logits, dim=-1))  # no cast: as in the original framework


def original_projected_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, projector: OriginalTeacherProjector
) -> torch.Tensor:
    """The KD the original framework reported with its projector: KL(softmax(projector(p_t)) || q_s), per token."""
    target = F.log_softmax(projector(teacher_logits).float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="none").sum(-1).mean()


__all__ = [
    "original_kd_batchmean",
    "original_feature_mse",
    "original_feature_mse_per_dim",
    "original_attention_batchmean",
    "OriginalTeacherProjector",
    "original_projected_kd",
]


# ---------------------------------------------------------------------------- early stopping (notebook 06)


class OriginalTotalEarlyStopping(EarlyStopping):
    """The original framework's early stopping: patience on the *curriculum-weighted total loss* (fix 7: patience
    10 at first, then 20 with a 1,000-step warmup), as a trainer callback.

    The original framework checked its monitor at every evaluation; kdlab's evaluations report fixed-definition
    metrics only (val KL, val CE), so this callback feeds it the weighted total of each logged train
    interval (`record["loss"]`): with `log_every=1` every step is one check, which lets a short run
    show what patience 10 does. The rule is kdlab's EarlyStopping.update (improvement = below the
    reference by more than `min_delta`; checks before `warmup_steps` never count against patience),
    so only the monitored quantity differs from kdlab's. That quantity changes definition whenever a
    curriculum weight ramps, so it rises by design at every ramp: the fault this class reproduces.

    `stop=False` only records where the rule would have stopped (`stopped_step`, `reason`), so
    several monitors can watch one run. It never saves or restores weights (the original framework did neither);
    `checks` holds (step, value, verdict) for every check. Its state_key names its settings, so
    several instances in one run resume independently.
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
            self.request_stop(trainer, "original early stopping")

    def on_eval(self, trainer, record) -> None:  # evaluations are not its monitor
        return

    @property
    def state_key(self) -> str:
        return self.make_state_key(
            patience=self.patience, min_delta=self.min_delta, warmup_steps=self.warmup_steps, stop=self.stop
        )

    def state_dict(self):
        return {**super().state_dict(), "checks": [list(c) for c in self.checks]}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.checks = [tuple(c) for c in state.get("checks", [])]


# ---------------------------------------------------------------------------- logging (notebook 05)


class OriginalVerboseLogging(Callback):
    """The original framework's logging, kept to measure its cost (pass it as a callback):
    36 printed lines per step, each number read with .item() (a host sync on CUDA), as its prints did."""

    def on_step_end(self, trainer, out) -> None:
        if not trainer.engine.is_main:
            return
        s, w = trainer.state, trainer.objective.curriculum.weights_at(trainer.state.step - 1)
        names = ("kd", "lm", "feature", "attention", "layerwise", "contrastive")  # its six terms
        zero = torch.zeros(())
        p = lambda line: print(line, file=sys.stdout)  # noqa: E731
        p("=" * 60)
        p(f"[CURRICULUM] Step {s.step}, Progress {100 * s.step / trainer.total_steps:.1f}%")
        for k in names:
            p(f"  {k:<12} weight={torch.tensor(w.get(k, 0.0)).item():.4f}")
        p("=" * 60)
        for k in names:
            raw, weighted = out.get(k, zero).item(), out.get(f"w/{k}", zero).item()
            p(f"[{k.upper()}] raw: {raw:.6f}")
            p(f"[{k.upper()}] weighted: {weighted:.6f}")
            p(f"[{k.upper()}] finite: {bool(torch.isfinite(out.get(k, zero)).item())}")
        p(f"[LM] Raw: {out['lm'].item():.4f}, Weight: {w.get('lm', 0.0):.3f}")
        p(f"[TOTAL] Loss: {out['loss'].item():.4f}, Components: {sum(1 for k in names if k in out)}")
        p(f"[GRAD] norm: {out['grad_norm'].item():.4f}")
        p(f"[LR] {trainer.scheduler.get_last_lr()[0]:.3e}")
        p(f"[TOKENS] {int(out['tokens'].item())}")
        p(f"[SKIP] {int(out['skipped'].item())}")
        p(f"[DTYPE] teacher={trainer.precision.teacher_dtype} student=fp32")
        mem = torch.cuda.max_memory_allocated() / 2**20 if trainer.precision.device.type == "cuda" else float("nan")
        p(f"[MEM] peak allocated: {mem:.0f} MiB")
        p("-" * 60)


__all__ += ["OriginalTotalEarlyStopping", "OriginalVerboseLogging"]
