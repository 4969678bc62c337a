"""End-to-end CPU runs with a tiny teacher and student: files, resume, accumulation, precision."""

from __future__ import annotations

import json

import pytest
import torch

import kdlab
from kdlab.training.checkpoint import latest_checkpoint


def _final_evals(state):
    return {r["split"]: r for r in state.history if r["kind"] == "eval" and r["step"] == state.step}


def test_end_to_end_run_writes_its_files_and_learns(tiny_overrides, tmp_path):
    cfg = kdlab.load_config(overrides=tiny_overrides)
    state = kdlab.train(cfg)
    out = tmp_path / "run"
    assert state.step == 6 and not state.interrupted
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "final/model.safetensors",
        "final/config.json",
        "final/tokenizer.json",
        "checkpoints/latest",
    ):
        assert (out / f).is_file(), f
    assert latest_checkpoint(out).name == "step-000006"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == state.history
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 6]  # the first log_first=3 steps, then every log_every=2
    assert [r["steps"] for r in train] == [1, 1, 1, 1, 2]
    keys = {"loss", "kd", "lm", "weighted", "weights", "lr", "grad_norm", "tokens_per_s", "skipped_steps"}
    assert all(keys <= set(r) for r in train)
    for r in train:  # the weighted terms add up to the logged total
        assert sum(r["weighted"].values()) == pytest.approx(r["loss"], rel=1e-5)
        assert r["weighted"]["kd"] == pytest.approx(0.5 * r["kd"], rel=1e-5)
    val = state.evals("validation")
    assert [r["step"] for r in val] == [0, 3, 6]
    assert val[-1]["kl"] < val[0]["kl"]  # it distils
    table = kdlab.format_summary(state.history)
    assert "student before (step 0)" in table and "student after (step 6)" in table and "val bpb" in table
    assert 0 < val[-1]["student_bpb"] < val[0]["student_bpb"] and val[-1]["teacher_bpb"] > 0
    # the saved student reloads as a plain HF model and gives the same evaluation
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    p = kdlab.resolve_precision("cpu")
    teacher = kdlab.load_teacher(cfg.teacher, cfg.data_dir, p)
    tok = kdlab.load_tokenizer(cfg.teacher, cfg.data_dir)
    data = kdlab.prepare_data(cfg.data, cfg.data_dir, tok, cfg.seq_len)
    again = kdlab.evaluate(reloaded, teacher, data["validation"].eval_batches(2, 2), p)
    assert again["kl"] == pytest.approx(val[-1]["kl"], rel=1e-5)


def test_cli_eval_of_a_saved_student(tiny_overrides, tmp_path, capsys):
    from kdlab.cli import main

    kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "max_steps": 2}))
    args = [
        "eval",
        "--student",
        str(tmp_path / "run" / "final"),
        "--teacher",
        tiny_overrides["teacher"],
        "--data-dir",
        tiny_overrides["data_dir"],
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-batches",
        "2",
        "--device",
        "cpu",
    ]
    assert main([*args, "--speed-batches", "1,2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:6] == ["model", "params", "tok/s", "b1", "tok/s", "b2"]
    for column in ("val ppl", "val bpb", "val KL", "test ppl", "test bpb", "ppl x T", "speed x T"):
        assert column in out[0]
    assert out[1].startswith("teacher") and out[2].startswith(str(tmp_path / "run" / "final")[:24])
    assert "(validation 124 tokens" in out[3]  # 2 batches of 2 blocks, 31 targets each
    assert out[4].startswith("(on ")


class _InterruptAt:
    def __init__(self, step):
        self.step = step

    def on_log(self, trainer, record):
        if trainer.state.step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interrupt_matches_uninterrupted_run(tiny_overrides, tmp_path):
    straight = kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "out_dir": str(tmp_path / "a")}))

    cfg_b = kdlab.load_config(overrides={**tiny_overrides, "out_dir": str(tmp_path / "b")})
    first = kdlab.train(cfg_b, callbacks=[_InterruptAt(4)])
    assert first.interrupted and first.step == 4
    assert first.tokens == 4 * 2 * 31  # 4 steps of 2 blocks of 32 tokens, 31 next-token targets each
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"
    resumed = kdlab.train(
        kdlab.load_config(overrides={**tiny_overrides, "out_dir": str(tmp_path / "b"), "resume": True})
    )
    assert resumed.step == 6 and not resumed.interrupted
    a, b = _final_evals(straight), _final_evals(resumed)
    for split in ("validation", "test"):
        for key in ("student_ce", "kl", "top1_agree"):
            assert b[split][key] == pytest.approx(a[split][key], rel=1e-6, abs=1e-7), (split, key)
    train_a = [r["loss"] for r in straight.history if r["kind"] == "train"]
    train_b = [r["loss"] for r in resumed.history if r["kind"] == "train"]
    assert train_b == pytest.approx(train_a, rel=1e-6)


def test_resume_refuses_changed_settings(tiny_overrides, tmp_path):
    kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "max_steps": 3}))
    with pytest.raises(kdlab.KDLabError, match="settings changed.*batch_size"):
        kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "max_steps": 3, "batch_size": 1, "resume": True}))


def test_gradient_accumulation_equals_one_big_batch(tiny_overrides):
    """2 micro-batches of 2 give the gradient of 1 batch of 4 (same valid-token normaliser)."""
    grads = {}
    for accum, bs in ((1, 4), (2, 2)):
        cfg = kdlab.load_config(overrides={**tiny_overrides, "grad_accum": accum, "batch_size": bs})
        torch.manual_seed(0)
        trainer = kdlab.build_trainer(cfg)
        batch = trainer.data["train"].batch(list(range(4)))
        batch["attention_mask"][3, 20:] = 0  # uneven valid counts make a mean of means differ
        batch["labels"][3, 20:] = kdlab.IGNORE_INDEX
        micro = [batch] if accum == 1 else [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
        trainer.optimizer.zero_grad = lambda *a, **k: None  # keep the gradients for inspection
        out = trainer.train_step(micro)
        grads[accum] = (float(out["loss"]), [p.grad.clone() for p in trainer.student.parameters()])
    assert grads[1][0] == pytest.approx(grads[2][0], rel=1e-5)
    for g1, g2 in zip(grads[1][1], grads[2][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


def test_lm_only_run_skips_the_teacher_in_training(tiny_overrides, monkeypatch):
    cfg = kdlab.load_config(overrides={**tiny_overrides, "alpha_kd": 0.0, "max_steps": 2, "eval_every": 0})
    trainer = kdlab.build_trainer(cfg)
    calls = []
    real_forward = trainer.teacher.forward
    monkeypatch.setattr(trainer.teacher, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    state = trainer.fit()
    # validation before (kept: kdlab.training.evaluation.TeacherEvalCache) and after, then test: two splits' batches
    n_eval_batches = 2 * cfg.eval_batches
    assert len(calls) == n_eval_batches
    assert all("kd" not in r and "lm" in r for r in state.history if r["kind"] == "train")


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_other_divergences_train(tiny_overrides, divergence):
    cfg = kdlab.load_config(
        overrides={
            **tiny_overrides,
            "kd_divergence": divergence,
            "kd_top_k": 16,
            "max_steps": 2,
            "eval_every": 0,
            "save_every": 0,
        }
    )
    state = kdlab.train(cfg)
    train = [r for r in state.history if r["kind"] == "train"]
    assert train and all(r["kd"] > 0 and r["kd"] == r["kd"] for r in train)


def test_student_weights_stay_fp32_with_a_half_precision_teacher(tiny_teacher):
    p = kdlab.Precision(torch.device("cpu"), torch.bfloat16, None)
    teacher = kdlab.load_teacher(str(tiny_teacher), "data", p)
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert not any(q.requires_grad for q in teacher.parameters())
    student = kdlab.build_student("tiny", teacher, "random", "data", p)
    assert all(q.dtype == torch.float32 for q in student.parameters())


def test_corrupt_checkpoint_gives_clear_error(tiny_overrides, tmp_path):
    kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "max_steps": 3}))
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(kdlab.KDLabError, match="corrupt or unreadable"):
        kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "max_steps": 3, "resume": True}))


def _poison_teacher(trainer, bad_calls):
    """Make the teacher's final hidden states (so its logits too) nan on the given (0-based) forward
    calls: what both the logits path and the fused loss (kdlab.loss.fused) read."""
    calls = {"n": 0}

    def poison(module, args, out):
        bad = calls["n"] in bad_calls
        calls["n"] += 1
        return torch.full_like(out, float("nan")) if bad else None

    trainer.teacher.model.norm.register_forward_hook(poison)


def test_nonfinite_step_is_skipped_without_touching_the_weights(tiny_overrides):
    cfg = kdlab.load_config(
        overrides={
            **tiny_overrides,
            "max_steps": 4,
            "eval_every": 0,
            "save_every": 0,
            "log_every": 1,
            "warmup_steps": 0,
        }
    )  # no lr-0 first step
    trainer = kdlab.build_trainer(cfg)
    eval_calls = cfg.eval_batches  # the step-0 evaluation runs the teacher first
    _poison_teacher(trainer, {eval_calls + 1})  # the teacher call of step 2
    before, real_step = {}, trainer.train_step

    def step(batches):
        before[trainer.state.step + 1] = [p.detach().clone() for p in trainer.student.parameters()]
        return real_step(batches)

    trainer.train_step = step
    state = trainer.fit()
    assert state.skipped_steps == 1 and not state.stop_reason and state.step == 4
    train = [r for r in state.history if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 3, 4]  # step 2 logged nothing: it did not happen
    assert all(r["loss"] == r["loss"] for r in train)  # no nan leaked into the logs
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    assert not same(before[1], before[2])  # step 1 trained
    assert same(before[2], before[3])  # step 2 was skipped: nothing moved, not even by AdamW's momentum


def test_run_stops_after_too_many_nonfinite_steps(tiny_overrides):
    cfg = kdlab.load_config(
        overrides={**tiny_overrides, "max_steps": 10, "eval_every": 0, "save_every": 0, "max_nonfinite_steps": 3}
    )
    trainer = kdlab.build_trainer(cfg)
    _poison_teacher(trainer, set(range(cfg.eval_batches, cfg.eval_batches + 100)))
    state = trainer.fit()
    assert state.step == 3 and state.skipped_steps == 3
    assert state.stop_reason == "3 non-finite steps in a row (max_nonfinite_steps)"
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())


def test_checkpoints_off_writes_only_the_models(tiny_overrides, tmp_path):
    # sweeps and the course: no ~0.5 GB resumable checkpoint per run, but the final (and best) model
    cfg = kdlab.load_config(overrides={**tiny_overrides, "max_steps": 3, "save_every": 1, "checkpoints": False})
    state = kdlab.train(cfg)
    out = tmp_path / "run"
    assert state.step == 3 and not (out / "checkpoints").exists()
    assert (out / "final" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    with pytest.raises(kdlab.KDLabError, match=r"resume=true needs checkpoints=true"):
        kdlab.load_config(overrides={**tiny_overrides, "checkpoints": False, "resume": True})


def test_compiled_forwards_train_like_eager(tiny_overrides, tmp_path):
    """compile=true (torch.compile of the training step's student and teacher forwards) trains the
    same numbers as eager mode; evaluation stays eager."""
    run = {**tiny_overrides, "max_steps": 3, "eval_every": 0, "save_every": 0, "checkpoints": False, "log_every": 1}
    eager = kdlab.train(kdlab.load_config(overrides=run))
    compiled = kdlab.train(kdlab.load_config(overrides={**run, "compile": True, "out_dir": str(tmp_path / "c")}))
    pairs = [(a, b) for a, b in zip(eager.history, compiled.history) if a["kind"] == "train"]
    assert len(pairs) == 3
    for a, b in pairs:
        for k in ("loss", "kd", "lm", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_train_blocks_trains_on_the_first_blocks_only_and_repeats_them(tiny_overrides):
    """train_blocks=N: a small corpus; every epoch is the same N blocks (here 2 steps of 2)."""
    cfg = kdlab.load_config(overrides={**tiny_overrides, "train_blocks": 4, "max_steps": 4})
    trainer = kdlab.build_trainer(cfg)
    assert len(trainer.data["train"]) == 4 and trainer.batches.steps_per_epoch == 2
    full = kdlab.prepare_data(cfg.data, cfg.data_dir, trainer.tokenizer, cfg.seq_len)["train"]
    assert torch.equal(trainer.data["train"].input_ids, full.input_ids[:4])
    state = trainer.fit()
    assert state.step == 4 and trainer.batches.epoch == 2
    with pytest.raises(kdlab.KDLabError, match=r"train_blocks=-1 must be >= 0"):
        kdlab.load_config(overrides={"train_blocks": -1})
