"""The course's knob (kdlab.course) and the notebooks' hygiene: what nbval does not check.

nbval (collected from notebooks/ by `make test`) executes every notebook and fails on errors; these
tests check what a reader sees in the stored files: every lesson in place, states its question and
time, ends with exercises whose solutions exist, and stored outputs that came from a run (execution
counts kept, so nbval can compare the NBVAL_CHECK_OUTPUT cells), stay small and hold no machine paths.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import kdlab
import kdlab.course
from kdlab.course import PROFILES, profile

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
LESSONS = [
    "00_quickstart",
    "01_concepts",
    "02_dtype_mismatch",
    "03_loss_normalization",
    "04_curriculum",
    "05_logging",
    "06_early_stopping",
    "07_capstone",
    "08_on_policy",
    "09_cross_tokenizer",
]
MACHINE_PATHS = re.compile(r"(/work/|/tmp/|/home/|/root/|/Users/|\.venv/|site-packages)")


def test_profile_from_env(monkeypatch):
    monkeypatch.setenv("KDLAB_PROFILE", "ci")
    p = profile()
    assert p.name == "ci" and p.steps == PROFILES["ci"].steps and "KDLAB_PROFILE" in p.reason


def test_profile_auto_picks_cpu_without_cuda(monkeypatch):
    import torch

    monkeypatch.delenv("KDLAB_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert profile().name == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert profile().name == "gpu"


def test_unknown_profile_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("KDLAB_PROFILE", "huge")
    with pytest.raises(kdlab.KDLabError, match=r"KDLAB_PROFILE='huge' is not a profile; choose one of ci, cpu, gpu"):
        profile()


def test_profile_config_paths_are_relative_and_overrides_win(monkeypatch):
    monkeypatch.chdir(NOTEBOOKS)  # where a notebook's kernel runs
    p = profile("ci")
    cfg = p.config("xx/arm", max_steps=7, alpha_kd=1.0)
    assert cfg.data_dir == os.path.join("..", "data")
    assert cfg.out_dir == os.path.join("..", "runs", "course", "xx", "arm")
    assert (cfg.max_steps, cfg.alpha_kd, cfg.batch_size, cfg.seq_len) == (7, 1.0, p.batch_size, p.seq_len)
    assert cfg.log_every == 1  # ~20 points per curve: max(1, 7 // 20)
    with pytest.raises(kdlab.KDLabError, match="unknown config key"):
        p.config("xx", not_a_field=1)


def test_profiles_keep_the_same_code_path():
    # only sizes differ between profiles: the same pair, data and losses
    fields = {f for p in PROFILES.values() for f in p.config("x").to_dict()}
    differing = {f for f in fields if len({repr(getattr(p.config("x"), f)) for p in PROFILES.values()}) > 1}
    assert differing <= {
        "batch_size",
        "seq_len",
        "max_steps",
        "eval_every",
        "eval_batches",
        "log_every",
        "warmup_steps",
    }


def _cells(name):
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]


@pytest.mark.parametrize("name", LESSONS)
def test_lesson_structure(name):
    cells = _cells(name)
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert text.startswith(f"# {name[:2]} · "), "title: '# NN · ...'"
    for needed in ("**Question.**", "**Time.**", "## Exercises", f"solutions/{name}.md"):
        assert needed in text, f"{name} lacks {needed!r}"
    assert (NOTEBOOKS / "solutions" / f"{name}.md").is_file()
    setup = next(c for c in cells if c["cell_type"] == "code")
    src = "".join(setup["source"])
    assert "kdlab.course.profile()" in src and "NBVAL_IGNORE_OUTPUT" in src, "first code cell: the profile"


@pytest.mark.parametrize("name", LESSONS)
def test_stored_outputs_are_from_a_run_small_and_clean(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    # figures at >= 100 dpi (a live plot with router panels is ~170 kB): at most 1 MB a notebook
    assert path.stat().st_size < 1_000_000, f"{name}: {path.stat().st_size:,} bytes stored"
    code = [c for c in _cells(name) if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert all(isinstance(n, int) for n in counts), "every code cell executed (nbval needs the counts)"
    assert counts == sorted(counts), "executed top to bottom"
    for c in code:
        for o in c["outputs"]:
            assert o["output_type"] != "error", f"{name}: a stored error output"
            blob = json.dumps({k: v for k, v in o.items() if k != "data"}) + json.dumps(
                {k: v for k, v in o.get("data", {}).items() if not k.startswith("image/")}
            )
            assert not MACHINE_PATHS.search(blob), f"{name}: machine path in {MACHINE_PATHS.search(blob)[0]!r}"
    checked = [c for c in code if "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    assert checked and all(c["outputs"] for c in checked), "deterministic cells are checked, with outputs"


# ---------------------------------------------------------------------------- what a reader sees
STALE = re.compile(r"(VBox\(children|HBox\(children|IntProgress\(|FloatProgress\(|\|\s*0/\d+ \[|: +0%\|)")
LEVEL = re.compile(r"(🐢|🐕|🦁) \*?(easy|medium|hard) · \d+ min")


def _outputs_text(cells) -> str:
    parts = []
    for c in cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"]))
            for k, v in o.get("data", {}).items():
                if not k.startswith("image/"):
                    parts.append(v if isinstance(v, str) else "".join(v) if isinstance(v, list) else json.dumps(v))
    return "\n".join(parts)


@pytest.mark.parametrize("name", LESSONS)
def test_no_stale_progress_bars_or_widget_fallbacks(name):
    hit = STALE.search(_outputs_text(_cells(name)))
    assert not hit, f"{name}: stored output holds {hit[0]!r} (a progress bar or a widget's text fallback)"


@pytest.mark.parametrize("name", LESSONS)
def test_every_lesson_ends_with_a_verdict_table_and_levelled_exercises(name):
    cells = _cells(name)
    assert "| claim | measured | noise (runs, step) | holds |" in _outputs_text(cells) + "\n".join(
        "".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
    ), f"{name}: no verdict table"
    exercises = "\n".join(
        "".join(c["source"]) for c in cells if c["cell_type"] == "markdown" and "## Exercises" in "".join(c["source"])
    )
    items = re.findall(r"^\d+\. .*", exercises.split("## Exercises", 1)[1], flags=re.M)
    assert items and all(LEVEL.search(i) for i in items), f"{name}: every exercise needs a level and minutes"


@pytest.mark.parametrize("name", LESSONS)
def test_time_line_names_the_profiles_and_the_machine(name):
    text = "\n".join("".join(c["source"]) for c in _cells(name) if c["cell_type"] == "markdown")
    line = text.split("**Time.**", 1)[1].split("\n\n", 1)[0]
    assert "`ci`" in line and "2-core" in line and re.search(r"\d+ s", line), f"{name}: Time line {line!r}"


@pytest.mark.parametrize("name", LESSONS)
def test_figures_are_stored_at_100_dpi_or_more(name):
    import base64
    import struct

    for c in _cells(name):
        for o in c.get("outputs", []):
            png = o.get("data", {}).get("image/png")
            if not png:
                continue
            raw = base64.b64decode(png if isinstance(png, str) else "".join(png))
            width = struct.unpack(">I", raw[16:20])[0]
            assert width >= 400, f"{name}: a {width}-pixel-wide figure"
            # wider than 1,400 px, JupyterLab shrinks a figure until its labels are unreadable
            assert width <= 1400, f"{name}: a {width}-pixel-wide figure (at most 1,400)"
            if b"pHYs" in raw:
                i = raw.index(b"pHYs") + 4
                ppm = struct.unpack(">I", raw[i : i + 4])[0]
                assert ppm * 0.0254 >= 99.5, f"{name}: a figure at {ppm * 0.0254:.0f} dpi"


@pytest.mark.parametrize("name", ["00_quickstart", "07_capstone", "08_on_policy"])
def test_quickstart_and_capstone_show_generated_text(name):
    text = _outputs_text(_cells(name))
    assert text.count("prompt: ") >= 4 and "distinct-2" in text and "teacher NLL" in text


def test_reference_runs_name_their_device_sizes_and_commit():
    ref = NOTEBOOKS / "reference"
    arms = sorted(p for p in ref.iterdir() if (p / "meta.json").is_file())
    assert arms, "no reference runs committed"
    total = sum(f.stat().st_size for f in ref.rglob("*") if f.is_file())
    assert total <= 2_000_000, f"reference runs hold {total:,} bytes (at most 2 MB)"
    for arm in arms:
        meta = json.loads((arm / "meta.json").read_text())
        for key in ("device", "commit", "steps", "batch_size", "seq_len", "seconds", "date", "overrides"):
            assert meta.get(key) not in (None, ""), f"{arm.name}: meta.json lacks {key}"
        r = kdlab.course.reference(arm.name)
        assert r.history and r.evals() and r.samples["greedy"], arm.name
        assert r.history[-1]["step"] <= meta["steps"] or r.history[-1]["kind"] == "eval"


@pytest.mark.parametrize("size", ["ci", "cpu"])
def test_noise_comes_from_three_seeds_of_exactly_the_compared_size(size):
    """Every verdict's yardstick: the committed seeds of the default and LM-only arms, made at exactly the
    sizes of the profile whose live runs they judge (steps, batch, block, evaluation), the pair included."""
    from kdlab.course.verdicts import compare

    P, cfg = profile(size), profile(size).config("hygiene")
    for arm in ("default", "lm-only"):
        noise = P.noise(arm)
        assert noise.seeds == 3, f"{arm} at {size}: {noise.describe()}"
        for label, _ in noise.runs:
            meta = json.loads((NOTEBOOKS / "reference" / label / "meta.json").read_text())
            sizes = {k: meta["config"][k] for k in ("max_steps", "batch_size", "seq_len", "eval_every", "eval_batches")}
            assert sizes == {
                "max_steps": P.steps,
                "batch_size": P.batch_size,
                "seq_len": P.seq_len,
                "eval_every": P.eval_every,
                "eval_batches": P.eval_batches,
            }, f"{label} is not a run of the {size} profile's size"
            for key in ("teacher", "student", "student_layers", "student_depth", "lr", "temperature"):
                assert meta["config"][key] == getattr(cfg, key), f"{label}: {key} is not the course's"
        assert noise.steps()[-1] == P.steps
    # and a yardstick of another size is refused at the step compared
    other = profile("cpu" if size == "ci" else "ci").noise("default")
    with pytest.raises(kdlab.KDLabError, match="not a run of the compared size"):
        compare(P.noise("default"), P.noise("lm-only"), noise=[other])


def test_the_course_trains_kdlabs_default_pair():
    """The course's pinned pair is `kdlab train`'s default: a change of defaults must rebuild the course."""
    cfg = kdlab.load_config()
    for key, value in kdlab.course.COURSE_PAIR.items():
        assert getattr(cfg, key) == value, f"COURSE_PAIR[{key!r}] = {value!r}, kdlab's default is {getattr(cfg, key)!r}"


def test_the_instructors_words_table_counts_the_notebooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    run_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebooks)
    assert run_notebooks.words_table() in (NOTEBOOKS / "INSTRUCTOR.md").read_text(), (
        "INSTRUCTOR.md's words table is stale: python scripts/run_notebooks.py --time-lines"
    )


def test_every_reference_arm_a_notebook_names_exists():
    named = set()
    for nb in NOTEBOOKS.glob("*.ipynb"):
        for c in json.loads(nb.read_text())["cells"]:
            src = "".join(c["source"])
            named |= set(re.findall(r"""reference\(\s*["']([\w/-]+)["']""", src))
            named |= set(re.findall(r"""arm\s*=\s*["']([\w-]+)["']""", src))
            for table in re.findall(r"REF\s*=\s*\{(.*?)\}", src, flags=re.S):  # {arm label: reference arm}
                named |= set(re.findall(r""":\s*["']([\w-]+)["']""", table))
            # an arm of three seeds: Arm.reference("x") (unless seeds=(0,)) and P.noise("x"), at both sizes
            for arm, seeds in re.findall(r"""Arm\.reference\(\s*["']([\w/-]+)["']([^)]*)""", src):
                if "seeds=(0,)" not in seeds:
                    named |= {f"{arm}-seed1", f"{arm}-seed2"}
            for arm in re.findall(r"""\.noise\(\s*["']([\w-]+)["']""", src):
                named |= {f"{prefix}{arm}{seed}" for prefix in ("", "ci/") for seed in ("", "-seed1", "-seed2")}
    ref = NOTEBOOKS / "reference"
    have = {str(p.parent.relative_to(ref)) for p in ref.rglob("meta.json")}
    assert named and named <= have, f"notebooks name reference arms that are not committed: {sorted(named - have)}"


def test_reference_profile_replays_through_the_callbacks(tiny_overrides, tmp_path, monkeypatch):
    # a reference run made by a real (tiny) training run, then replayed by a fresh trainer
    made = kdlab.train(
        kdlab.load_config(
            overrides={
                **tiny_overrides,
                "eval_every": 1,
                "log_every": 1,
                "es_patience": 1,
                "es_min_delta": 10.0,
                "es_warmup_steps": 0,
            }
        )
    )
    arm = tmp_path / "notebooks" / "reference" / "tiny"
    arm.mkdir(parents=True)
    (arm / "metrics.jsonl").write_text((Path(tiny_overrides["out_dir"]) / "metrics.jsonl").read_text())
    (arm / "samples.json").write_text(json.dumps({"greedy": ["x"]}))
    (arm / "meta.json").write_text(json.dumps({"steps": made.step, "stop_reason": made.stop_reason}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "MANIFEST.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDLAB_PROFILE", "reference")

    class Seen:
        def __init__(self):
            self.events = []

        def on_train_begin(self, trainer):
            self.events.append("begin")

        def on_log(self, trainer, record):
            self.events.append(("log", record["step"]))

        def on_eval(self, trainer, record):
            self.events.append(("eval", record["step"]))

        def on_train_end(self, trainer):
            self.events.append("end")

    P = profile()
    assert P.replays
    seen = Seen()
    over = {
        **tiny_overrides,
        "out_dir": str(tmp_path / "replay"),
        "eval_every": 1,
        "es_patience": 1,
        "es_min_delta": 10.0,
        "es_warmup_steps": 0,
    }
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over), callbacks=[seen])
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    state = P.fit(trainer, "tiny")
    # min_delta 10 makes every check after the first a non-improvement: patience 1 stops at the 2nd check,
    # in the made run and in the replay alike
    assert made.stop_reason.startswith("early stopping") and state.stop_reason.startswith("early stopping")
    assert trainer.callback(kdlab.EarlyStopping).stopped_step == made.step
    assert seen.events[0] == "begin" and seen.events[-1] == "end"
    assert [e for e in seen.events if isinstance(e, tuple) and e[0] == "log"] == [
        ("log", r["step"]) for r in state.history if r["kind"] == "train"
    ]
    assert all(torch_equal(before[k], v) for k, v in trainer.student.state_dict().items()), "nothing trained"
    assert not (tmp_path / "replay" / "best").exists(), "a replay saves no weights"
    with pytest.raises(kdlab.KDLabError, match="no reference run 'nope'.*there are: tiny"):
        kdlab.course.reference("nope")


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_corpus_setting_replaces_the_course_corpus(monkeypatch, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("text")
    monkeypatch.setenv("KDLAB_CORPUS", str(f))
    assert profile("ci").config("x").data == str(f)
    assert profile("ci").config("x", data="austen").data == "austen"  # an explicit override still wins


def test_repo_root_outside_the_checkout_is_the_package_checkout(tmp_path, monkeypatch):
    """A notebook copied out of the repository (the browser test does) still finds data/ and the references."""
    monkeypatch.chdir(tmp_path)
    root = kdlab.course.repo_root()
    assert (root / "data" / "MANIFEST.json").is_file() and (root / "kdlab" / "course").is_dir()


def test_the_runs_start_from_the_committed_before_samples():
    before = kdlab.course.reference_before()
    assert before["prompts"] == kdlab.course.reference("default").samples["prompts"]
    assert {"teacher", "student"} <= before.keys()
