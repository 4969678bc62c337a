"""Vocabulary alignment, the student-side projector, and the original framework's teacher-side projector faults."""

from __future__ import annotations

import pytest
import torch

from kdlab.course.original import OriginalTeacherProjector, original_projected_kd
from kdlab.loss.divergences import kd_loss
from kdlab.loss.projection import StudentLogitProjector, align_vocab


def test_align_vocab_slices_or_pads_by_token_id():
    t = torch.randn(2, 3, 10)
    torch.testing.assert_close(align_vocab(t, 8), t[..., :8])
    padded = align_vocab(t, 12)
    assert padded.shape == (2, 3, 12) and torch.isinf(padded[..., 10:]).all()
    # the padded teacher gives a finite KD with a student that has extra (padding) columns
    s = torch.randn(2, 3, 12, requires_grad=True)
    loss = kd_loss(s, padded, torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_student_projector_keeps_fp32_weights_and_accepts_half_input():
    proj = StudentLogitProjector(6, 8)
    out = proj(torch.randn(2, 6).half())
    assert out.dtype == torch.float32 and proj.linear.weight.dtype == torch.float32
    x = torch.randn(3, 6)
    torch.testing.assert_close(proj(x)[:, :6], x)  # starts as the identity on shared ids


def test_seed_projector_reproduces_the_dtype_crash():
    proj = OriginalTeacherProjector(16, 16)
    with pytest.raises(RuntimeError, match="same dtype"):
        proj(torch.randn(4, 16).half())


def test_seed_projector_fp16_fix_breaks_adamw_at_step_one():
    proj = OriginalTeacherProjector(16, 16).half()  # the original framework's fix: cast the trainable module to fp16
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-5)
    x = torch.randn(8, 16).half()
    proj(x).float().pow(2).mean().backward()
    opt.step()
    # eps=1e-8 rounds to 0 in fp16 and grad^2 underflows: the update divides by 0 (inf or nan)
    assert (~torch.isfinite(proj.proj.weight)).float().mean() > 0.5


def test_seed_projector_target_collapses():
    """Reported KD goes to ~0 while the true KL(teacher || student) stays large."""
    torch.manual_seed(0)
    V, N = 32, 64
    teacher = torch.randn(N, V) * 4  # peaked, input-dependent teacher distributions
    student = torch.zeros(N, V, requires_grad=True)
    proj = OriginalTeacherProjector(V, V)
    opt = torch.optim.Adam([student, *proj.parameters()], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        reported = original_projected_kd(student, teacher, proj)
        reported.backward()
        opt.step()
    mask = torch.ones(1, N, dtype=torch.bool)
    true_kl = kd_loss(student.detach()[None], teacher[None], mask)
    assert reported.item() < 0.01
    assert true_kl.item() > 1.0


@pytest.fixture
def padded_student(tiny_teacher, tmp_path):
    """A pretrained tiny student whose embedding is padded to 64 more ids than the tokenizer has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152 + 64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "padded")
    return str(tmp_path / "padded")


def test_padded_student_vocabulary_trains_by_id_alignment(tiny_overrides, padded_student):
    import kdlab

    cfg = kdlab.load_config(
        overrides={**tiny_overrides, "student": padded_student, "max_steps": 2, "eval_every": 0, "save_every": 0}
    )
    state = kdlab.train(cfg)
    train = [r for r in state.history if r["kind"] == "train"]
    assert state.skipped_steps == 0 and all(0 < r["kd"] < 50 for r in train)
    assert all(r["kl"] == r["kl"] for r in state.evals("validation"))


def test_learned_projection_refuses_huge_vocabularies(tiny_overrides, padded_student):
    import kdlab

    cfg = kdlab.load_config(overrides={**tiny_overrides, "student": padded_student, "logit_projection": "learned"})
    with pytest.raises(kdlab.KDLabError, match="would train 2,419,.* parameters"):
        kdlab.build_trainer(cfg)


def test_match_logits_uses_the_student_side_projector():
    from kdlab.loss.terms import match_logits

    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 9)
    s2, t2 = match_logits(None, s, t)  # no projector: align the teacher by id
    assert s2 is s and torch.equal(t2, t[..., :6])
    s3, t3 = match_logits(StudentLogitProjector(6, 9), s, t)
    assert s3.shape == (2, 3, 9) and t3 is t
