"""Early stopping: its rule alone (patience in evaluations, warmup, min_delta, non-finite, divergence,
state), then inside a run (restore-best, the stop reason, the CLI's exit code)."""

from __future__ import annotations

import math

import pytest
import torch

import kdlab
from kdlab.training.early_stopping import EarlyStopping


def feed(es, values, start=0, every=1):
    return [es.update(start + i * every, v) for i, v in enumerate(values)]


def test_patience_counts_evaluations_not_steps():
    es = EarlyStopping(patience=3, min_delta=0.0)
    # evaluations every 500 steps: patience 3 = 3 evaluations without improvement, whatever the spacing
    verdicts = feed(es, [5.0, 4.0, 4.5, 4.2, 4.1], every=500)
    assert verdicts == ["improved", "improved", "wait", "wait", "stop"]
    assert es.stopped_step == 2000 and (es.best, es.best_step) == (4.0, 500)
    assert "did not improve by more than 0.0 for 3 evaluations (best 4.0000 at step 500)" in es.reason


def test_an_improvement_resets_the_count():
    es = EarlyStopping(patience=2, min_delta=0.0)
    assert feed(es, [3.0, 3.1, 2.9, 3.0, 3.0]) == ["improved", "wait", "improved", "wait", "stop"]


def test_min_delta_decides_patience_but_not_the_best_weights():
    es = EarlyStopping(patience=2, min_delta=0.01)
    # 0.995 beats 1.0 by less than min_delta: patience keeps counting, but it is the best weights so far
    assert feed(es, [1.0, 0.995, 0.993]) == ["improved", "improved", "stop"]
    assert es.best == 0.993 and es.ref == 1.0
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert feed(es, [1.0, 0.985, 0.98, 0.979]) == ["improved", "improved", "improved", "stop"]
    assert es.ref == 0.985  # 0.98 and 0.979 are within min_delta of 0.985


def test_warmup_evaluations_never_count_against_patience():
    es = EarlyStopping(patience=2, min_delta=0.0, warmup_steps=400)
    # the curriculum ramps until step 400: the KL may rise meanwhile without stopping the run
    assert feed(es, [2.0, 2.5, 2.6, 2.7, 2.8, 2.9], every=100) == ["improved", "wait", "wait", "wait", "wait", "stop"]
    assert es.stopped_step == 500  # evaluations at steps 400 and 500 are the two counted


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_metric_stops_at_once_even_in_warmup(bad):
    es = EarlyStopping(patience=20, warmup_steps=10_000)
    assert feed(es, [2.0, bad]) == ["improved", "stop"]
    assert "non-finite" in es.reason and es.best == 2.0


def test_abort_threshold_stops_at_once():
    es = EarlyStopping(patience=20, abort_threshold=10.0)
    assert feed(es, [8.0, 9.5, 10.5]) == ["improved", "wait", "stop"]
    assert "passed the abort threshold 10.0" in es.reason


def test_mode_max():
    es = EarlyStopping(monitor="val_ce", mode="max", patience=1, min_delta=0.0)
    assert feed(es, [0.1, 0.2, 0.15]) == ["improved", "improved", "stop"]


def test_state_dict_resumes_the_same_decisions():
    values = [3.0, 2.0, 2.5, 1.9995, 2.1, 2.2, 2.3]
    whole = EarlyStopping(patience=3, min_delta=0.001)
    expected = feed(whole, values)
    first = EarlyStopping(patience=3, min_delta=0.001)
    feed(first, values[:3])
    second = EarlyStopping(patience=3, min_delta=0.001)
    second.load_state_dict(first.state_dict())
    assert [second.update(i, v) for i, v in enumerate(values[3:], start=3)] == expected[3:]
    assert second.state_dict() == whole.state_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"monitor": "val_loss"}, "monitor='val_loss' is not allowed; choose one of val_kl, val_ce"),
        ({"mode": "up"}, "mode='up' is not allowed; choose one of min, max"),
        ({"patience": 0}, "patience=0 must be >= 1"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(kdlab.KDLabError, match=message):
        EarlyStopping(**kwargs)


def test_default_warmup_is_the_lr_warmup_not_the_last_ramp(tiny_overrides):
    # the earlier default (until the last ramp ends) was step 50 of 50 with contrastive on: a stopper
    # that could never fire under the write-up's curriculum
    over = {**tiny_overrides, "max_steps": 50, "w_layerwise": 1.0, "w_contrastive": 0.1, "warmup_steps": 5}
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    assert trainer.objective.curriculum.last_ramp_end() == 50
    assert trainer.callback(kdlab.EarlyStopping).warmup_steps == 5
    trainer = kdlab.build_trainer(kdlab.load_config(overrides={**over, "es_warmup_steps": 7}))
    assert trainer.callback(kdlab.EarlyStopping).warmup_steps == 7


class _Wreck:
    """Adds noise to the student's weights after step `at`, so the validation KL gets worse."""

    def __init__(self, at):
        self.at = at

    def on_log(self, trainer, record):
        if trainer.state.step == self.at:
            torch.manual_seed(0)
            with torch.no_grad():
                for p in trainer.student.parameters():
                    p.add_(torch.randn_like(p))


def test_run_stops_on_patience_and_restores_the_best_weights(tiny_overrides, tmp_path):
    over = {
        **tiny_overrides,
        "max_steps": 12,
        "eval_every": 1,
        "log_every": 1,
        "save_every": 0,
        "es_patience": 2,
        "es_warmup_steps": 0,
        "es_min_delta": 0.0,
    }
    state = kdlab.train(kdlab.load_config(overrides=over), callbacks=[_Wreck(at=3)])
    val = state.evals("validation")
    assert state.step == 4 and not state.failed  # the evaluations at steps 3 and 4 are worse than step 2's
    assert state.stop_reason.startswith("early stopping: val_kl did not improve")
    best = min(val[:-1], key=lambda r: r["kl"])
    assert best["step"] == 2
    final = val[-1]
    assert final["restored_from"] == 2 and final["kl"] == pytest.approx(best["kl"], rel=1e-6)
    test = state.evals("test")[-1]
    assert test["restored_from"] == 2
    # the saved final model is the best one, not the wrecked one
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert (run / "best" / "step").read_text().strip() == "2"
    final_w, best_w = load_file(run / "final" / "model.safetensors"), load_file(run / "best" / "model.safetensors")
    assert final_w.keys() == best_w.keys() and all(torch.equal(final_w[k], best_w[k]) for k in final_w)


def test_cli_exit_code_is_0_for_patience_and_1_for_a_diverging_metric(tiny_overrides, capsys):
    from kdlab.cli import main

    flags = []
    for k, v in {**tiny_overrides, "max_steps": 4, "eval_every": 1, "save_every": 0}.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    assert main(["train", *flags, "--es-abort-threshold", "1e-9"]) == 1
    assert "kdlab: error: the run stopped early: early stopping: val_kl=" in capsys.readouterr().err
