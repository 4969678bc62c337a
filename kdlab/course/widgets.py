"""Live training widgets for JupyterLab: watch every loss term move while a cell trains.

    lp = kdlab.course.widgets.LivePlot()
    state = kdlab.train(cfg, callbacks=[lp])     # a progress bar, a status line and the figure, live
    lp.figure                                    # afterwards: a static figure (shows on GitHub too)

    kdlab.course.widgets.CurriculumExplorer().widget    # sliders over the curriculum (default: the original's)
    kdlab.course.widgets.TemperatureExplorer(logits, tokenizer)   # a temperature slider over one soft target

How it stays correct in JupyterLab *and* under headless nbval (tests/test_widgets.py, tests/test_browser.py):
one `VBox(progress, status, Output)` is displayed once with deterministic initial values; every
frame then replaces the Output's content with a single assignment to `out.outputs` (no
`clear_output`, so no flicker and no extra cell outputs); redraws are throttled; training stays in
the cell's own thread (Ctrl-C, the kernel's interrupt, still stops it cleanly).

What a saved notebook keeps: when training ends the live plot's display is replaced (a display_id
update) by the final figure as a plain PNG output, so a reopened notebook, GitHub or nbviewer shows
the figure, never the widget's text fallback. Widgets that stay interactive (the explorers) have a
one-line text fallback (`__repr__` of their box) instead of ipywidgets' `VBox(children=(...`.

Outside a notebook front end (scripts, CI) the live plot prints nothing and, if given
`png_path`, writes the final figure there. `import kdlab` imports neither this module nor
ipywidgets nor matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from typing import Any

import torch

from kdlab.course.plots import (
    draw_kl,
    draw_on_policy,
    draw_perplexity,
    draw_router,
    draw_terms,
    draw_weights,
    new_figure,
    on_policy_run,
    terms_of,
    weights_vary,
)
from kdlab.loss.curriculum import PRESETS, SHAPES, CurriculumScheduler, Ramp
from kdlab.training.callbacks import Callback
from kdlab.training.early_stopping import EarlyStopping


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where widgets can be displayed), False in scripts and IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


PNG_DPI = 100  # readable figures: every PNG this module renders


def png_bundle(fig, text: str = "<kdlab live plot>", dpi: int = PNG_DPI) -> dict[str, Any]:
    """A display_data output holding the figure as PNG (rendered here: no inline backend needed);
    `text` is its text/plain fallback."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return {
        "output_type": "display_data",
        "metadata": {},
        "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": text},
    }


_BOX_CLASS = None


def _box(children, text: str):
    """An ipywidgets VBox whose text/plain fallback (what a notebook shows where the widget cannot be
    drawn: a saved file without widget state, GitHub, nbviewer, a terminal) is the one line `text`."""
    global _BOX_CLASS
    if _BOX_CLASS is None:
        import ipywidgets as W

        class KDLabBox(W.VBox):
            kdlab_text = "<kdlab widget>"

            def __repr__(self) -> str:
                return self.kdlab_text

        _BOX_CLASS = KDLabBox
    box = _BOX_CLASS(children)
    box.kdlab_text = text
    return box


class LivePlot(Callback):
    """Trainer callback: loss terms (raw or weighted, selectable), the total, curriculum weights,
    validation metrics with the early-stopping state, and router utilisation when routers exist.

    Redraws at most every `every_steps` steps *and* `min_interval_s` seconds, and always at the end;
    it also waits long enough after each redraw that redrawing takes at most `max_overhead` of the
    wall time (a redraw costs 0.1-0.4 s on a 2-core CPU). `renders` counts redraws; `busy_s` is the
    time spent in this callback (its overhead).
    """

    @property
    def shows_progress(self) -> bool:  # the trainer leaves out its own progress bar when the widget shows one
        return self.use_widgets

    def __init__(
        self,
        show: str = "raw",
        terms: list[str] | None = None,
        every_steps: int = 1,
        min_interval_s: float = 1.0,
        max_overhead: float = 0.03,
        png_path: str | None = None,
        widgets: bool | None = None,
    ):
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
        self.weights_change: bool | None = None
        self.figure = None
        self.widget = None
        self._handle = None  # the display of the widget, replaced by the final figure at the end
        self.replaced = False  # True once the displayed widget has been swapped for the final PNG

    def __repr__(self) -> str:
        return (
            f"<kdlab LivePlot: {sum(r.get('kind') == 'train' for r in self.records)} train records, "
            f"{self.renders} redraws>"
        )

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
        # a weights panel only for a curriculum that changes a weight during this run (a flat line says nothing)
        curriculum = getattr(getattr(trainer, "objective", None), "curriculum", None)
        if curriculum is not None:
            grid = range(0, self.total_steps + 1, max(1, self.total_steps // 50))
            self.weights_change = len({tuple(sorted(curriculum.weights_at(s).items())) for s in grid}) > 1
        else:
            self.weights_change = None  # unknown (a replayed run): decided from the records
        if self.use_widgets:
            import ipywidgets as W

            # deterministic initial values: nbval compares this repr, the browser shows the updates
            self.bar = W.IntProgress(value=0, min=0, max=self.total_steps, description="distilling")
            self.status = W.HTML(value="")
            self.out = W.Output()
            self.widget = _box([self.bar, self.status, self.out], "<kdlab live plot: training>")
            self._handle, self.replaced = None, False
            for w, name in ((self.widget, "kdlab-liveplot"), (self.status, "kdlab-status"), (self.out, "kdlab-plot")):
                w.add_class(name)  # stable hooks for the browser test and for styling
            if in_notebook():
                from IPython.display import display

                self._handle = display(self.widget, display_id=True)

    def on_log(self, trainer, record: dict[str, Any]) -> None:
        self._update(trainer, record)

    def on_eval(self, trainer, record: dict[str, Any]) -> None:
        self._update(trainer, record)

    def on_train_end(self, trainer) -> None:
        t0 = time.perf_counter()
        self._sync_state(trainer)
        self.render()
        if self.png_path:
            self.figure.savefig(self.png_path, dpi=PNG_DPI)
        self._replace_with_final_figure()
        self.busy_s += time.perf_counter() - t0

    def _replace_with_final_figure(self) -> None:
        """Swap the displayed widget for the final figure as a plain PNG output (same display_id), so
        the saved notebook holds an image instead of a widget that only a live kernel can draw."""
        if self._handle is None or self.figure is None:
            return
        frame = self.out.outputs[0]["data"] if self.out.outputs else png_bundle(self.figure)["data"]
        self._handle.update(
            {"image/png": frame["image/png"], "text/plain": "<kdlab live plot: final figure>"}, raw=True
        )
        self.replaced = True

    def _sync_state(self, trainer) -> None:
        es = next((cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, EarlyStopping)), None)
        self.early_stopping = es.state_dict() if es is not None else None
        if es is not None:
            self.early_stopping["patience"], self.early_stopping["monitor"] = es.patience, es.monitor

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
        v = next(
            (x for x in reversed(self.records) if x.get("kind") == "eval" and x.get("split") == "validation"), None
        )
        parts = []
        if r is not None:
            parts.append(
                f"step {r['step']}/{self.total_steps} · loss {r['loss']:.4f} · "
                + " · ".join(f"{t} {r[t]:.4f}" for t in terms_of(self.records) if t in r)
            )
        if v is not None:
            parts.append(f"val KL {v['kl']:.4f} · val ppl {v['student_ppl']:.2f}")
        es = self.early_stopping
        if es and es.get("best") is not None:
            parts.append(
                f"early stopping: best {es['best']:.4f} at step {es['best_step']}, "
                f"{es['wait']}/{es['patience']} evaluations without improvement"
            )
        return "<br>".join(html.escape(p) for p in parts)

    def draw(self):
        """The current figure (a new Figure each time; the widget shows its PNG): loss terms, the
        curriculum weights when they change, validation perplexity and KL, an on-policy run's shares,
        the router's expert shares; at most two rows and MAX_WIDTH_IN inches."""
        vary = self.weights_change if self.weights_change is not None else weights_vary(self.records)
        router = any(r.get("router") for r in self.records if r.get("kind") == "train")
        on_policy = on_policy_run(self.records)
        fig, axes = new_figure(3 + vary + on_policy + router, width=3.5, height=2.9, fast=True)
        self.lines = draw_terms(axes[0], self.records, self.show, self.terms())
        if self.lines:
            axes[0].legend(fontsize=6, ncol=2)
        if vary and draw_weights(axes[1], self.records, self.terms()):
            axes[1].legend(fontsize=6)
        p, k = axes[1 + vary], axes[2 + vary]
        draw_perplexity(p, self.records, self.early_stopping)
        draw_kl(k, self.records, self.early_stopping)
        for ax in (p, k):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        if on_policy:
            draw_on_policy(axes[3 + vary], self.records)
        if router:
            draw_router(axes[-1], self.records)
        return fig

    def render(self) -> None:
        t0 = time.perf_counter()
        self.figure = self.draw()
        if self.use_widgets and self.widget is not None:
            self.out.outputs = (png_bundle(self.figure),)  # one trait update: the frame swaps whole
            if self.replaced:  # after training (lp.select / lp.hide): redraw the static figure in place
                self._replace_with_final_figure()
        self.renders += 1
        self._last_t = time.perf_counter()
        self._render_s = self._last_t - t0
        self._last_step = max((r["step"] for r in self.records), default=0)

    def points(self) -> dict[str, int]:
        """Points per drawn line of the loss panel (for tests)."""
        return {name: len(line.get_xdata()) for name, line in getattr(self, "lines", {}).items()}


class CurriculumExplorer:
    """Sliders over training progress and each term's ramp; shows the weights table and curves.

    Its default state is the original framework's table (preset "original"); `scheduler()` is the schedule shown.
    """

    def __init__(self, preset: str = "original", total_steps: int = 1000, progress: float = 0.5):
        import ipywidgets as W

        base = CurriculumScheduler.from_preset(preset, total_steps)
        self.total_steps = total_steps
        self.progress = W.FloatSlider(
            value=progress, min=0.0, max=1.0, step=0.01, description="progress", readout_format=".0%"
        )
        self.ranges = {
            t: W.FloatRangeSlider(
                value=(r.start, r.end), min=0.0, max=1.0, step=0.01, description=t, readout_format=".0%"
            )
            for t, r in base.ramps.items()
        }
        first = next(iter(base.ramps.values()), Ramp())
        self.shape = W.Dropdown(options=list(SHAPES), value=first.shape, description="shape")
        self.preset = W.Dropdown(options=list(PRESETS), value=preset, description="preset")
        self.table = W.HTML()
        self.out = W.Output()
        for w in (self.progress, self.shape, *self.ranges.values()):
            w.observe(lambda _: self.update(), names="value")
        self.preset.observe(lambda change: self.load_preset(change["new"]), names="value")
        self.widget = _box(
            [self.preset, self.progress, *self.ranges.values(), self.shape, self.table, self.out],
            "<kdlab curriculum explorer: sliders over the schedule (run the cell to use them)>",
        )
        self.widget.add_class("kdlab-curriculum")
        self.update()

    def __repr__(self) -> str:
        return f"<kdlab CurriculumExplorer: preset {self.preset.value!r}, progress {self.progress.value:.0%}>"

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

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
        self.table.value = f"<b>weights at {self.progress.value:.0%} of training</b><table>{rows}</table>"
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
        self.out.outputs = (png_bundle(fig, text="<kdlab curriculum weights>"),)


def temperature_stats(logits: torch.Tensor, temperature: float, k: int = 10) -> dict[str, float]:
    """The numbers of one soft target p_T = softmax(logits / T) over a (V,) logit vector:

    entropy           H = -sum p_T log p_T, in nats (log V for a uniform distribution)
    top_mass          the probability of the k most likely tokens
    effective_tokens  exp(H): the number of equally likely tokens with the same entropy
    top1              the largest probability
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    logp = torch.log_softmax(logits.detach().double().reshape(-1) / temperature, dim=-1)
    p = logp.exp()
    entropy = float(-torch.where(p > 0, p * logp, 0.0).sum())
    top = p.topk(min(k, p.numel())).values
    return {
        "temperature": float(temperature),
        "entropy": entropy,
        "top_mass": float(top.sum()),
        "effective_tokens": math.exp(entropy),
        "top1": float(top[0]),
        "k": int(min(k, p.numel())),
    }


class TemperatureExplorer:
    """A temperature slider over one next-token distribution: a bar chart (log scale) of its most
    likely tokens (decoded), the rest of the vocabulary as one grey bar, the uniform level 1/V, and
    the entropy, top-k mass and effective number of tokens at the slider's T. The T = 1 distribution
    stays drawn as outlines for comparison.

        ex = TemperatureExplorer(teacher_logits[0, pos], tokenizer)
        ex                              # the widget (or ex.widget)
        ex.numbers()                    # temperature_stats at the slider's T
        ex.figure_at((1, 2, 4))         # the static view: one panel per temperature
    """

    def __init__(
        self,
        logits: torch.Tensor,
        tokenizer,
        temperature: float = 1.0,
        n_tokens: int = 12,
        k: int = 10,
        t_min: float = 0.5,
        t_max: float = 8.0,
    ):
        import ipywidgets as W

        self.logits = logits.detach().float().reshape(-1).cpu()
        self.k, self.n_tokens = k, n_tokens
        # temperature never reorders tokens, so the same top tokens are the top at every T
        self.ids = self.logits.topk(n_tokens).indices.tolist()
        self.labels = [repr(tokenizer.decode([i])) for i in self.ids]
        self.slider = W.FloatSlider(
            value=temperature, min=t_min, max=t_max, step=0.1, description="T", readout_format=".1f"
        )
        self.stats = W.HTML()
        self.out = W.Output()
        self.widget = _box(
            [self.slider, self.stats, self.out],
            "<kdlab temperature explorer: a T slider over one soft target (run the cell to use it)>",
        )
        for w, name in (
            (self.widget, "kdlab-temperature"),
            (self.slider, "kdlab-temperature-slider"),
            (self.stats, "kdlab-temperature-stats"),
            (self.out, "kdlab-temperature-plot"),
        ):
            w.add_class(name)
        self.renders = 0
        self.slider.observe(lambda _: self.update(), names="value")
        self.update()

    def __repr__(self) -> str:
        return f"<kdlab TemperatureExplorer: T = {self.slider.value:.1f} over {self.logits.numel():,} tokens>"

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def temperature(self) -> float:
        return float(self.slider.value)

    def numbers(self, temperature: float | None = None) -> dict[str, float]:
        return temperature_stats(self.logits, self.temperature if temperature is None else temperature, self.k)

    def stats_text(self, temperature: float | None = None) -> str:
        s = self.numbers(temperature)
        return (
            f"T = {s['temperature']:.1f}: entropy {s['entropy']:.2f} nats · top-{s['k']} mass "
            f"{s['top_mass']:.3f} · effective number of tokens {s['effective_tokens']:,.1f}"
        )

    def draw(self, ax, temperature: float, reference: bool = True, labels: bool = True) -> None:
        """The bar chart at `temperature` on `ax` (the T = 1 bars as outlines when `reference`)."""
        p = torch.softmax(self.logits.double() / temperature, -1)
        top = p[self.ids].tolist()
        xs = list(range(len(top) + 1))
        ax.bar(xs[:-1], top, color="C0", label=f"T = {temperature:g}")
        ax.bar(xs[-1], 1 - sum(top), color="0.6", label="rest of the vocabulary")
        if reference and abs(temperature - 1.0) > 1e-9:
            p1 = torch.softmax(self.logits.double(), -1)
            top1 = p1[self.ids].tolist()
            ax.bar(xs, [*top1, 1 - sum(top1)], fill=False, edgecolor="k", lw=0.8, label="T = 1")
        ax.axhline(1 / self.logits.numel(), color="k", ls=":", lw=0.8, label="uniform (1/V)")
        ax.set_yscale("log")  # the flattening shows as bars levelling off towards 1/V
        ax.set_ylim(0.3 / self.logits.numel(), 8.0)  # headroom above 1 for the legend
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [*self.labels, f"other {self.logits.numel() - len(top):,}"] if labels else [],
            rotation=60,
            ha="right",
            fontsize=7,
        )
        s = self.numbers(temperature)
        ax.set_title(
            f"T = {temperature:g}: H = {s['entropy']:.2f} nats, exp(H) = {s['effective_tokens']:,.0f}", fontsize=9
        )
        ax.set_ylabel("probability (log scale)")
        ax.legend(fontsize=6, loc="upper center", ncol=2)

    def figure_at(self, temperatures=(1.0, 2.0, 4.0)):
        """The static view: one panel per temperature, side by side."""
        fig, axes = new_figure(len(temperatures), width=3.6, height=3.2)
        for ax, t in zip(axes, temperatures, strict=True):
            self.draw(ax, t)
        return fig

    def update(self) -> None:
        fig, (ax,) = new_figure(1, width=5.2, height=3.4)
        self.draw(ax, self.temperature)
        self.figure = fig
        self.stats.value = html.escape(self.stats_text())
        self.out.outputs = (png_bundle(fig, text=f"<kdlab soft target at T = {self.temperature:.1f}>"),)
        self.renders += 1


__all__ = ["LivePlot", "CurriculumExplorer", "TemperatureExplorer", "temperature_stats", "in_notebook", "png_bundle"]
