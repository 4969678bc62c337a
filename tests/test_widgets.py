"""The live plot, the curriculum explorer and the plots from files, without a browser
(tests/test_browser.py drives them in a real JupyterLab)."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys

import pytest
import torch

import kdlab
from kdlab.loss.curriculum import CurriculumScheduler

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from kdlab.course import plots  # noqa: E402
from kdlab.course.widgets import CurriculumExplorer, LivePlot, TemperatureExplorer, temperature_stats  # noqa: E402

TERMS = ("kd", "lm", "feature", "attention")


class FakeTrainer:
    """What the callback reads from a trainer: total steps, history, early stopping."""

    def __init__(self, total=1000):
        self.total_steps = total
        self.state = kdlab.TrainState()
        self.callbacks = [kdlab.EarlyStopping(patience=5)]

    def callback(self, kind):
        return next(cb for cb in self.callbacks if isinstance(cb, kind))


def record(step):
    w = {"kd": 0.5, "lm": 0.5, "feature": min(1.0, step / 10), "attention": 0.25}
    raw = {t: 1.0 + 1.0 / (step + i + 1) for i, t in enumerate(TERMS)}
    return {
        "kind": "train",
        "step": step,
        "steps": 1,
        **raw,
        "loss": sum(w[t] * raw[t] for t in TERMS),
        "weighted": {t: w[t] * raw[t] for t in TERMS},
        "weights": w,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 100.0,
        "skipped_steps": 0,
    }


def val(step, kl):
    return {
        "kind": "eval",
        "split": "validation",
        "step": step,
        "kl": kl,
        "student_ce": kl + 2,
        "student_ppl": 10.0,
        "teacher_ppl": 5.0,
        "top1_agree": 0.5,
        "tokens": 100,
    }


def feed(lp, trainer, k, evals_every=0):
    lp.on_train_begin(trainer)
    for step in range(1, k + 1):
        lp.on_log(trainer, record(step))
        if evals_every and step % evals_every == 0:
            rec = val(step, 3.0 / step)
            trainer.callback(kdlab.EarlyStopping).update(step, rec["kl"])
            lp.on_eval(trainer, rec)


@pytest.mark.parametrize("k", [1, 12])
def test_after_k_updates_each_visible_term_has_k_points(k):
    lp = LivePlot(widgets=True, min_interval_s=0.0, max_overhead=1.0)
    trainer = FakeTrainer()
    feed(lp, trainer, k)
    assert lp.points() == {t: k for t in (*TERMS, "total")}
    assert lp.bar.value == k and f"step {k}/1000" in lp.status.value
    (frame,) = lp.out.outputs  # exactly one frame: replaced, never appended
    assert base64.b64decode(frame["data"]["image/png"]).startswith(b"\x89PNG")
    json.dumps(lp.widget.get_state())  # serialisable widget state


def test_hiding_a_term_removes_it_and_weighted_view_sums_to_the_total():
    lp = LivePlot(widgets=True, min_interval_s=0.0, max_overhead=1.0)
    feed(lp, FakeTrainer(), 5)
    lp.hide("feature")
    assert set(lp.points()) == {"kd", "lm", "attention", "total"}
    lp.select(["kd", "lm"], show="weighted")
    assert set(lp.points()) == {"kd", "lm", "total"}
    ys = {name: line.get_ydata() for name, line in lp.lines.items()}
    r = record(5)
    assert ys["kd"][-1] == pytest.approx(r["weighted"]["kd"]) and ys["total"][-1] == pytest.approx(r["loss"])


def test_throttling_bounds_the_redraws():
    lp = LivePlot(widgets=True, min_interval_s=1e9)
    trainer = FakeTrainer()
    feed(lp, trainer, 1000)
    assert lp.renders == 1  # the first update only
    lp.on_train_end(trainer)
    assert lp.renders == 2  # ... and always the last step
    assert lp.points()["kd"] == 1000
    lp = LivePlot(widgets=True, min_interval_s=0.0, max_overhead=1.0, every_steps=100)
    feed(lp, FakeTrainer(), 1000)
    assert lp.renders == 10  # steps 1, 101, ..., 901
    # the overhead bound: after a redraw of r seconds, the next waits r * (1 / 0.03 - 1)
    lp = LivePlot(widgets=True, min_interval_s=0.0)
    feed(lp, FakeTrainer(), 200)
    assert lp.renders == 1 and lp._render_s > 0


def test_early_stopping_state_and_validation_are_shown():
    lp = LivePlot(widgets=True, min_interval_s=0.0, max_overhead=1.0, every_steps=10)
    trainer = FakeTrainer()
    feed(lp, trainer, 20, evals_every=5)
    assert "early stopping: best 0.1500 at step 20, 0/5 evaluations without improvement" in lp.status.value
    assert "val KL 0.1500" in lp.status.value


def test_headless_it_prints_nothing_and_writes_the_final_png(tiny_overrides, tmp_path, capsys):
    lp = LivePlot(png_path=str(tmp_path / "curves.png"))
    assert not lp.use_widgets  # no Jupyter kernel here
    capsys.readouterr()
    state = kdlab.train(kdlab.load_config(overrides={**tiny_overrides, "w_feature": 0.5}), callbacks=[lp])
    out = capsys.readouterr()
    assert out.out == ""  # nothing printed by the callback (kdlab's own log lines go to stderr)
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert lp.renders == 1 and lp.widget is None
    assert lp.records == state.history


@pytest.mark.parametrize("progress", [0.0, 0.2, 0.3, 0.5, 0.8, 1.0])
def test_explorer_table_equals_the_scheduler(progress):
    ex = CurriculumExplorer(progress=progress)  # default state: the original framework's table
    seed = CurriculumScheduler.from_preset("original", 1000)
    assert ex.weights() == pytest.approx(seed.weights_at(round(progress * 1000)))
    for term, weight in ex.weights().items():
        assert f"<td>{term}</td><td style='text-align:right'>{weight:.1%}</td>" in ex.table.value


def test_explorer_sliders_change_the_schedule():
    ex = CurriculumExplorer(progress=0.5)
    ex.ranges["feature"].value = (0.4, 0.6)
    ex.shape.value = "cosine"
    expected = CurriculumScheduler(
        1000,
        dict.fromkeys(("kd", "feature", "attention", "layerwise", "contrastive"), 1.0),
        {
            "feature": kdlab.Ramp(0.4, 0.6, shape="cosine"),
            "attention": kdlab.Ramp(0.1, 0.4, shape="cosine"),
            "layerwise": kdlab.Ramp(0.4, 0.7, shape="cosine"),
            "contrastive": kdlab.Ramp(0.7, 1.0, shape="cosine"),
        },
    )
    assert ex.weights() == pytest.approx(expected.weights_at(500))
    assert ex.weights()["feature"] == pytest.approx(0.5)
    ex.preset.value = "original-phases"
    assert ex.weights()["feature"] == pytest.approx(0.067, abs=5e-4)


class FakeHandle:
    """What IPython's display(..., display_id=True) returns: records the display updates."""

    def __init__(self, obj):
        self.obj, self.updates = obj, []

    def update(self, obj, **kwargs):
        self.updates.append((obj, kwargs))


def png_width(b64: str) -> int:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return int.from_bytes(data[16:20], "big")  # the IHDR chunk's width


def test_live_plot_leaves_the_final_figure_as_a_png_not_a_widget(monkeypatch):
    import IPython.display

    import kdlab.course.widgets

    handles = []
    monkeypatch.setattr(kdlab.course.widgets, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: handles.append(FakeHandle(obj)) or handles[-1])
    lp = LivePlot(min_interval_s=0.0, max_overhead=1.0)
    trainer = FakeTrainer()
    feed(lp, trainer, 3)
    (handle,) = handles
    assert handle.obj is lp.widget and not handle.updates  # the live widget, while training runs
    text = lp.widget._repr_mimebundle_()["text/plain"]  # what a saved notebook would show for it
    assert text == "<kdlab live plot: training>" and "VBox(children" not in repr(lp)
    lp.on_train_end(trainer)
    ((data, kwargs),) = handle.updates
    assert kwargs == {"raw": True} and lp.replaced
    last_frame = lp.out.outputs[0]["data"]["image/png"]
    assert data == {"image/png": last_frame, "text/plain": "<kdlab live plot: final figure>"}
    assert png_width(data["image/png"]) >= 100 * lp.figure.get_figwidth() - 1  # rendered at >= 100 dpi
    lp.select(["kd"])  # after training: the static figure is redrawn in place
    assert len(handle.updates) == 2 and handle.updates[1][0]["image/png"] != data["image/png"]


def test_a_full_live_frame_fits_two_rows_and_1400_px():
    """Every panel at once (changing weights, on-policy shares, a 15-layer router): two rows at most,
    no wider than JupyterLab shows without shrinking, every axis labelled."""
    lp = LivePlot(widgets=False)
    trainer = FakeTrainer()
    lp.on_train_begin(trainer)
    layers = [{"utilisation": [0.4, 0.3, 0.2, 0.1], "entropy": 1.28} for _ in range(15)]
    for step in range(1, 9):
        r = {**record(step), "router": layers, "on_policy_share": 0.5, "generate_share": 0.3}
        lp.on_log(trainer, r)
        if step % 4 == 0:
            lp.on_eval(trainer, val(step, 2.0 / step))
    lp.on_train_end(trainer)
    fig = lp.figure
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 6  # terms, weights, perplexity, KL, on-policy, router
    assert len({round(ax.get_position().y0, 3) for ax in panels}) == 2
    from kdlab.course.widgets import png_bundle

    assert fig.get_figwidth() <= plots.MAX_WIDTH_IN and png_width(png_bundle(fig)["data"]["image/png"]) <= 1400
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)


def test_temperature_stats_are_the_soft_targets_numbers():
    V = 1000
    uniform = temperature_stats(torch.zeros(V), 1.0, k=10)
    assert uniform["entropy"] == pytest.approx(math.log(V)) and uniform["effective_tokens"] == pytest.approx(V)
    assert uniform["top_mass"] == pytest.approx(10 / V) and uniform["top1"] == pytest.approx(1 / V)
    two = temperature_stats(torch.tensor([0.0, math.log(3.0)]), 1.0, k=1)  # p = (1/4, 3/4)
    assert two["entropy"] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert two["top_mass"] == pytest.approx(0.75)
    torch.manual_seed(0)
    z = torch.randn(V) * 4
    assert temperature_stats(z, 2.0) == pytest.approx({**temperature_stats(z / 2, 1.0), "temperature": 2.0})
    entropies = [temperature_stats(z, t)["entropy"] for t in (0.5, 1, 2, 4, 8)]
    assert entropies == sorted(entropies) and entropies[-1] < math.log(V)  # flatter with T, towards log V
    with pytest.raises(ValueError, match="must be > 0"):
        temperature_stats(z, 0.0)


class FakeTokenizer:
    def decode(self, ids):
        return f" tok{ids[0]}"


def test_temperature_explorer_redraws_on_the_slider():
    torch.manual_seed(0)
    z = torch.randn(500) * 3
    ex = TemperatureExplorer(z, FakeTokenizer(), n_tokens=8)
    assert ex.ids == z.topk(8).indices.tolist() and ex.labels[0] == repr(f" tok{ex.ids[0]}")
    s1 = temperature_stats(z, 1.0)
    assert ex.numbers() == s1
    assert f"entropy {s1['entropy']:.2f} nats" in ex.stats.value and ex.stats.value.startswith("T = 1.0")
    (frame1,) = ex.out.outputs
    ex.slider.value = 4.0
    (frame4,) = ex.out.outputs  # one frame, replaced
    assert ex.renders == 2 and frame4["data"]["image/png"] != frame1["data"]["image/png"]
    assert ex.stats.value.startswith("T = 4.0") and ex.numbers() == temperature_stats(z, 4.0)
    assert png_width(frame4["data"]["image/png"]) >= 100 * ex.figure.get_figwidth() - 1
    fig = ex.figure_at((1, 2, 4))
    assert [a.get_title().split(":")[0] for a in fig.axes] == ["T = 1", "T = 2", "T = 4"]
    # the text fallbacks a saved notebook shows: one short line each, never "VBox(children=..."
    assert ex._repr_mimebundle_()["text/plain"].startswith("<kdlab temperature explorer")
    assert repr(ex) == "<kdlab TemperatureExplorer: T = 4.0 over 500 tokens>"
    json.dumps(ex.widget.get_state())
    cur = CurriculumExplorer()
    assert cur._repr_mimebundle_()["text/plain"].startswith("<kdlab curriculum explorer")
    assert "VBox(children" not in repr(cur.widget)


def test_plots_from_files_compare_runs(tiny_overrides, tmp_path):
    over = {**tiny_overrides, "w_feature": 0.5, "curriculum": "constant", "log_every": 1}
    lp = LivePlot(widgets=False)
    kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "a")}), callbacks=[lp])
    # the live plot knows from the trainer's curriculum that the weights never change: no weights panel
    live_titles = [ax.get_title() for ax in lp.figure.axes if ax.get_label() != "<colorbar>"]
    assert live_titles[:3] == ["loss terms (raw)", "validation perplexity", "validation KL(teacher‖student)"]
    assert "curriculum weights" not in live_titles
    kdlab.train(kdlab.load_config(overrides={**over, "alpha_kd": 0.0, "out_dir": str(tmp_path / "b")}))
    records = plots.load_metrics(tmp_path / "a")
    fig = plots.plot_run(records)
    loss_ax = fig.axes[0]
    assert {line.get_label() for line in loss_ax.lines} == {"kd", "lm", "feature", "total"}
    assert all(len(line.get_xdata()) == 6 for line in loss_ax.lines)
    both = plots.plot_runs({"KD": tmp_path / "a", "LM only": tmp_path / "b"})
    labels = {line.get_label() for line in both.axes[0].lines}
    assert {"KD: kd", "KD: total", "LM only: lm", "LM only: total"} <= labels and "LM only: kd" not in labels
    # constant weights: no weights panel; every panel has its axes labelled and a legend for what it draws
    assert [ax.get_title() for ax in fig.axes] == [
        "loss terms (raw)",
        "validation perplexity",
        "validation KL(teacher‖student)",
    ]
    assert all(ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() for ax in fig.axes)
    teacher_ppl = [r["teacher_ppl"] for r in records if r["kind"] == "eval" and r["split"] == "validation"][-1]
    assert "teacher" in [line.get_label() for line in fig.axes[1].lines]
    assert [line.get_ydata()[0] for line in fig.axes[1].lines if line.get_label() == "teacher"] == [teacher_ppl]
    router = plots.plot_router(records)
    (image,) = router.axes[0].images
    last = [r for r in records if r.get("router")][-1]["router"]
    assert image.get_array().shape == (2, len(last[0]["utilisation"]))  # the tiny student's two layers x experts
    assert image.get_array().tolist() == [layer["utilisation"] for layer in last]
    assert len(router.axes[1].lines) == 2 + 1  # each layer's entropy, and log E
    with pytest.raises(kdlab.KDLabError, match="no metrics file"):
        plots.load_metrics(tmp_path / "nowhere")


def test_import_kdlab_imports_no_widgets_or_matplotlib():
    code = "import sys, kdlab; print(sorted(m for m in ('ipywidgets', 'matplotlib', 'IPython') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
