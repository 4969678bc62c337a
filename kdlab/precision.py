"""One precision policy, used by training *and* evaluation.

The original framework crashed at evaluation (`mat1 and mat2 must have the same dtype, but got Half and Float`)
because training ran under autocast and evaluation did not. Here both call `teacher_logits` and
`student_logits` below, so they cannot drift apart. The rules:

* the frozen teacher is stored in `teacher_dtype` (fp16 on CUDA as in the original framework, bf16 selectable;
  fp32 on CPU, where bf16 matmuls without AVX512-BF16/AMX ran 6x slower on our 2-core machines);
* trainable weights always stay fp32 (AdamW on fp16 weights gives NaN at step 1);
* the student runs under autocast on CUDA (bf16 where supported, else fp16 with a GradScaler);
  on CPU autocast is off unless bf16 is asked for. Asking for float32 autocast means "off" and is
  said so, unlike torch's CPU autocast, which warns and silently disables itself;
* losses upcast logits to fp32 before any softmax (kdlab.loss.divergences).
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from kdlab.errors import KDLabError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    device: torch.device
    teacher_dtype: torch.dtype
    autocast_dtype: torch.dtype | None  # None: the student computes in fp32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range
        return self.autocast_dtype == torch.float16

    def describe(self) -> str:
        student = "fp32" if self.autocast_dtype is None else f"fp32 weights, {_name(self.autocast_dtype)} autocast"
        return f"device={self.device.type} teacher={_name(self.teacher_dtype)} student={student}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_precision(device: str = "auto", teacher_dtype: str = "auto", autocast_dtype: str = "auto") -> Precision:
    """Turn the config's strings into a Precision; 'auto' picks the documented defaults."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KDLabError("device='cuda' but no CUDA device is available; use device=auto or device=cpu")
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"

    if teacher_dtype == "auto":
        t_dtype = torch.float16 if on_cuda else torch.float32
    else:
        t_dtype = _DTYPES[teacher_dtype]

    if autocast_dtype == "auto":
        if on_cuda:
            a_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            a_dtype = None
    elif autocast_dtype == "float32":
        a_dtype = None
    else:
        a_dtype = _DTYPES[autocast_dtype]
        if not on_cuda and a_dtype == torch.float16:
            raise KDLabError("autocast_dtype='float16' is not supported on CPU; use bfloat16 or float32")
    return Precision(dev, t_dtype, a_dtype)


def _attention_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    # The trainer marks batches it knows (from their CPU copy) to hold no padding. Passing no mask
    # then spares transformers' mask builder its `padding_mask.all()` check: a host sync on CUDA in
    # every forward. The result is the same causal attention either way.
    return None if batch.get("no_padding") is True else batch["attention_mask"]


@torch.no_grad()
def teacher_outputs(
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    hidden_states: bool = False,
    attentions: bool = False,
    logits_to_keep: int = 0,
):
    """The frozen teacher's HF output (logits (B, T, V) in the teacher's dtype; optionally more).
    `logits_to_keep=1`: logits of the last position only (the fused loss forms the rest itself)."""
    return teacher(
        input_ids=batch["input_ids"],
        attention_mask=_attention_mask(batch),
        output_hidden_states=hidden_states,
        output_attentions=attentions,
        **({"logits_to_keep": logits_to_keep} if logits_to_keep else {}),
    )


def student_outputs(
    student: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    precision: Precision,
    hidden_states: bool = False,
    attentions: bool = False,
    logits_to_keep: int = 0,
):
    """The student's HF output under the policy's autocast (grad enabled if the caller allows)."""
    with precision.autocast():
        return student(
            input_ids=batch["input_ids"],
            attention_mask=_attention_mask(batch),
            output_hidden_states=hidden_states,
            output_attentions=attentions,
            **({"logits_to_keep": logits_to_keep} if logits_to_keep else {}),
        )


def teacher_logits(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, V) logits of the frozen teacher, in the teacher's dtype."""
    return teacher_outputs(teacher, batch).logits


def student_logits(student: torch.nn.Module, batch: dict[str, torch.Tensor], precision: Precision) -> torch.Tensor:
    """(B, T, V) student logits under the policy's autocast."""
    return student_outputs(student, batch, precision).logits


def cpu_names() -> list[str]:
    """The "model name" of every logical CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]


def describe_device(device: torch.device) -> str:
    """The device in words, for recorded timings: the GPU's name, or the CPU's model and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = cpu_names()
    return f"{names[0] if names else platform.machine()}, {torch.get_num_threads()} threads"


__all__ = [
    "cpu_names",
    "describe_device",
    "Precision",
    "resolve_precision",
    "teacher_logits",
    "student_logits",
    "teacher_outputs",
    "student_outputs",
]
