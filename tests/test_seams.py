"""The trainer's seams, used from outside kdlab: a loss term, a batch source and callbacks defined in
this file, with no change to any kdlab file; and the sharp edges of the trainer-seams issue."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import kdlab
import kdlab.build
import kdlab.training.schedule
from kdlab.cli import main
from kdlab.course.widgets import LivePlot


# ---------------------------------------------------------------------------- a term from outside
def logit_l2(ctx: kdlab.TermContext) -> torch.Tensor:
    """Mean squared student logit over the valid positions of this micro-batch (a per-token mean)."""
    return ctx.student.logits.float().square().mean(-1)[ctx.mask].mean()


@pytest.fixture
def outside_term():
    kdlab.register_term(kdlab.Term("logit_l2", logit_l2, reduce="tokens", needs=kdlab.Needs(teacher=False)))
    yield "logit_l2"
    kdlab.unregister_term("logit_l2")


class _InterruptAt(kdlab.Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, out):
        if trainer.state.step == self.step:
            raise KeyboardInterrupt


def test_a_term_registered_outside_kdlab_is_computed_ramped_logged_resumed_and_plotted(
    outside_term, tiny_overrides, tmp_path
):
    over = {
        **tiny_overrides,
        "term_weights": {"logit_l2": 0.01},
        "log_every": 1,
        "ramps": {"logit_l2": {"start": 0.0, "end": 1.0}},
    }
    lp = LivePlot(widgets=False)
    straight = kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "a")}), callbacks=[lp])
    train = [r for r in straight.history if r["kind"] == "train"]
    # computed and logged: its own value, its weight and its weighted value in every record
    assert all(r["logit_l2"] > 0 for r in train)
    # ramped by the curriculum: linear 0 -> 0.01 over the 6 steps (the weight used after step - 1 steps)
    assert [r["weights"]["logit_l2"] for r in train] == pytest.approx([0.01 * (r["step"] - 1) / 6 for r in train])
    for r in train:
        assert r["weighted"].get("logit_l2", 0.0) == pytest.approx(r["weights"]["logit_l2"] * r["logit_l2"], rel=1e-5)
        assert sum(r["weighted"].values()) == pytest.approx(r["loss"], rel=1e-5)  # part of the total
    # the live plot draws it
    assert lp.points()["logit_l2"] == len(train)
    # resumed exactly: interrupted at step 4, resumed, equal to the straight run
    kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "b")}), callbacks=[_InterruptAt(4)])
    resumed = kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "b"), "resume": True}))
    key = lambda h: [v for r in h if r["kind"] == "train" for v in (r["step"], r["loss"], r["logit_l2"])]  # noqa: E731
    assert key(resumed.history) == pytest.approx(key(straight.history), rel=1e-6)
    assert resumed.evals("test")[-1]["kl"] == pytest.approx(straight.evals("test")[-1]["kl"], rel=1e-6)


def test_unknown_or_owned_term_weights_are_refused(outside_term):
    with pytest.raises(kdlab.KDLabError, match=r"term_weights: unknown term 'nope'; registered terms: lm, kd"):
        kdlab.load_config(overrides={"term_weights": {"nope": 1.0}})
    with pytest.raises(kdlab.KDLabError, match=r"'feature' has its own setting, w_feature"):
        kdlab.load_config(overrides={"term_weights": {"feature": 1.0}})
    with pytest.raises(kdlab.KDLabError, match=r"ramps: unknown term 'nope'; choose from lm, kd, .*logit_l2"):
        kdlab.load_config(overrides={"ramps": {"nope": {"start": 0, "end": 1}}})


# ---------------------------------------------------------------------------- a batch source from outside
class FirstBlocks(kdlab.BatchSource):
    """The first blocks of a split, in order, `batch_size` at a time, wrapping around."""

    def __init__(self, split, batch_size):
        self.split, self.batch_size, self.next = split, batch_size, 0
        self.served: list[list[int]] = []

    def next_step(self):
        idx = [(self.next + i) % len(self.split) for i in range(self.batch_size)]
        self.next = (self.next + self.batch_size) % len(self.split)
        self.served.append(idx)
        b = self.split.batch(idx)
        return [{**b, "no_padding": bool(b["attention_mask"].all())}]

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = state["next"]


class Counter(kdlab.Callback):
    """Counts steps; its state_key names it, so two of them keep two counts."""

    def __init__(self, name, every):
        self.name, self.every, self.count = name, every, 0

    @property
    def state_key(self):
        return self.make_state_key(name=self.name)

    def on_step_end(self, trainer, out):
        if trainer.state.step % self.every == 0:
            self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def _trainer(over, callbacks):
    cfg = kdlab.load_config(overrides=over)
    parts = kdlab.build.build_components(cfg)
    return kdlab.build_trainer(cfg, callbacks, parts=parts, batches=FirstBlocks(parts.data["train"], 2))


def test_own_batch_source_and_two_callbacks_of_one_class_resume_independently(tiny_overrides, tmp_path):
    over = {**tiny_overrides, "out_dir": str(tmp_path / "a")}
    a = _trainer(over, [Counter("every step", 1), Counter("every 2", 2)])
    straight = a.fit()
    assert a.batches.served == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert [cb.count for cb in a.callbacks[:2]] == [6, 3]

    over_b = {**tiny_overrides, "out_dir": str(tmp_path / "b")}
    _trainer(over_b, [Counter("every step", 1), Counter("every 2", 2), _InterruptAt(3)]).fit()
    b = _trainer({**over_b, "resume": True}, [Counter("every step", 1), Counter("every 2", 2)])
    resumed = b.fit()
    assert b.batches.served == [[6, 7], [8, 9], [10, 11]]  # the source's position came back
    assert [cb.count for cb in b.callbacks[:2]] == [6, 3]  # each count from its own state
    loss = lambda s: [r["loss"] for r in s.history if r["kind"] == "train"]  # noqa: E731
    assert loss(resumed) == pytest.approx(loss(straight), rel=1e-6)


def test_two_callbacks_with_one_state_key_are_refused(tiny_overrides):
    with pytest.raises(
        kdlab.KDLabError, match=r"two stateful callbacks share the state_key \"Counter\{'name': 'x'\}\""
    ):
        _trainer(tiny_overrides, [Counter("x", 1), Counter("x", 2)])


# ---------------------------------------------------------------------------- the sharp edges
def _tree(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _flags(over):
    return [
        a
        for k, v in over.items()
        if k not in ("data", "ramps", "term_weights")
        for a in (f"--{k.replace('_', '-')}", str(v))
    ]


def test_a_second_run_into_a_used_folder_is_refused_and_touches_nothing(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["-q", "train", *_flags({**tiny_overrides, "max_steps": 8, "save_every": 8})]) == 0
    before = _tree(run)
    capsys.readouterr()
    assert main(["-q", "train", *_flags({**tiny_overrides, "max_steps": 4, "save_every": 4})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert _tree(run) == before  # the first run is intact
    # --overwrite replaces it whole: no checkpoint of the first run is left beside the new one's
    assert main(["-q", "train", *_flags({**tiny_overrides, "max_steps": 4, "save_every": 4}), "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000004"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_seq_len_beyond_the_models_positions_is_one_line(tiny_overrides, capsys):
    limit = 2048  # the tiny teacher's max_position_embeddings (SmolLM2-135M: 8,192)
    assert main(["-q", "train", *_flags({**tiny_overrides, "seq_len": 100_000})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"kdlab: error: seq_len=100000 is longer than the models' maximum positions ({limit:,}); use seq_len <= {limit}"
    ]


def test_eval_of_a_student_with_a_padded_vocabulary(tiny_overrides, tmp_path, capsys):
    """A student whose vocabulary is padded past the teacher's trains, and `kdlab eval` evaluates it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49_216,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "padded")
    over = {**tiny_overrides, "student": str(tmp_path / "padded"), "max_steps": 2}
    assert main(["-q", "train", *_flags(over)]) == 0
    capsys.readouterr()
    final = str(tmp_path / "run" / "final")
    flags = [*_flags({**over, "student": final}), "--split", "validation", "--speed-batches", "1"]
    assert main(["-q", "eval", *flags, "--json", str(tmp_path / "eval.json")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split()[:2] == ["model", "params"] and "val KL" in rows[0] and "test ppl" not in rows[0]
    assert rows[1].startswith("teacher") and rows[2].startswith(final[:24])
    kl = json.loads((tmp_path / "eval.json").read_text())["rows"][1]["val_kl"]
    trained = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-2])  # final validation
    assert trained["split"] == "validation" and kl == pytest.approx(trained["kl"], rel=1e-4)


def test_the_first_step_trains(tiny_overrides):
    """Warmup starts at lr / (warmup + 1), not 0: step 1 moves the weights."""
    cfg = kdlab.load_config(overrides={**tiny_overrides, "warmup_steps": 4, "max_steps": 10})
    trainer = kdlab.build_trainer(cfg)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)
    trainer.train_step(trainer.batches.next_step())
    moved = sum(not torch.equal(a, p) for a, p in zip(before, trainer.student.parameters()))
    assert moved == len(before)
    lrs = [kdlab.training.schedule.lr_factor(s, "cosine", 4, 10) for s in range(10)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and lrs[-1] > 0


def test_evaluate_before_fit_writes_nothing(tiny_overrides, tmp_path):
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=tiny_overrides))
    record = trainer.evaluate("validation")
    assert record["step"] == 0 and record["kl"] > 0
    assert not (tmp_path / "run").exists()
    state = trainer.fit()  # the run's own "before" evaluation measures the same student
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first == state.history[0] and first["kl"] == pytest.approx(record["kl"], rel=1e-6)


def test_callback_lookup_prefers_the_exact_type(tiny_overrides):
    """The config's EarlyStopping, not a subclass riding along (the original framework's stopper)."""
    from kdlab.course.original import OriginalTotalEarlyStopping

    watch = OriginalTotalEarlyStopping(patience=10, stop=False)
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=tiny_overrides), callbacks=[watch])
    es = trainer.callback(kdlab.EarlyStopping)
    assert type(es) is kdlab.EarlyStopping and es.monitor == "val_kl"
    assert trainer.callback(OriginalTotalEarlyStopping) is watch
    assert trainer.callback(kdlab.ProgressBar) is not None and trainer.callback(LivePlot) is None


class _StopAt(kdlab.Callback):
    def __init__(self, step: int):
        self.at = step

    def on_step_end(self, trainer, out) -> None:
        if trainer.state.step == self.at:
            trainer.state.should_stop, trainer.state.stop_reason = True, f"stopped at {self.at}"


def test_a_run_stopped_between_log_lines_records_its_last_steps(tiny_overrides, tmp_path):
    """A callback that stops mid-interval: the steps since the last line get their record (history and file)."""
    cfg = kdlab.load_config(
        overrides={**tiny_overrides, "out_dir": str(tmp_path / "run"), "max_steps": 20, "log_every": 5, "log_first": 0}
    )
    state = kdlab.build_trainer(cfg, callbacks=[_StopAt(7)]).fit()
    train = [r for r in state.history if r["kind"] == "train"]
    assert [(r["step"], r["steps"]) for r in train] == [(5, 5), (7, 2)] and state.stop_reason == "stopped at 7"
    on_disk = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk if r["kind"] == "train"] == [5, 7]
    assert state.tokens == 7 * cfg.batch_size * (cfg.seq_len - 1)  # every trained token counted (no padding here)
