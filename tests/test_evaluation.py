"""Evaluation keeps the frozen teacher's logits between evaluations: the same numbers, fewer forwards."""

from __future__ import annotations

import pytest

import kdlab
from kdlab.training.evaluation import TeacherEvalCache, evaluate


def _counting(trainer, monkeypatch) -> list[int]:
    calls: list[int] = []
    real_forward = trainer.teacher.forward
    monkeypatch.setattr(trainer.teacher, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    return calls


def test_cached_evaluations_equal_recomputed_ones_with_one_teacher_forward_per_batch(
    tiny_overrides, tmp_path, monkeypatch
):
    overrides = {**tiny_overrides, "eval_every": 2, "eval_batches": 3, "early_stopping": False}
    runs = {}
    for mb in (0, 1024):
        cfg = kdlab.load_config(overrides={**overrides, "eval_cache_mb": mb, "out_dir": str(tmp_path / f"mb{mb}")})
        trainer = kdlab.build_trainer(cfg)
        calls = _counting(trainer, monkeypatch)
        state = trainer.fit()
        evals = [r for r in state.history if r["kind"] == "eval"]
        runs[mb] = (evals, len(calls))
    assert [r["step"] for r in runs[0][0] if r["split"] == "validation"] == [0, 2, 4, 6]
    assert runs[1024][0] == runs[0][0]  # every metric of every evaluation, exactly
    train_forwards = 6  # one teacher forward per optimizer step
    # validation at steps 0, 2, 4, 6 and test at 6: 5 x 3 forwards recomputed, 3 + 3 cached
    assert runs[0][1] == train_forwards + 5 * 3
    assert runs[1024][1] == train_forwards + 2 * 3


def test_the_cache_holds_only_what_fits_its_budget(tiny_overrides):
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=tiny_overrides))
    batches = list(trainer.data["validation"].eval_batches(2, 3))
    reference = evaluate(trainer.student, trainer.teacher, batches, trainer.precision)
    one_batch = 2 * 32 * trainer.teacher.config.vocab_size * 4  # (B, T, V) fp32 logits
    for budget, kept in ((one_batch - 1, 0), (one_batch, 1), (2 * one_batch, 2), (10 * one_batch, 3)):
        cache = TeacherEvalCache(budget)
        first = evaluate(trainer.student, trainer.teacher, batches, trainer.precision, teacher_cache=cache)
        again = evaluate(trainer.student, trainer.teacher, batches, trainer.precision, teacher_cache=cache)
        assert len(cache.logits) == kept and cache.bytes == kept * one_batch <= budget
        assert first == again == pytest.approx(reference, rel=0, abs=0)


def test_a_negative_cache_budget_is_refused():
    with pytest.raises(kdlab.KDLabError, match="eval_cache_mb=-1 must be >= 0"):
        kdlab.load_config(overrides={"eval_cache_mb": -1})
