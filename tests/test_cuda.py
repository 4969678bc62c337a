"""The CUDA path, run for real on a GPU (skipped elsewhere): the original framework's fp16 teacher with bf16 or
fp16 autocast, the GradScaler, no host sync inside a step, and resume on the GPU."""

from __future__ import annotations

import pytest
import torch

import kdlab

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def cuda_overrides(tiny_overrides):
    return {**tiny_overrides, "device": "cuda", "max_steps": 8, "eval_every": 4, "save_every": 4, "log_every": 2}


@pytest.mark.parametrize("autocast", ["bfloat16", "float16"])
def test_cuda_run_with_an_fp16_teacher_trains_and_keeps_fp32_weights(cuda_overrides, autocast):
    cfg = kdlab.load_config(
        overrides={
            **cuda_overrides,
            "autocast_dtype": autocast,
            "lr": 3e-3,
            "w_feature": 0.5,
            "w_attention": 0.5,
            "curriculum": "constant",
        }
    )
    trainer = kdlab.build_trainer(cfg)
    assert next(trainer.teacher.parameters()).dtype == torch.float16  # the original framework's set-up
    assert trainer.scaler.is_enabled() == (autocast == "float16")
    state = trainer.fit()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.student.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.objective.heads.parameters())
    val = state.evals("validation")
    assert val[-1]["kl"] < val[0]["kl"]
    # fp16's GradScaler may skip its first steps while it finds its scale; bf16 never skips
    assert state.skipped_steps == 0 if autocast == "bfloat16" else state.skipped_steps <= 4


def test_no_host_sync_inside_a_cuda_training_step(cuda_overrides):
    """torch's sync debug mode raises on any operation that waits for the GPU."""
    cfg = kdlab.load_config(
        overrides={
            **cuda_overrides,
            "w_feature": 1.0,
            "w_layerwise": 1.0,
            "w_contrastive": 0.5,
            "adaptive_balance": True,
            "grad_accum": 2,
            "curriculum": "constant",
        }
    )
    trainer = kdlab.build_trainer(cfg)
    batches = [trainer.batches.next_step() for _ in range(3)]
    trainer.train_step(batches[0])  # lazy initialisations (cuBLAS handles, optimizer state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            trainer.train_step(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_resume_matches_uninterrupted_run(cuda_overrides, tmp_path):
    straight = kdlab.train(kdlab.load_config(overrides={**cuda_overrides, "out_dir": str(tmp_path / "a")}))

    class Stop:
        def on_log(self, trainer, record):
            if trainer.state.step == 4:
                raise KeyboardInterrupt

    over = {**cuda_overrides, "out_dir": str(tmp_path / "b")}
    kdlab.train(kdlab.load_config(overrides=over), callbacks=[Stop()])
    resumed = kdlab.train(kdlab.load_config(overrides={**over, "resume": True}))
    a, b = straight.evals("test")[-1], resumed.evals("test")[-1]
    # the same kernels on the same data: equal up to GPU reduction-order nondeterminism
    assert b["kl"] == pytest.approx(a["kl"], rel=1e-3)
