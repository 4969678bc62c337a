"""Verdicts a notebook can stand behind: arms of several run seeds, compared at one step, judged
against the seed-to-seed spread of runs of the same size.

    kd = Arm.reference("default")                  # notebooks/reference/default, -seed1, -seed2
    lm = Arm.reference("lm-only")
    c = compare(kd, lm)                            # validation perplexity, at the last step both have
    print(c)        # val ppl 76.4 (76.0-77.0) vs 82.9 (82.2-83.8) at step 120: -6.5; noise 1.6 -> lower
    c.holds("lower")                               # "yes" | "no" | "within noise"
    table([("KD beats LM-only", c, "lower")])      # the notebook's verdict table (Markdown)

The rule, one for every notebook: the **noise** of a comparison is the largest seed range (max - min
over an arm's run seeds) among the arms compared, at the step compared; a difference of means larger
than that is resolved, anything smaller is "within noise". With three seeds a range is a rough
yardstick, so no verdict claims a multiple of it. A live run is judged against the noise of committed
runs of exactly its size (`noise=Arm.reference("ci/default")...`), never against a longer run's.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kdlab.errors import KDLabError

METRICS = {  # record key -> (name, format)
    "student_ppl": ("ppl", ".1f"),
    "student_bpb": ("bpb", ".4f"),
    "kl": ("KL", ".4f"),
    "top1_agree": ("top-1", ".3f"),
    "student_ce": ("CE", ".4f"),
    "teacher_nll": ("teacher NLL", ".3f"),
    "distinct_2": ("distinct-2", ".3f"),
}
SPLITS = {"validation": "val", "test": "test"}


def metric_name(metric: str, split: str = "validation") -> str:
    """ "val ppl", "test bpb", ...: how a comparison names what it compares."""
    name = METRICS.get(metric, (metric, ""))[0]
    return f"{SPLITS.get(split, split)} {name}"


def metric_format(metric: str) -> str:
    return METRICS.get(metric, (metric, ".4g"))[1]


SEEDS = (0, 1, 2)


def _records(run) -> list[dict[str, Any]]:
    if isinstance(run, (list, tuple)):
        return list(run)
    history = getattr(run, "history", None)
    if history is not None:
        return list(history)
    from kdlab.course.references import load_metrics

    return load_metrics(run)


def evals(records, split: str = "validation") -> dict[int, dict[str, Any]]:
    """{step: the evaluation record} of one run (early stopping's restored-best record left out)."""
    return {
        r["step"]: r
        for r in records
        if r.get("kind") == "eval" and r.get("split") == split and "restored_from" not in r
    }


@dataclass(frozen=True)
class Spread:
    """One metric over an arm's seeds at one step."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def range(self) -> float:
        return self.hi - self.lo

    def format(self, fmt: str = ".1f") -> str:
        if len(self.values) == 1:
            return f"{self.mean:{fmt}}"
        return f"{self.mean:{fmt}} ({self.lo:{fmt}}–{self.hi:{fmt}})"


@dataclass(frozen=True)
class Arm:
    """One setting trained with one or more run seeds: `runs` is ((label, records), ...)."""

    name: str
    runs: tuple[tuple[str, list[dict[str, Any]]], ...]

    @classmethod
    def of(cls, name: str, *runs, labels: Sequence[str] | None = None) -> Arm:
        """An arm from runs given as records, TrainStates, Reference objects or run folders."""
        if not runs:
            raise KDLabError(f"arm {name!r} has no runs")
        labels = list(labels) if labels is not None else [getattr(r, "arm", f"{name} #{i}") for i, r in enumerate(runs)]
        return cls(name, tuple((lab, _records(r)) for lab, r in zip(labels, runs, strict=True)))

    @classmethod
    def reference(cls, arm: str, seeds: Iterable[int] = SEEDS, name: str | None = None) -> Arm:
        """The committed reference runs of `arm` with these run seeds (seed 0 is `arm` itself, seed N
        `arm-seedN`; `ci/<arm>` for the runs of a notebook's ci size)."""
        from kdlab.course.references import reference

        names = [arm if s == 0 else f"{arm}-seed{s}" for s in seeds]
        refs = [reference(n) for n in names]
        return cls.of(name or arm, *refs, labels=names)

    @property
    def seeds(self) -> int:
        return len(self.runs)

    def steps(self, split: str = "validation") -> list[int]:
        """The evaluation steps every run of the arm has."""
        common = set.intersection(*(set(evals(r, split)) for _, r in self.runs))
        return sorted(common)

    def at(self, metric: str = "student_ppl", step: int | None = None, split: str = "validation") -> Spread:
        """`metric` over the seeds at `step` (default: the last evaluation step all seeds have)."""
        step = self.steps(split)[-1] if step is None else step
        values = []
        for label, records in self.runs:
            record = evals(records, split).get(step)
            if record is None or metric not in record:
                raise KDLabError(f"run {label!r} of arm {self.name!r} has no {split} {metric!r} at step {step}")
            values.append(float(record[metric]))
        return Spread(tuple(values))

    def describe(self) -> str:
        """Which runs the arm is: "default ×3 seeds", or the runs' labels when they are not seeds of one arm."""
        import re

        bases = {re.sub(r"-seed\d+$", "", label) for label, _ in self.runs}
        if len(bases) == 1 and self.seeds > 1:
            return f"{bases.pop()} ×{self.seeds} seeds"
        return ", ".join(label for label, _ in self.runs)


@dataclass(frozen=True)
class Comparison:
    """Arm `a` against arm `b` on one metric at one step, with the noise it is judged against."""

    metric: str
    step: int
    a: Spread
    b: Spread
    noise: float | None  # None: no arm had two seeds, so nothing to judge against
    noise_from: str  # the runs the noise was measured on
    split: str = "validation"

    @property
    def diff(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def verdict(self) -> str:
        """ "lower" or "higher" (a against b) when the difference exceeds the noise, else "within noise"."""
        if self.noise is None:
            return "not judged (one seed)"
        if abs(self.diff) <= self.noise:
            return "within noise"
        return "lower" if self.diff < 0 else "higher"

    def holds(self, expected: str) -> str:
        """ "yes" when the verdict is `expected` ("lower" or "higher"), "within noise", or "no"."""
        v = self.verdict
        return "yes" if v == expected else v if not v.startswith(("lower", "higher")) else "no"

    @property
    def name(self) -> str:
        return metric_name(self.metric, self.split)

    def measured(self, fmt: str | None = None) -> str:
        """ "val ppl 110.4 (107.0–116.0) vs 121.7 (118.8–126.2): -11.3"."""
        fmt = fmt or metric_format(self.metric)
        return f"{self.name} {self.a.format(fmt)} vs {self.b.format(fmt)}: {self.diff:+{fmt}}"

    def format(self, fmt: str | None = None) -> str:
        fmt = fmt or metric_format(self.metric)
        noise = "no noise measured" if self.noise is None else f"noise {self.noise:{fmt}}"
        a, b = self.a.format(fmt), self.b.format(fmt)
        return f"{self.name} {a} vs {b} at step {self.step}: {self.diff:+{fmt}}; {noise}"

    def __str__(self) -> str:
        return f"{self.format()} → {self.verdict}"


def noise_of(arms: Sequence[Arm], metric: str, step: int | None = None, split: str = "validation") -> float | None:
    """The largest seed range among `arms` (those with two seeds or more) at `step`."""
    ranges = [a.at(metric, step, split).range for a in arms if a.seeds >= 2]
    return max(ranges) if ranges else None


def compare(
    a: Arm,
    b: Arm,
    metric: str = "student_ppl",
    step: int | None = None,
    split: str = "validation",
    noise: Sequence[Arm] | None = None,
) -> Comparison:
    """`a` against `b` at `step` (default: the last step both have). The noise is the largest seed
    range of `a` and `b` when both have two seeds or more (else the comparison is not judged); give
    `noise` (arms of committed runs of the same size) to judge runs with a single seed, e.g. a
    notebook's live runs against `Arm.reference("ci/default")`."""
    if step is None:
        common = sorted(set(a.steps(split)) & set(b.steps(split)))
        if not common:
            raise KDLabError(f"arms {a.name!r} and {b.name!r} have no {split} evaluation step in common")
        step = common[-1]
    # without a yardstick of runs of the same size, both arms must have seeds of their own
    yardstick = list(noise) if noise is not None else ([a, b] if min(a.seeds, b.seeds) >= 2 else [])
    if noise is not None:  # the yardstick must be measured at the compared step, on runs of the same size
        for arm in yardstick:
            if step not in arm.steps(split):
                raise KDLabError(
                    f"noise arm {arm.name!r} has no evaluation at step {step}: it is not a run of the compared size"
                )
    spread = noise_of(yardstick, metric, step, split)
    source = "; ".join(f"{arm.describe()}" for arm in yardstick if arm.seeds >= 2)
    return Comparison(metric, step, a.at(metric, step, split), b.at(metric, step, split), spread, source, split)


Row = tuple  # (claim, Comparison | str measured, expected "lower"/"higher" | bool | str verdict)


def table(rows: Sequence[Row]) -> Any:
    """The verdict table: claim | measured | noise (the runs it came from) | holds.

    A row is (claim, comparison, expected) with expected "lower" or "higher", or (claim, measured text,
    True/False/"any verdict text") for a claim that is not a comparison of arms."""
    lines = ["| claim | measured | noise (runs, step) | holds |", "|---|---|---|---|"]
    for claim, measured, expected in rows:
        if isinstance(measured, Comparison):
            c = measured
            text = c.measured()
            noise = "—" if c.noise is None else f"{c.noise:{metric_format(c.metric)}} ({c.noise_from}; step {c.step})"
            holds = c.holds(expected)
        else:
            text, noise = str(measured), "—"
            holds = expected if isinstance(expected, str) else ("yes" if expected else "no")
        lines.append(f"| {claim} | {text} | {noise} | {holds} |")
    markdown = "\n".join(lines)
    try:
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover - IPython is a course dependency
        return markdown
    return Markdown(markdown)


__all__ = [
    "Arm",
    "Comparison",
    "Spread",
    "METRICS",
    "compare",
    "evals",
    "metric_format",
    "metric_name",
    "noise_of",
    "table",
]
