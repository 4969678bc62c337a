"""The fused linear KD + LM loss (kdlab.loss.fused) against the reference path: the logits built in
full (hidden @ W^T), then kdlab.kd_loss and kdlab.lm_loss; values and gradients to 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

import kdlab
from kdlab.loss.divergences import IGNORE_INDEX
from kdlab.loss.fused import fused_linear_kd_lm


def _problem(seed=0, B=2, T=9, D=16, Dt=24, V=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    th = torch.randn(B, T, Dt, generator=g)
    tw = torch.randn(V, Dt, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -2:] = IGNORE_INDEX  # padding
    targets[:, -1] = IGNORE_INDEX  # the last position predicts nothing
    return h, w, th, tw, targets


def _reference(h, w, t_logits, targets, kd_w, lm_w, **kd):
    s = h @ w.T
    mask = targets != IGNORE_INDEX
    kd_v = kdlab.kd_loss(s, t_logits, mask, **kd)
    lm_v = kdlab.lm_loss(s, targets)
    return kd_w * kd_v + lm_w * lm_v, kd_v, lm_v


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("top_k", [0, 7])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_fused_equals_the_reference_path(divergence, top_k, temperature, teacher_as):
    h, w, th, tw, targets = _problem()
    kd = dict(temperature=temperature, top_k=top_k, divergence=divergence, beta=0.3)
    t_logits = th @ tw.T
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref, ref_kd, ref_lm = _reference(h1, w1, t_logits, targets, 0.7, 0.3, **kd)
    ref.backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    teacher = t_logits if teacher_as == "logits" else (th, tw)
    out = fused_linear_kd_lm(h2, w2, teacher, targets, kd_weight=0.7, lm_weight=0.3, chunk_tokens=4, **kd)
    out.total.backward()
    torch.testing.assert_close(out.total, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd, ref_kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.lm, ref_lm.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)


def test_global_count_and_chunking_do_not_change_the_result():
    """num_valid of a whole accumulated step: two halves sum to the whole; any chunk size gives the same."""
    h, w, th, tw, targets = _problem(seed=3, B=4)
    n = int((targets != IGNORE_INDEX).sum())
    whole = fused_linear_kd_lm(h, w, (th, tw), targets, chunk_tokens=5).total
    halves = sum(
        fused_linear_kd_lm(h[i : i + 2], w, (th[i : i + 2], tw), targets[i : i + 2], num_valid=n).total for i in (0, 2)
    )
    torch.testing.assert_close(halves, whole, rtol=1e-6, atol=1e-7)
    for chunk in (1, 3, 1000):
        torch.testing.assert_close(
            fused_linear_kd_lm(h, w, (th, tw), targets, chunk_tokens=chunk).total, whole, rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # T = 1: the shared-softmax path; T = 2: the general one
def test_a_padded_teacher_vocabulary_stays_finite_and_exact(temperature):
    """Teacher logits of -inf (a padded vocabulary) give p = 0 there: no nan, the reference's values and gradients."""
    h, w, th, tw, targets = _problem(seed=5)
    t_logits = th @ tw.T
    t_logits[..., -6:] = float("-inf")
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref, _, _ = _reference(h1, w1, t_logits, targets, 0.5, 0.5, temperature=temperature)
    ref.backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_linear_kd_lm(h2, w2, t_logits, targets, chunk_tokens=3, temperature=temperature)
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(h2.grad).all() and torch.isfinite(w2.grad).all()
    torch.testing.assert_close(out.total, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)


def test_no_gradient_buffers_without_grad_and_bad_divergence_refused():
    h, w, th, tw, targets = _problem()
    out = fused_linear_kd_lm(h, w, (th, tw), targets)
    assert not out.total.requires_grad
    with pytest.raises(ValueError, match="divergence='tvd' is not one of forward_kl, reverse_kl, jsd"):
        fused_linear_kd_lm(h, w, (th, tw), targets, divergence="tvd")


# ------------------------------------------------------------------ in the trainer
@pytest.mark.parametrize("extra", [{}, {"w_feature": 0.5, "w_attention": 0.5, "kd_top_k": 16, "temperature": 2.0}])
def test_a_fused_step_equals_the_logits_paths_step(tiny_overrides, tmp_path, extra):
    """The trainer takes the fused path by default where it applies; one step from the same weights on
    the same batch gives the same terms and the same gradients as the logits path.

    One step, not a trajectory: two float32 paths that sum in different orders differ by ~1e-7
    relative, and AdamW's first steps (m / sqrt(v), about +-lr whatever the gradient's size) turn
    that into different weights for near-zero gradients; how far two 6-step runs then drift depends
    on the CPU's vector width (AVX2 vs AVX-512). The gradient itself is the comparable quantity."""
    steps = {}
    for fused in (True, False):
        over = {**tiny_overrides, **extra, "fused_loss": fused, "out_dir": str(tmp_path / str(fused))}
        trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
        assert trainer.objective.fused is fused, trainer.objective.fused_off
        grads = {}

        def keep(optimizer, args, kwargs, trainer=trainer, grads=grads):
            grads.update({n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None})

        trainer.optimizer.register_step_pre_hook(keep)
        out = trainer.train_step(trainer.batches.next_step())
        steps[fused] = ({k: float(v) for k, v in out.items()}, grads)
    (terms, grads), (ref_terms, ref_grads) = steps[True], steps[False]
    for key in ("loss", "kd", "lm", "feature", "attention", "grad_norm"):
        if key in ref_terms:
            assert terms[key] == pytest.approx(ref_terms[key], rel=1e-5), key
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=name)


def test_a_fused_run_records_every_term(tiny_overrides):
    state = kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "log_every": 1}))
    train = [r for r in state.history if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["kd"] > 0 and r["lm"] > 0 for r in train)


def test_the_fused_path_steps_aside_where_it_does_not_apply(tiny_overrides):
    cases = {
        "alpha_kd": (0.0, "no KD term"),
        "adaptive_balance": (True, "adaptive_balance"),
        "grad_share_every": (2, "grad_share_every"),
        "fused_loss": (False, "fused_loss=false"),
    }
    for key, (value, why) in cases.items():
        trainer = kdlab.build_trainer(kdlab.load_config(overrides={**tiny_overrides, key: value}))
        assert not trainer.objective.fused and why in trainer.objective.fused_off, key
