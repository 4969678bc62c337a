"""Live training widgets for JupyterLab: watch every loss term move while a cell trains.

    lp = kdlab.widgets.LivePlot()
    state = kdlab.train(cfg, callbacks=[lp])     # a progress bar, a status line and the figure, live
    lp.figure                                    # afterwards: a static figure (shows on GitHub too)

    kdlab.widgets.CurriculumExplorer().widget    # sliders over the curriculum (default: the seed's)

How it stays correct in JupyterLab *and* under headless nbval (../shared/research/course-anchors.md):
one `VBox(progress, status, Output)` is displayed once with deterministic initial values; every
frame then replaces the Output's content with a single assignment to `out.outputs` (no
`clear_output`, so no flicker and no extra cell outputs); redraws are throttled; training stays in
the cell's own thread (Ctrl-C, the kernel's interrupt, still stops it cleanly).

Outside a notebook front end (scripts, CI) the live plot prints nothing and, if given
`png_path`, writes the final figure there. `import kdlab` imports neither this module nor
ipywidgets nor matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
import time
from typing import Any

from .curriculum import PRESETS, SHAPES, CurriculumScheduler, Ramp
from .plots import (
    draw_router,
    draw_terms,
    draw_validation,
    draw_weights,
    new_figure,
    terms_of,
)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where widgets can be displayed), False in scripts and IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def png_bundle(fig) -> dict[str, Any]:
    """A display_data output holding the figure as PNG (rendered here: no inline backend needed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": "<kdlab live plot>"}}


class LivePlot:
    """Trainer callback: loss terms (raw or weighted, selectable), the total, curriculum weights,
    validation metrics with the early-stopping state, and router utilisation when routers exist.

    Redraws at most every `every_steps` steps *and* `min_interval_s` seconds, and always at the end;
    it also waits long enough after each redraw that redrawing takes at most `max_overhead` of the
    wall time (a redraw costs 0.1-0.4 s on a 2-core CPU). `renders` counts redraws; `busy_s` is the
    time spent in this callback (its overhead).
    """

    shows_progress = True  # the trainer leaves out its own progress bar when this widget shows one

    def __init__(self, show: str = "raw", terms: list[str] | None = None, every_steps: int = 1,
                 min_interval_s: float = 1.0, max_overhead: float = 0.03, png_path: str | None = None,
                 widgets: bool | None = None):
        if show not in ("raw", "weighted"):
            raise ValueError(f"show={show!r} is not allowed; choose one of raw, weighted")
        self.show, self.visible = show, terms
        self.every_steps, self.min_interval_s, self.png_path = every_steps, min_interval_s, png_path
        self.max_overhead = max_overhead
        self._render_s = 0.0  # duration of the last redraw
        self.use_widgets = in_notebook() if widgets is None else widgets
        self.records: list[dict[str, Any]] = []
        self.early_stopping: dict | None = None
        self.renders, self.busy_s = 0, 0.0
        self._last_t, self._last_step = float("-inf"), None
        self.total_steps = 0
        self.figure = None
        self.widget = None

    # ------------------------------------------------------------------ selection
    def terms(self) -> list[str]:
        """The terms drawn: the selection, or every term the run has."""
        present = terms_of(self.records)
        return [t for t in present if self.visible is None or t in self.visible]

    def hide(self, term: str) -> None:
        self.visible = [t for t in (self.visible or terms_of(self.records)) if t != term]
        self.render()

    def select(self, terms: list[str] | None, show: str | None = None) -> None:
        """Choose the terms (None = all) and raw/weighted, then redraw."""
        self.visible, self.show = terms, show or self.show
        self.render()

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, trainer) -> None:
        self.total_steps = trainer.total_steps
        self.records = list(trainer.state.history)  # a resumed run starts with its past
        if self.use_widgets:
            import ipywidgets as W

            # deterministic initial values: nbval compares this repr, the browser shows the updates
            self.bar = W.IntProgress(value=0, min=0, max=self.total_steps, description="distilling")
            self.status = W.HTML(value="")
            self.out = W.Output()
            self.widget = W.VBox([self.bar, self.status, self.out])
            for w, name in ((self.widget, "kdlab-liveplot"), (self.status, "kdlab-status"), (self.out, "kdlab-plot")):
                w.add_class(name)  # stable hooks for the browser test and for styling
            if in_notebook():
                from IPython.display import display

                display(self.widget)

    def on_log(self, trainer, record: dict[str, Any]) -> None:
        self._update(trainer, record)

    def on_eval(self, trainer, record: dict[str, Any]) -> None:
        self._update(trainer, record)

    def on_train_end(self, trainer) -> None:
        t0 = time.perf_counter()
        self._sync_state(trainer)
        self.render()
        if self.png_path:
            self.figure.savefig(self.png_path, dpi=100)
        self.busy_s += time.perf_counter() - t0

    def _sync_state(self, trainer) -> None:
        es = getattr(trainer, "early_stopping", None)
        self.early_stopping = es.state_dict() if es is not None else None
        if es is not None:
            self.early_stopping["patience"] = es.patience

    def _update(self, trainer, record: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.records.append(record)
        self._sync_state(trainer)
        step = record["step"]
        if self.use_widgets:
            self.bar.value = step
            self.status.value = self.status_html()
        due_steps = self._last_step is None or step - self._last_step >= self.every_steps
        wait = max(self.min_interval_s, self._render_s * (1.0 / self.max_overhead - 1.0))
        due_time = time.perf_counter() - self._last_t >= wait
        if self.use_widgets and due_steps and due_time:  # headless: only the final figure is drawn
            self.render()
        self.busy_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ drawing
    def status_html(self) -> str:
        # the newest train and validation records (searched from the end: this runs on every update)
        r = next((x for x in reversed(self.records) if x.get("kind") == "train"), None)
        v = next((x for x in reversed(self.records) if x.get("kind") == "eval" and x.get("split") == "validation"), None)
        parts = []
        if r is not None:
            parts.append(f"step {r['step']}/{self.total_steps} · loss {r['loss']:.4f} · " + " · ".join(
                f"{t} {r[t]:.4f}" for t in terms_of(self.records) if t in r))
        if v is not None:
            parts.append(f"val KL {v['kl']:.4f} · val ppl {v['student_ppl']:.2f}")
        es = self.early_stopping
        if es and es.get("best") is not None:
            parts.append(f"early stopping: best {es['best']:.4f} at step {es['best_step']}, "
                         f"{es['wait']}/{es['patience']} evaluations without improvement")
        return "<br>".join(html.escape(p) for p in parts)

    def draw(self):
        """The current figure (a new Figure each time; the widget shows its PNG)."""
        router = any(r.get("router") for r in self.records if r.get("kind") == "train")
        n_router = len(next(r["router"] for r in self.records if r.get("router"))) if router else 0
        fig, axes = new_figure(3 + n_router, width=3.6, height=2.9, fast=True)
        self.lines = draw_terms(axes[0], self.records, self.show, self.terms())
        if self.lines:
            axes[0].legend(fontsize=6, ncol=2)
        if draw_weights(axes[1], self.records, self.terms()):
            axes[1].legend(fontsize=6)
        draw_validation(axes[2], self.records, self.early_stopping)
        if n_router:
            draw_router(axes[3:], self.records)
        return fig

    def render(self) -> None:
        t0 = time.perf_counter()
        self.figure = self.draw()
        if self.use_widgets and self.widget is not None:
            self.out.outputs = (png_bundle(self.figure),)  # one trait update: the frame swaps whole
        self.renders += 1
        self._last_t = time.perf_counter()
        self._render_s = self._last_t - t0
        self._last_step = max((r["step"] for r in self.records), default=0)

    def points(self) -> dict[str, int]:
        """Points per drawn line of the loss panel (for tests)."""
        return {name: len(line.get_xdata()) for name, line in getattr(self, "lines", {}).items()}


class CurriculumExplorer:
    """Sliders over training progress and each term's ramp; shows the weights table and curves.

    Its default state is the seed's table (preset "seed"); `scheduler()` is the schedule shown.
    """

    def __init__(self, preset: str = "seed", total_steps: int = 1000, progress: float = 0.5):
        import ipywidgets as W

        base = CurriculumScheduler.from_preset(preset, total_steps)
        self.total_steps = total_steps
        self.progress = W.FloatSlider(value=progress, min=0.0, max=1.0, step=0.01, description="progress",
                                      readout_format=".0%")
        self.ranges = {t: W.FloatRangeSlider(value=(r.start, r.end), min=0.0, max=1.0, step=0.01, description=t,
                                             readout_format=".0%") for t, r in base.ramps.items()}
        first = next(iter(base.ramps.values()), Ramp())
        self.shape = W.Dropdown(options=list(SHAPES), value=first.shape, description="shape")
        self.preset = W.Dropdown(options=list(PRESETS), value=preset, description="preset")
        self.table = W.HTML()
        self.out = W.Output()
        for w in (self.progress, self.shape, *self.ranges.values()):
            w.observe(lambda _: self.update(), names="value")
        self.preset.observe(lambda change: self.load_preset(change["new"]), names="value")
        self.widget = W.VBox([self.preset, self.progress, *self.ranges.values(), self.shape, self.table, self.out])
        self.update()

    def load_preset(self, name: str) -> None:
        sched = CurriculumScheduler.from_preset(name, self.total_steps)
        for t, w in self.ranges.items():
            r = sched.ramps.get(t, Ramp())
            w.value = (r.start, r.end)
        if sched.ramps:
            self.shape.value = next(iter(sched.ramps.values())).shape
        self.update()

    def scheduler(self) -> CurriculumScheduler:
        ramps = {t: Ramp(*w.value, shape=self.shape.value) for t, w in self.ranges.items()}
        return CurriculumScheduler(self.total_steps, dict.fromkeys(("kd", *ramps), 1.0), ramps)

    def weights(self) -> dict[str, float]:
        """The weights at the progress slider (as fractions of each term's maximum)."""
        return self.scheduler().weights_at(round(self.progress.value * self.total_steps))

    def update(self) -> None:
        w = self.weights()
        rows = "".join(f"<tr><td>{t}</td><td style='text-align:right'>{v:.1%}</td></tr>" for t, v in w.items())
        self.table.value = (f"<b>weights at {self.progress.value:.0%} of training</b>"
                            f"<table>{rows}</table>")
        sched = self.scheduler()
        fig, (ax,) = new_figure(1, width=5.0, height=2.8, fast=True)
        xs = list(range(self.total_steps + 1))
        for t in w:
            ax.plot([x / self.total_steps for x in xs], [sched.weights_at(x)[t] for x in xs], label=t)
        ax.axvline(self.progress.value, color="k", lw=0.8, ls=":")
        ax.set_xlabel("fraction of training")
        ax.set_ylabel("fraction of max weight")
        ax.legend(fontsize=7)
        self.figure = fig
        self.out.outputs = (png_bundle(fig),)


__all__ = ["LivePlot", "CurriculumExplorer", "in_notebook", "png_bundle"]
