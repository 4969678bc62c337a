"""A fused linear KD + LM loss: from hidden states and the output projection, never the [N, V] logits.

    out = fused_linear_kd_lm(h, lm_head.weight, (t_h, teacher_lm_head.weight), targets, mask,
                             kd_weight=0.5, lm_weight=0.5)   # chunk_tokens=128: the trainer's loss_chunk_tokens
    out.total.backward()               # gradients into h and the weight
    out.kd, out.lm                     # the two terms, unweighted (for the records)

The usual path (kdlab.loss.divergences) takes the student's logits, an [N, V] tensor (N = B x T positions) that
the LM head writes, plus its fp32 gradient of the same size: at N = 4,096 and V = 49,152 each is
805 MB. Here, for one chunk of `chunk_tokens` positions at a time, the student's logits are computed
from its final hidden states (h @ W^T), the teacher's likewise from its hidden states (or read from
given logits), both terms and their gradient with respect to those chunk logits are computed with the
same row functions as kd_loss and lm_loss (so every divergence and top-k buckets are the same math),
and the chunk's gradient is folded straight into dL/dh (chunk @ W) and dL/dW (chunk^T @ h). What
outlives a chunk is dL/dh (N x D) and dL/dW (V x D), the sizes of the inputs (the approach of Liger
Kernel's fused linear losses).

The weights of the two terms must be known in the forward, since the gradient is formed there:
total = kd_weight * KD + lm_weight * LM, with KD and LM the per-token means of kd_loss and lm_loss
(over `num_valid` positions: the whole step's under gradient accumulation). Math in fp32; the chunk
matmuls run in the hidden states' dtype (under autocast, the student's compute dtype).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdlab.loss.divergences import IGNORE_INDEX, _check_divergence, _kd_rows, _teacher_buckets, _valid_count


@dataclass
class FusedLoss:
    total: torch.Tensor  # kd_weight * kd + lm_weight * lm, with the gradient
    kd: torch.Tensor  # the KD term, unweighted (no gradient)
    lm: torch.Tensor  # the LM term, unweighted (no gradient)


class _FusedLinearKDLM(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h,  # (N, D) student hidden states of the scored positions
        weight,  # (V, D) student output projection
        teacher,  # (t_logits (N, V),) or (t_hidden (N, Dt), t_weight (V, Dt))
        targets,  # (N,) next-token ids
        kd_weight: float,
        lm_weight: float,
        num_valid,
        temperature: float,
        top_k: int,
        divergence: str,
        beta: float,
        chunk_tokens: int,
    ):
        need_grad = h.requires_grad or weight.requires_grad
        grad_h = torch.zeros_like(h, dtype=torch.float32) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        lm_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        n = _valid_count(targets != IGNORE_INDEX, num_valid)
        w_c = weight.to(h.dtype)  # cast once, not per chunk
        t_w = teacher[1].to(teacher[0].dtype) if len(teacher) == 2 else None
        # T = 1, forward KL over the whole vocabulary (the default): KD and LM share the student's
        # log-softmax, and every (C, V) step after it runs in place (3 such tensors at a time, not 5)
        shared = temperature == 1.0 and top_k == 0 and divergence == "forward_kl"
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            hc = h[rows]
            s = hc @ w_c.T  # (C, V), the only logits that exist at a time
            t = teacher[0][rows] if t_w is None else teacher[0][rows] @ t_w.T
            y = targets[rows]
            valid = y != IGNORE_INDEX
            safe_y = y.clamp_min(0).unsqueeze(-1)
            if shared:
                logq = F.log_softmax(s, dim=-1, dtype=torch.float32)
                del s
                logp = F.log_softmax(t, dim=-1, dtype=torch.float32)
                del t
                p = logp.exp()
                # p * (log p - log q), with -inf teacher logits clamped so that 0 * -inf is not nan
                kd_sum += torch.linalg.vecdot(p, logp.clamp_min_(torch.finfo(torch.float32).min).sub_(logq)).sum()
                del logp
                lm_sum -= (logq.gather(-1, safe_y).squeeze(-1) * valid).sum()
                if need_grad:
                    # d total / d s = kd_weight (q - p) + lm_weight (q - onehot(y)) on valid rows, over N
                    ds = logq.exp_().mul_((kd_weight + lm_weight * valid).unsqueeze(-1)).sub_(p, alpha=kd_weight)
                    ds.scatter_add_(-1, safe_y, (-lm_weight * valid).unsqueeze(-1).to(ds.dtype)).div_(n)
                del p
            else:
                t_rows = (t,) if top_k == 0 else _teacher_buckets(t, temperature, top_k)
                del t
                kl, g = _kd_rows(s, t_rows, temperature, top_k, divergence, beta)  # g = d(T^2 kl)/ds, fp32
                del t_rows
                kd_sum += temperature**2 * kl.sum()
                # the LM term: -log softmax(s)[y], gradient softmax(s) - onehot(y)
                logq = F.log_softmax(s, dim=-1, dtype=torch.float32)
                del s
                lm_sum -= (logq.gather(-1, safe_y).squeeze(-1) * valid).sum()
                if need_grad:
                    # d total / d s = (kd_weight * g + lm_weight * (softmax - onehot)) / N, valid rows only
                    ds = logq.exp_().scatter_add_(-1, safe_y, torch.full_like(safe_y, -1.0, dtype=logq.dtype))
                    ds.mul_(lm_weight * valid.unsqueeze(-1)).add_(g, alpha=kd_weight).div_(n)
                del g
            if need_grad:
                ds = ds.to(hc.dtype)
                grad_h[rows] = ds @ w_c
                if hc.dtype == torch.float32:
                    grad_w.addmm_(ds.T, hc)
                else:  # a low-precision chunk product, accumulated in fp32
                    grad_w += (ds.T @ hc).float()
                del ds
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        kd, lm = kd_sum / n, lm_sum / n
        return kd_weight * kd + lm_weight * lm, kd, lm

    @staticmethod
    def backward(ctx, g_total, g_kd, g_lm):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        out_h = (grad_h * g_total).to(h_dtype) if grad_h is not None else None
        out_w = (grad_w * g_total).to(w_dtype) if grad_w is not None else None
        return out_h, out_w, None, None, None, None, None, None, None, None, None, None


def fused_linear_kd_lm(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kd_weight: float = 0.5,
    lm_weight: float = 0.5,
    num_valid: torch.Tensor | int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    chunk_tokens: int = 128,
) -> FusedLoss:
    """kd_weight * kd_loss + lm_weight * lm_loss of the logits hidden @ weight^T, chunk by chunk.

    Args:
        hidden: (B, T, D) the student's final hidden states (after its last norm).
        weight: (V, D) the student's output projection (lm_head.weight; tied: the embedding).
        teacher: (B, T, V) teacher logits, or (teacher hidden (B, T, Dt), teacher weight (V, Dt)),
            whose logits are then formed chunk by chunk as well (no gradient either way).
        targets: (B, T) next-token ids, IGNORE_INDEX where there is none (`next_token_labels`).
        mask: (B, T) bool, the positions both terms score (default: targets != IGNORE_INDEX).
        num_valid: the denominator of both means (default: the number of scored positions).
        temperature, top_k, divergence, beta: as for kdlab.kd_loss.
        chunk_tokens: positions per chunk; the chunk's [C, V] tensors are the only vocabulary-sized ones.
    Returns:
        FusedLoss(total, kd, lm): total has the gradient; kd and lm equal kd_loss(...) and lm_loss(...)
        of the full logits (tested to 1e-5 in fp32, values and gradients).
    """
    _check_divergence(divergence, beta)
    if mask is None:
        mask = targets != IGNORE_INDEX
    keep = mask.reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # only scored positions get logits at all
    y = targets.reshape(-1)[keep]
    if isinstance(teacher, torch.Tensor):
        parts = (teacher.detach().reshape(-1, teacher.shape[-1])[keep],)
    else:
        t_hidden, t_weight = teacher
        parts = (t_hidden.detach().reshape(-1, t_hidden.shape[-1])[keep], t_weight.detach())
    n = num_valid if num_valid is not None else int(keep.sum())
    total, kd, lm = _FusedLinearKDLM.apply(
        h,
        weight,
        parts,
        y,
        float(kd_weight),
        float(lm_weight),
        n,
        float(temperature),
        int(top_k),
        divergence,
        float(beta),
        int(chunk_tokens),
    )
    return FusedLoss(total, kd.detach(), lm.detach())


# ---------------------------------------------------------------------------- use in the objective
def _raw(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a DDP or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose output the LM head reads (an HF decoder's final norm: model.model.norm)."""
    return getattr(getattr(_raw(model), "model", None), "norm", None)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The (V, D) output projection (the embedding, when tied)."""
    return _raw(model).get_output_embeddings().weight


@contextlib.contextmanager
def final_hidden_states(model: torch.nn.Module):
    """Capture the final norm's output of one forward of `model` into the yielded dict ("h")."""
    box: dict[str, torch.Tensor] = {}
    handle = final_norm(model).register_forward_hook(lambda module, args, out: box.__setitem__("h", out))
    try:
        yield box
    finally:
        handle.remove()


def _keeps_logits(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(_raw(model)).forward).parameters


def fused_unavailable(cfg, active: list[str], terms: dict, student: torch.nn.Module, teacher: torch.nn.Module) -> str:
    """'' when the fused loss can compute KD and LM for this run, else why not (for the log)."""
    others = [n for n in active if n not in ("kd", "lm") and terms[n].reads_logits]
    checks = [
        (not cfg.fused_loss, "fused_loss=false"),
        ("kd" not in active, "no KD term (alpha_kd=0)"),
        (
            bool(cfg.teacher_cache) and cfg.teacher_cache_kind == "top-k",
            "a top-k teacher cache (the teacher's top-k is read, not computed)",
        ),
        (student.config.vocab_size != teacher.config.vocab_size, "student and teacher vocabularies differ"),
        (cfg.adaptive_balance, "adaptive_balance (it rescales each term after its value is known)"),
        (cfg.grad_share_every > 0, "grad_share_every (each term's own gradient is needed)"),
        (cfg.compile, "compile"),
        (getattr(cfg, "on_policy", 0) > 0, "on-policy steps (kdlab.training.on_policy)"),
        (bool(others), f"terms that read the logits: {', '.join(others)}"),
        (
            any(final_norm(m) is None or not _keeps_logits(m) for m in (student, teacher)),
            "a model without model.norm or logits_to_keep",
        ),
    ]
    return next((why for failed, why in checks if failed), "")


__all__ = ["FusedLoss", "fused_linear_kd_lm", "fused_unavailable", "final_hidden_states", "output_weight"]
