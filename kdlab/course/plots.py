"""Figures of a run's records (matplotlib only): the ones the live plot draws, from files too.

    records = load_metrics("runs/default")                 # a run folder or its metrics.jsonl
    fig = plot_run(records)                                # terms, curriculum weights, validation
    fig = plot_runs({"seed form": "runs/seed", "kdlab": "runs/default"})   # side by side
    fig = plot_router(records)                             # expert utilisation per student layer

Figures are `matplotlib.figure.Figure` objects made without pyplot, so they never pop up or
display themselves twice; `display(fig)` shows one in a notebook and `fig.savefig(path)` writes it.
`import kdlab` does not import this module (nor matplotlib).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..metrics import GENERATED
from ..terms import display_order as term_order


class _Colors(dict):
    """A term's colour: fixed by its place in `term_order()` (C0, C1, ...); the total in black; a
    generated step's term ("gen/kd", kdlab.on_policy) in its term's colour (drawn dashed)."""

    def get(self, term, default=None):
        if term == "total":
            return "k"
        term = term.removeprefix(GENERATED)
        order = term_order()
        return f"C{order.index(term) % 10}" if term in order else default

    def __missing__(self, term):
        return self.get(term)


COLORS = _Colors()
VAL_METRICS = {"kl": "val KL(teacher‖student)", "student_ce": "val CE (student)"}


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run: `path` is a run folder (out_dir) or a metrics.jsonl file."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        from ..errors import KDLabError

        raise KDLabError(f"no metrics file at {str(p)!r}; give a run folder (out_dir) or its metrics.jsonl")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def terms_of(records: list[dict[str, Any]]) -> list[str]:
    """The loss terms present in a run's train records, in a fixed order (an on-policy run's
    generated-step terms, "gen/<term>", after the corpus ones)."""
    order = term_order()
    order = [*order, *(GENERATED + t for t in order)]
    seen = {k for r in records if r.get("kind") == "train" for k in r.get("weights", {})}
    seen |= {k for r in records if r.get("kind") == "train" for k in order if k in r}
    return [t for t in order if t in seen] + sorted(seen - set(order))  # then terms no longer registered


def term_series(records, term: str, show: str = "raw") -> tuple[list[int], list[float]]:
    """(steps, values) of one term: "raw" (unweighted), "weighted", or the total for term="total"."""
    steps, values = [], []
    for r in records:
        if r.get("kind") != "train":
            continue
        if term == "total":
            value = r.get("loss")
        elif show == "weighted":
            value = r.get("weighted", {}).get(term, 0.0 if term in r.get("weights", {}) else None)
        else:
            value = r.get(term)
        if value is not None:
            steps.append(r["step"])
            values.append(value)
    return steps, values


def draw_terms(
    ax,
    records,
    show: str = "raw",
    terms=None,
    label_prefix: str = "",
    style: str = "-",
    alpha: float = 1.0,
    lw: float | None = None,
    label: bool = True,
) -> dict:
    """Each visible term (and the total) against the step on `ax`; returns {name: Line2D}.
    `label=False`: no legend entries (the caller builds a compact legend)."""
    lines = {}
    for term in [*(terms if terms is not None else terms_of(records)), "total"]:
        steps, values = term_series(records, term, show)
        if steps:
            width = lw if lw is not None else (1.8 if term == "total" else 1.2)
            (lines[term],) = ax.plot(
                steps,
                values,
                "--" if term.startswith(GENERATED) and style == "-" else style,
                color=COLORS.get(term),
                alpha=alpha,
                lw=width,
                label=label_prefix + term if label else "_nolegend_",
                # a generated step's term is marked x: in plot_runs, where each run has its own line style
                marker=("x" if term.startswith(GENERATED) else ".") if len(steps) < 30 and alpha == 1.0 else None,
            )
    ax.set_title(f"loss terms ({show})" + ("" if show == "raw" else ", summing to the total"))
    ax.set_xlabel("optimizer step")
    if any(v > 0 for line in lines.values() for v in line.get_ydata()):
        ax.set_yscale("log")
    return lines


def draw_weights(ax, records, terms=None) -> dict:
    lines = {}
    train = [r for r in records if r.get("kind") == "train" and "weights" in r]
    for term in terms if terms is not None else terms_of(records):
        pts = [(r["step"], r["weights"][term]) for r in train if term in r["weights"]]
        if pts:
            (lines[term],) = ax.plot(
                *zip(*pts, strict=True),
                color=COLORS.get(term),
                label=term,
                lw=1.2,
                marker="." if len(pts) < 30 else None,
            )
    ax.set_title("curriculum weights")
    ax.set_xlabel("optimizer step")
    return lines


def draw_validation(ax, records, early_stopping: dict | None = None) -> dict:
    """Validation KL and CE over the run; the early-stopping best, if given, as a star."""
    lines = {}
    val = [r for r in records if r.get("kind") == "eval" and r.get("split") == "validation"]
    for i, (key, label) in enumerate(VAL_METRICS.items()):
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            axis = ax if i == 0 else ax.twinx()
            (lines[key],) = axis.plot(
                *zip(*pts, strict=True), "o-" if i == 0 else "s--", ms=3, color="C0" if i == 0 else "C7", label=label
            )
            axis.set_ylabel(label, color="C0" if i == 0 else "C7")
    if early_stopping and early_stopping.get("best_step") is not None:
        ax.plot(
            [early_stopping["best_step"]],
            [early_stopping["best"]],
            "*",
            ms=12,
            color="gold",
            mec="k",
            label="best (restored at the end)",
        )
    ax.set_title("validation")
    ax.set_xlabel("optimizer step")
    return lines


def new_figure(
    panels: int, width: float = 4.2, height: float = 3.2, fast: bool = False, dpi: int = 100
) -> tuple[Figure, list]:
    """`fast`: fixed margins instead of constrained layout, which costs half of a redraw (live plots).
    `dpi`: what a notebook renders the figure at (the PNG stored in its output)."""
    fig = Figure(figsize=(width * panels, height), layout=None if fast else "constrained", dpi=dpi)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if fast:
        fig.subplots_adjust(
            left=0.6 / (width * panels), right=1 - 0.5 / (width * panels), bottom=0.16, top=0.88, wspace=0.45
        )
    return fig, list(axes)


def _records(run) -> list[dict[str, Any]]:
    """A run as its records: a list of records, a run folder / metrics.jsonl, or anything with `.history`
    (a TrainState, a kdlab.course.Reference)."""
    if isinstance(run, (str, Path)):
        return load_metrics(run)
    return getattr(run, "history", run)


def on_policy_run(records) -> bool:
    """Whether the records are an on-policy run's (kdlab.on_policy): they carry the on-policy share."""
    return any("on_policy_share" in r for r in records if r.get("kind") == "train")


def draw_on_policy(ax, records) -> dict:
    """An on-policy run's share of generated steps and share of time spent generating, per interval."""
    train = [r for r in records if r.get("kind") == "train" and "on_policy_share" in r]
    lines = {}
    for key, label, color in (
        ("on_policy_share", "steps on generated text", "C0"),
        ("generate_share", "time spent generating", "C3"),
    ):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            (lines[key],) = ax.plot(*zip(*pts, strict=True), color=color, label=label, lw=1.2, marker=".")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("on-policy: share per log interval")
    ax.set_xlabel("optimizer step")
    if lines:
        ax.legend(fontsize=6)
    return lines


def _weights_vary(records) -> bool:
    seen = {tuple(sorted(r["weights"].items())) for r in records if r.get("kind") == "train" and "weights" in r}
    return len(seen) > 1


def _val_kl(records) -> list[tuple[int, float]]:
    return [
        (r["step"], r["kl"])
        for r in records
        if r.get("kind") == "eval" and r.get("split") == "validation" and "restored_from" not in r
    ]


def plot_run(
    records,
    show: str = "raw",
    terms=None,
    early_stopping: dict | None = None,
    reference=None,
    reference_label: str = "reference",
) -> Figure:
    """The loss terms and total, the curriculum weights (a panel only when they change), validation KL
    and CE. `reference` (records, a run folder or a kdlab.course.Reference): a longer run of the same
    arm, drawn thin and grey under this one (terms and validation KL)."""
    records = _records(records)
    ref = _records(reference) if reference is not None else None
    label = getattr(reference, "label", reference_label)
    vary = _weights_vary(records) or (ref is not None and _weights_vary(ref))
    on_policy = on_policy_run(records)
    fig, axes = new_figure(2 + vary + on_policy)
    a, c = axes[0], axes[1 + vary]
    if on_policy:
        draw_on_policy(axes[-1], records)
    if ref is not None:
        draw_terms(a, ref, show, terms, style="-", alpha=0.35, lw=0.8, label=False)
    if draw_terms(a, records, show, terms):
        a.legend(fontsize=7, ncol=2)
    if vary and draw_weights(axes[1], records, terms):
        axes[1].legend(fontsize=7)
    draw_validation(c, records, early_stopping)
    if ref is not None and _val_kl(ref):
        c.plot(*zip(*_val_kl(ref), strict=True), "-", color="0.55", lw=1.0, label=f"{label}: val KL")
        c.legend(fontsize=7)
        a.plot([], [], "-", color="0.55", lw=0.8, label=label)  # one legend entry for all reference terms
        a.legend(fontsize=7, ncol=2)
    return fig


def plot_runs(runs: dict[str, Any], show: str = "raw", terms=None, reference: dict[str, Any] | None = None) -> Figure:
    """Several runs on shared axes, one line style per run and one colour per term (a legend entry
    for each, not for each pair): the loss terms and validation KL. `reference`: {name: the longer
    run of that arm}, drawn on a third panel with the same styles."""
    from matplotlib.lines import Line2D

    styles = ["-", "--", ":", "-."]
    fig, axes = new_figure(3 if reference else 2, width=4.6)
    a, b = axes[0], axes[1]
    shown: set[str] = set()
    for i, (name, rec) in enumerate(runs.items()):
        rec = _records(rec)
        shown |= set(draw_terms(a, rec, show, terms, label_prefix=f"{name}: ", style=styles[i % len(styles)]))
        if _val_kl(rec):
            b.plot(*zip(*_val_kl(rec), strict=True), styles[i % len(styles)], marker="o", ms=3, label=name)
    order = [*term_order(), *(GENERATED + t for t in term_order()), "total"]
    handles = [
        Line2D([], [], color=COLORS.get(t), marker="x" if t.startswith(GENERATED) else None, label=t)
        for t in order
        if t in shown
    ]
    handles += [Line2D([], [], color="0.3", ls=styles[i % len(styles)], label=n) for i, n in enumerate(runs)]
    a.legend(handles=handles, fontsize=6, ncol=2)
    b.set_title("validation KL(teacher‖student)")
    b.set_xlabel("optimizer step")
    b.legend(fontsize=7)
    if reference:
        r_ax = axes[2]
        for i, (name, rec) in enumerate(reference.items()):
            rec_ = _records(rec)
            if _val_kl(rec_):
                r_ax.plot(*zip(*_val_kl(rec_), strict=True), styles[i % len(styles)], ms=2, marker="o", label=name)
        first = next(iter(reference.values()))
        r_ax.set_title(f"validation KL, {getattr(first, 'label', 'reference runs')}", fontsize=9)
        r_ax.set_xlabel("optimizer step")
        r_ax.legend(fontsize=7)
    return fig


def draw_router(axes, records) -> int:
    """Stacked expert utilisation over steps, one axis per student layer; returns the layer count."""
    train = [r for r in records if r.get("kind") == "train" and r.get("router")]
    if not train:
        return 0
    steps = [r["step"] for r in train]
    for layer, ax in enumerate(axes[: len(train[0]["router"])]):
        util = [r["router"][layer]["utilisation"] for r in train]
        ax.stackplot(steps, *zip(*util, strict=True), labels=[f"expert {e}" for e in range(len(util[0]))])
        ax.set_ylim(0, 1)
        ax.set_title(f"student layer {layer}: H = {train[-1]['router'][layer]['entropy']:.2f}", fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("share of routed tokens")
    axes[0].legend(fontsize=6, loc="lower left")
    return len(train[0]["router"])


def plot_router(records) -> Figure:
    """Is the router routing? Expert utilisation per student layer over the run."""
    records = _records(records)
    train = [r for r in records if r.get("kind") == "train" and r.get("router")]
    n = len(train[0]["router"]) if train else 1
    fig, axes = new_figure(n, width=3.0)
    if not draw_router(axes, records):
        axes[0].set_title("no router records (w_feature = 0)")
    return fig


__all__ = [
    "load_metrics",
    "plot_run",
    "plot_runs",
    "plot_router",
    "terms_of",
    "term_series",
    "draw_terms",
    "draw_weights",
    "draw_validation",
    "draw_router",
]
