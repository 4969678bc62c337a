"""kdlab.course.verdicts: arms of several seeds compared at one step against the seed spread."""

from __future__ import annotations

import statistics

import pytest

import kdlab
from kdlab.course.verdicts import Arm, compare, noise_of, table


def run(ppl_by_step: dict[int, float], kl: float = 1.0) -> list[dict]:
    records = [{"kind": "train", "step": 1, "loss": 1.0}]
    for step, ppl in ppl_by_step.items():
        records.append({"kind": "eval", "split": "validation", "step": step, "student_ppl": ppl, "kl": kl})
    return records


def test_a_difference_beyond_the_largest_seed_range_is_resolved():
    kd = Arm.of("kd", run({10: 100.0, 20: 80.0}), run({10: 104.0, 20: 82.0}), run({10: 98.0, 20: 81.0}))
    lm = Arm.of("lm", run({10: 101.0, 20: 90.0}), run({10: 103.0, 20: 93.0}), run({10: 99.0, 20: 91.5}))
    c = compare(kd, lm)  # the last step both have: 20
    assert c.step == 20
    assert c.a.mean == pytest.approx(statistics.fmean([80.0, 82.0, 81.0]))
    assert c.diff == pytest.approx(81.0 - statistics.fmean([90.0, 93.0, 91.5]))
    assert c.noise == pytest.approx(3.0)  # lm's range (90-93) is larger than kd's (80-82)
    assert c.verdict == "lower" and c.holds("lower") == "yes" and c.holds("higher") == "no"
    early = compare(kd, lm, step=10)  # means 100.67 vs 101, ranges 6 and 4
    assert early.verdict == "within noise" and early.holds("lower") == "within noise"
    assert str(early).endswith("→ within noise") and "at step 10" in str(early)


def test_a_single_run_is_judged_only_against_runs_of_its_own_size():
    live_kd, live_lm = Arm.of("kd", run({30: 95.0})), Arm.of("lm", run({30: 105.0}))
    assert compare(live_kd, live_lm).verdict == "not judged (one seed)"
    same_size = [Arm.of("kd ci", run({30: 94.0}), run({30: 99.0}), run({30: 96.0}))]
    c = compare(live_kd, live_lm, noise=same_size)
    assert c.noise == 5.0 and c.verdict == "lower"
    longer = [Arm.of("kd reference", run({120: 60.0}), run({120: 61.0}))]
    with pytest.raises(kdlab.KDLabError, match="not a run of the compared size"):
        compare(live_kd, live_lm, noise=longer)
    assert noise_of([live_kd], "student_ppl") is None


def test_missing_metric_or_step_is_one_clear_error():
    arm = Arm.of("kd", run({10: 1.0}), run({20: 2.0}))
    assert arm.steps() == []  # no step in common
    with pytest.raises(kdlab.KDLabError, match="no validation evaluation step in common"):
        compare(arm, arm)
    with pytest.raises(kdlab.KDLabError, match="has no validation 'student_bpb' at step 10"):
        Arm.of("x", run({10: 1.0})).at("student_bpb", 10)


def test_the_verdict_table_names_the_noise_and_its_runs():
    kd = Arm.of("kd", run({5: 10.0}), run({5: 11.0}), labels=["kd-a", "kd-b"])
    lm = Arm.of("lm", run({5: 20.0}), run({5: 20.5}), labels=["lm-a", "lm-b"])
    md = table([("KD beats LM", compare(kd, lm), "lower"), ("completes", "5/5 steps", True)])
    text = md.data if hasattr(md, "data") else md
    rows = text.splitlines()
    assert rows[0] == "| claim | measured | noise (runs, step) | holds |"
    measured = "val ppl 10.5 (10.0–11.0) vs 20.2 (20.0–20.5): -9.8"
    assert rows[2] == f"| KD beats LM | {measured} | 1.0 (kd-a, kd-b; lm-a, lm-b; step 5) | yes |"
    seeds = Arm.of("kd", run({5: 1.0}), run({5: 2.0}), run({5: 3.0}), labels=["kd", "kd-seed1", "kd-seed2"])
    assert seeds.describe() == "kd ×3 seeds"
    test = compare(seeds, seeds, split="validation")
    assert test.name == "val ppl" and compare(seeds, seeds, "kl").measured().startswith("val KL 1.0000 ")
    assert rows[3] == "| completes | 5/5 steps | — | yes |"
