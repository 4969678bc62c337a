"""The loss-weight curriculum: the original framework's table, ramp shapes, presets, state, and the trainer's
use of it."""

from __future__ import annotations

import doctest
import math

import pytest

import kdlab
import kdlab.loss.curriculum
from kdlab.loss.curriculum import PRESETS, CurriculumScheduler, Ramp, parse_ramps

TERMS = ("kd", "feature", "attention", "layerwise", "contrastive")

# FIXES_IMPLEMENTED.md, fix 4, "Curriculum Schedule" (+ 30% from its "Curriculum Learning Impact" table)
SEED_TABLE = {
    0: (1, 0, 0, 0, 0),
    20: (1, 1 / 3, 1 / 3, 0, 0),
    30: (1, 2 / 3, 2 / 3, 0, 0),
    50: (1, 1, 1, 1 / 3, 0),
    80: (1, 1, 1, 1, 1 / 3),
    100: (1, 1, 1, 1, 1),
}


@pytest.mark.parametrize("total", [100, 1000, 12_500])  # 12,500: the original framework's run length
@pytest.mark.parametrize("percent", sorted(SEED_TABLE))
def test_default_preset_is_the_seed_table(percent, total):
    sched = CurriculumScheduler.from_preset(kdlab.KDConfig().curriculum, total)
    w = sched.weights_at(percent * total // 100)
    assert [w[k] for k in TERMS] == pytest.approx(SEED_TABLE[percent], abs=1e-12)


def test_seed_phases_preset_reproduces_the_earlier_schedule():
    """The write-up's 'before' column for the feature weight: 0 at 10% and 30%, 6.7% at 50%, 100% at 70%."""
    sched = CurriculumScheduler.from_preset("original-phases", 1000)
    feature = [sched.weights_at(p)["feature"] for p in (100, 300, 500, 700)]
    assert feature[0] == feature[1] == 0.0
    assert feature[2] == pytest.approx(0.067, abs=5e-4)
    assert feature[3] == 1.0


def test_ramp_shapes_against_their_formulas():
    lin, cos, hard = Ramp(0.2, 0.6), Ramp(0.2, 0.6, shape="cosine"), Ramp(0.5, 0.5)
    for p in [i / 20 for i in range(21)]:
        x = min(max((p - 0.2) / 0.4, 0.0), 1.0)
        assert lin.factor(p) == pytest.approx(x)
        assert cos.factor(p) == pytest.approx((1 - math.cos(math.pi * x)) / 2)
        assert hard.factor(p) == (1.0 if p >= 0.5 else 0.0)


def test_weights_scale_with_the_configured_maximum_and_are_pure():
    sched = CurriculumScheduler.from_preset("original", 10, {"kd": 0.5, "lm": 0.5, "feature": 0.25})
    assert sched.weights_at(2) == {"kd": 0.5, "lm": 0.5, "feature": pytest.approx(0.25 / 3)}
    assert sched.weights_at(2) == sched.weights_at(2)  # no hidden state
    assert sched.last_ramp_end() == 4  # only active terms count: feature ends at 40%


def test_state_dict_round_trip_and_mismatch():
    a = CurriculumScheduler.from_preset("original", 100)
    for _ in range(37):
        a.step()
    b = CurriculumScheduler.from_preset("original", 100)
    b.load_state_dict(a.state_dict())
    assert b.last_step == 37 and b.get_weights() == a.get_weights()
    with pytest.raises(kdlab.KDLabError, match="does not match"):
        CurriculumScheduler.from_preset("original", 200).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"feature": {"start": 0.5, "end": 0.2}},
            r"ramps.feature: ramp start=0.5, end=0.2: need 0 <= start <= end <= 1",
        ),
        (
            {"feature": {"start": 0.1, "end": 0.4, "shape": "step"}},
            r"shape='step' is not allowed; choose one of linear, cosine",
        ),
        ({"featur": {"start": 0.1}}, r"unknown term 'featur'; choose from lm, kd, feature"),
        ({"feature": {"begin": 0.1}}, r"unknown key\(s\) begin; allowed: start, end, shape"),
    ],
)
def test_bad_ramps_are_clear_errors(spec, message):
    with pytest.raises(kdlab.KDLabError, match=message):
        parse_ramps(spec)
    with pytest.raises(kdlab.KDLabError, match=message):
        kdlab.load_config(overrides={"ramps": spec})


def test_unknown_preset_names_the_allowed_ones():
    with pytest.raises(
        kdlab.KDLabError, match="curriculum='linear' is not allowed; choose one of constant, original, original-phases"
    ):
        kdlab.load_config(overrides={"curriculum": "linear"})
    assert set(PRESETS) == {"constant", "original", "original-phases"}


def test_module_doctest_table():
    result = doctest.testmod(kdlab.loss.curriculum)
    assert result.attempted > 0 and result.failed == 0


def test_trainer_logs_the_curriculum_weights_it_trains_with(tiny_overrides):
    over = {
        **tiny_overrides,
        "w_feature": 1.0,
        "w_layerwise": 0.5,
        "max_steps": 10,
        "log_every": 1,
        "eval_every": 0,
        "save_every": 0,
        "ramps": {"layerwise": {"start": 0.2, "end": 0.6, "shape": "cosine"}},
    }
    state = kdlab.train(kdlab.load_config(overrides=over))
    sched = CurriculumScheduler.from_preset(
        "original",
        10,
        {"kd": 0.5, "lm": 0.5, "feature": 1.0, "layerwise": 0.5},
        {"layerwise": Ramp(0.2, 0.6, shape="cosine")},
    )
    train = [r for r in state.history if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    for r in train:  # the record of step s holds the weights of the update that produced step s
        assert r["weights"] == pytest.approx(sched.weights_at(r["step"] - 1))
        for term, w in r["weights"].items():
            assert r["weighted"].get(term, 0.0) == pytest.approx(w * r[term], rel=1e-5, abs=1e-9)
    assert train[0]["weights"]["feature"] == 0.0 and train[-1]["weights"]["feature"] == 1.0
