"""Figures of a run's records (matplotlib only): the ones the live plot draws, from files too.

    records = load_metrics("runs/default")                 # a run folder or its metrics.jsonl
    fig = plot_run(records)                                # terms, curriculum weights, validation
    fig = plot_runs({"seed form": "runs/seed", "kdlab": "runs/default"})   # side by side
    fig = plot_router(records)                             # expert shares per student layer, entropy
    fig = plot_differences(Arm.reference("default"), {"LM only": Arm.reference("lm-only")})   # seed bands

Figures are `matplotlib.figure.Figure` objects made without pyplot, so they never pop up or
display themselves twice; `display(fig)` shows one in a notebook and `fig.savefig(path)` writes it.
`import kdlab` does not import this module (nor matplotlib).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from kdlab.course.references import load_metrics
from kdlab.loss.terms import display_order as term_order
from kdlab.training.metrics import GENERATED


class _Colors(dict):
    """A term's colour: fixed by its place in `term_order()` (C0, C1, ...); the total in black; a
    generated step's term ("gen/kd", kdlab.training.on_policy) in its term's colour (drawn dashed)."""

    def get(self, term, default=None):
        if term == "total":
            return "k"
        term = term.removeprefix(GENERATED)
        order = term_order()
        return f"C{order.index(term) % 10}" if term in order else default

    def __missing__(self, term):
        return self.get(term)


COLORS = _Colors()


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
    ax.set_ylabel("nats per token")
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
    ax.set_ylabel("weight")
    return lines


def _val(records, key: str) -> list[tuple[int, float]]:
    return [
        (r["step"], r[key])
        for r in records
        if r.get("kind") == "eval" and r.get("split") == "validation" and key in r and "restored_from" not in r
    ]


def plain_log(ax) -> None:
    """A log-scale y axis labelled 40, 60, 100, 200 rather than 4 x 10^1 (perplexities read as numbers)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def draw_perplexity(ax, records, early_stopping: dict | None = None, label: str = "student") -> dict:
    """Validation perplexity of the student (log scale) and the teacher's, the floor it aims at."""
    lines = {}
    pts = _val(records, "student_ppl")
    if pts:
        (lines["student_ppl"],) = ax.plot(*zip(*pts, strict=True), "o-", ms=3, color="C0", label=label)
    teacher = _val(records, "teacher_ppl")
    if teacher:
        lines["teacher_ppl"] = ax.axhline(teacher[-1][1], color="k", ls="--", lw=1.0, label="teacher")
    if early_stopping and early_stopping.get("best_step") is not None and early_stopping.get("monitor") == "val_ce":
        _star(ax, records, early_stopping, "student_ppl")
    plain_log(ax)
    ax.set_title("validation perplexity")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("perplexity (log scale)")
    return lines


def draw_kl(ax, records, early_stopping: dict | None = None, label: str = "student") -> dict:
    """Validation KL(teacher || student) at T = 1 over the full vocabulary; the early-stopping best
    (when it monitors KL) as a star."""
    lines = {}
    pts = _val(records, "kl")
    if pts:
        (lines["kl"],) = ax.plot(*zip(*pts, strict=True), "o-", ms=3, color="C1", label=label)
    es = early_stopping or {}
    if es.get("best_step") is not None and es.get("monitor", "val_kl") == "val_kl":
        _star(ax, records, es, "kl")
    ax.set_title("validation KL(teacher‖student)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token")
    return lines


def _star(ax, records, es: dict, key: str) -> None:
    best = dict(_val(records, key)).get(es["best_step"])
    if best is not None:
        ax.plot([es["best_step"]], [best], "*", ms=12, color="gold", mec="k", label="best (restored at the end)")


def draw_validation(ax_ppl, ax_kl, records, early_stopping: dict | None = None) -> dict:
    """The two validation panels: perplexity (with the teacher's) and KL."""
    lines = draw_perplexity(ax_ppl, records, early_stopping)
    lines |= draw_kl(ax_kl, records, early_stopping)
    for ax in (ax_ppl, ax_kl):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return lines


MAX_WIDTH_IN = 13.8  # at 100 dpi: 1,380 px plus the inline backend's tight-bbox margin, under the 1,400 px
# JupyterLab shows without shrinking (course-review.md)


def new_figure(
    panels: int, width: float = 4.2, height: float = 3.2, fast: bool = False, dpi: int = 100, cols: int | None = None
) -> tuple[Figure, list]:
    """`panels` axes on at most two rows and at most MAX_WIDTH_IN inches (panels narrowed to fit).
    `cols`: panels per row (default: all on one row up to 4, else two rows). `fast`: fixed margins
    instead of constrained layout, which costs half of a redraw (live plots). `dpi`: what a notebook
    renders the figure at (the PNG stored in its output)."""
    if cols is None:
        cols = panels if panels <= 4 else -(-panels // 2)
    cols = max(1, min(cols, panels))
    rows = -(-panels // cols)
    if rows > 2:
        raise ValueError(f"{panels} panels in {cols} columns need {rows} rows; at most 2 are readable")
    width = min(width, MAX_WIDTH_IN / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout=None if fast else "constrained", dpi=dpi)
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.remove()
    if fast:
        fig.subplots_adjust(
            left=0.7 / (width * cols),
            right=1 - 0.2 / (width * cols),
            bottom=0.5 / (height * rows),
            top=1 - 0.35 / (height * rows),
            wspace=0.5,
            hspace=0.55,
        )
    return fig, axes[:panels]


def _records(run) -> list[dict[str, Any]]:
    """A run as its records: a list of records, a run folder / metrics.jsonl, or anything with `.history`
    (a TrainState, a kdlab.course.Reference)."""
    if isinstance(run, (str, Path)):
        return load_metrics(run)
    return getattr(run, "history", run)


def on_policy_run(records) -> bool:
    """Whether the records are an on-policy run's (kdlab.training.on_policy): they carry the on-policy share."""
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
    ax.set_ylabel("share")
    if lines:
        ax.legend(fontsize=6)
    return lines


def weights_vary(records) -> bool:
    """Whether the curriculum weights change during the run (else no weights panel: it would be flat)."""
    seen = {tuple(sorted(r["weights"].items())) for r in records if r.get("kind") == "train" and "weights" in r}
    return len(seen) > 1


def plot_run(
    records,
    show: str = "raw",
    terms=None,
    early_stopping: dict | None = None,
    reference=None,
    reference_label: str = "reference",
) -> Figure:
    """The loss terms and total, the curriculum weights (a panel only when they change), validation
    perplexity (with the teacher's) and KL, and an on-policy run's shares. `reference` (records, a run
    folder or a kdlab.course.Reference): a longer run of the same arm, drawn thin and grey under this one."""
    records = _records(records)
    ref = _records(reference) if reference is not None else None
    label = getattr(reference, "label", reference_label)
    vary = weights_vary(records) or (ref is not None and weights_vary(ref))
    on_policy = on_policy_run(records)
    fig, axes = new_figure(3 + vary + on_policy)
    a, p, k = axes[0], axes[1 + vary], axes[2 + vary]
    if ref is not None:
        draw_terms(a, ref, show, terms, style="-", alpha=0.35, lw=0.8, label=False)
        a.plot([], [], "-", color="0.55", lw=0.8, label=label)  # one legend entry for all reference terms
    draw_terms(a, records, show, terms)
    a.legend(fontsize=7, ncol=2)
    if vary and draw_weights(axes[1], records, terms):
        axes[1].legend(fontsize=7)
    draw_perplexity(p, records, early_stopping, label="this run")
    draw_kl(k, records, early_stopping, label="this run")
    if ref is not None:
        for ax, key in ((p, "student_ppl"), (k, "kl")):
            if _val(ref, key):
                ax.plot(*zip(*_val(ref, key), strict=True), "-", color="0.55", lw=1.0, label=label)
    for ax in (p, k):
        ax.legend(fontsize=7)
    if on_policy:
        draw_on_policy(axes[-1], records)
    return fig


def plot_runs(runs: dict[str, Any], show: str = "raw", terms=None, reference: dict[str, Any] | None = None) -> Figure:
    """Several runs on shared axes, one line style per run and one colour per term (a legend entry
    for each, not for each pair): the loss terms, validation perplexity and KL. `reference`: {name: the
    longer run of that arm}, its validation perplexity on a fourth panel with the same styles."""
    from matplotlib.lines import Line2D

    styles = ["-", "--", ":", "-."]
    fig, axes = new_figure(4 if reference else 3, width=3.5)
    a, p, k = axes[0], axes[1], axes[2]
    shown: set[str] = set()
    for i, (name, rec) in enumerate(runs.items()):
        rec = _records(rec)
        style = styles[i % len(styles)]
        shown |= set(draw_terms(a, rec, show, terms, label_prefix=f"{name}: ", style=style))
        for ax, key in ((p, "student_ppl"), (k, "kl")):
            if _val(rec, key):
                ax.plot(*zip(*_val(rec, key), strict=True), style, color=f"C{i}", marker="o", ms=3, label=name)
    order = [*term_order(), *(GENERATED + t for t in term_order()), "total"]
    handles = [
        Line2D([], [], color=COLORS.get(t), marker="x" if t.startswith(GENERATED) else None, label=t)
        for t in order
        if t in shown
    ]
    handles += [Line2D([], [], color="0.3", ls=styles[i % len(styles)], label=n) for i, n in enumerate(runs)]
    a.legend(handles=handles, fontsize=6, ncol=2)
    plain_log(p)
    for ax, title, unit in (
        (p, "validation perplexity", "perplexity (log scale)"),
        (k, "validation KL(teacher‖student)", "nats per token"),
    ):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    if reference:
        r_ax = axes[3]
        for i, (name, rec) in enumerate(reference.items()):
            rec_ = _records(rec)
            if _val(rec_, "student_ppl"):
                pts = _val(rec_, "student_ppl")
                r_ax.plot(*zip(*pts, strict=True), styles[i % len(styles)], color=f"C{i}", ms=2, marker="o", label=name)
        first = next(iter(reference.values()))
        plain_log(r_ax)
        r_ax.set_title(f"val perplexity, {getattr(first, 'label', 'reference runs')}", fontsize=9)
        r_ax.set_xlabel("optimizer step")
        r_ax.set_ylabel("perplexity (log scale)")
        r_ax.legend(fontsize=7)
    return fig


def plot_differences(
    baseline,
    arms: dict[str, Any],
    metric: str = "student_ppl",
    start: int | None = None,
    title: str | None = None,
) -> Figure:
    """Each arm's difference to the baseline over the run, with seed bands: the arm's mean minus the
    baseline's mean at every evaluation step (a line), the arm's seeds' range of that difference (a
    band), and the baseline's own seed band around zero (grey): a line inside the grey band is noise.
    `baseline` and the values of `arms` are kdlab.course.verdicts.Arm; `start`: the first step drawn
    (default: the second evaluation, after the shared initialisation). The y-axis is scaled to the
    differences, not to the metric's range."""
    from kdlab.course.verdicts import metric_name

    fig, (ax,) = new_figure(1, width=6.4, height=3.4)
    steps = baseline.steps()
    start = steps[1] if start is None and len(steps) > 1 else (start or 0)
    base = {s: baseline.at(metric, s) for s in steps if s >= start}
    xs = list(base)
    lo = [base[s].lo - base[s].mean for s in xs]
    hi = [base[s].hi - base[s].mean for s in xs]
    ax.fill_between(xs, lo, hi, color="0.8", label=f"{baseline.name}: its {baseline.seeds} seeds")
    ax.axhline(0.0, color="0.4", lw=0.8)
    for i, (name, arm) in enumerate(arms.items()):
        common = [s for s in xs if s in set(arm.steps())]
        spreads = {s: arm.at(metric, s) for s in common}
        mean = [spreads[s].mean - base[s].mean for s in common]
        ax.plot(common, mean, "o-", ms=3, color=f"C{i}", label=f"{name} ({arm.seeds} seeds)")
        if arm.seeds > 1:
            ax.fill_between(
                common,
                [spreads[s].lo - base[s].mean for s in common],
                [spreads[s].hi - base[s].mean for s in common],
                color=f"C{i}",
                alpha=0.2,
            )
    name = metric_name(metric)
    ax.set_title(title or f"{name}: each arm minus {baseline.name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"Δ {name} (arm − {baseline.name})")
    ax.legend(fontsize=7)
    return fig


def plot_tradeoff(grid: dict[str, Any], points: dict[str, tuple[float, float]] | None = None, batch: int = 8) -> Figure:
    """Quality against speed: each student depth of the pruning grid (kdlab.course.payoff.load_grid) as
    validation perplexity (mean, min-max over its seeds) against generation speed x the teacher's at
    `batch`, KD + LM and LM only; the teacher at (1, its perplexity); `points`: {label: (speed x teacher,
    val ppl)} more students (your own run) drawn as stars."""
    from kdlab.course.payoff import grid_arms

    arms, speed = grid_arms(grid), grid["speed"]["models"]
    fig, (ax,) = new_figure(1, width=7.0, height=4.2)
    t = speed["teacher"][f"b{batch}"]
    for i, (mode, label) in enumerate((("kd", "KD + LM"), ("lm", "LM only"))):
        depths = sorted(d for d, m in arms if m == mode)
        xs = [speed[f"d{d}"][f"b{batch}"] / t for d in depths]
        spreads = [arms[d, mode].at("student_ppl") for d in depths]
        ys = [s.mean for s in spreads]
        err = [[s.mean - s.lo for s in spreads], [s.hi - s.mean for s in spreads]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-" if mode == "kd" else "s--", color=f"C{i}", ms=5, capsize=3,
                    label=f"{label} ({arms[depths[0], mode].seeds} seeds, min–max)")  # fmt: skip
        if mode == "kd":
            for d, x, y in zip(depths, xs, ys, strict=True):
                ax.annotate(f"{d} layers", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    first = next(iter(grid["arms"].values()))
    ax.plot([1.0], [first["teacher_val_ppl"]], "k*", ms=12, label="teacher (30 layers)")
    for j, (label, (x, y)) in enumerate((points or {}).items()):
        ax.plot([x], [y], "*", ms=14, color=f"C{3 + j}", mec="k", label=label)
    plain_log(ax)
    ax.set_xlabel(f"generation speed × the teacher's (greedy, batch {batch})")
    ax.set_ylabel("validation perplexity (log scale)")
    steps = first["steps"]
    title = f"students cut from the teacher, {steps} steps each (the default run): quality against speed"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def draw_router(ax, records) -> int:
    """The last interval's expert shares as a heatmap, one row per student layer; returns the layer count."""
    train = [r for r in records if r.get("kind") == "train" and r.get("router")]
    if not train:
        return 0
    last = train[-1]["router"]
    shares = [layer["utilisation"] for layer in last]
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(shares[0])))
    ax.set_xlabel("expert (teacher block)")
    ax.set_ylabel("student layer")
    ax.set_title(f"router shares, step {train[-1]['step']}", fontsize=9)
    ax.figure.colorbar(image, ax=ax, label="share of routed tokens", fraction=0.08)
    return len(last)


def plot_router(records) -> Figure:
    """Is the router routing? The last interval's expert shares per student layer (a heatmap), and the
    entropy of each layer's shares over the run (log E when all E experts are used equally)."""
    import math

    records = _records(records)
    train = [r for r in records if r.get("kind") == "train" and r.get("router")]
    fig, (heat, ent) = new_figure(2, width=5.0, height=3.6)
    if not draw_router(heat, records):
        heat.set_title("no router records (w_feature = 0)")
        return fig
    steps = [r["step"] for r in train]
    n = len(train[0]["router"])
    for layer in range(n):
        ent.plot(steps, [r["router"][layer]["entropy"] for r in train], lw=1.0, color=f"C{layer % 10}",
                 label=f"layer {layer}" if n <= 6 else None)  # fmt: skip
    experts = len(train[0]["router"][0]["utilisation"])
    ent.axhline(math.log(experts), color="k", ls="--", lw=0.8, label=f"log {experts}: all used equally")
    ent.set_title("entropy of each layer's expert shares")
    ent.set_xlabel("optimizer step")
    ent.set_ylabel("entropy (nats)")
    ent.legend(fontsize=6)
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
    "draw_perplexity",
    "draw_kl",
    "draw_router",
    "new_figure",
    "plot_differences",
    "plot_tradeoff",
    "weights_vary",
]
