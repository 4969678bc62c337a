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
LESSONS = ["00_quickstart", "02_dtype_mismatch", "03_loss_normalization", "04_curriculum", "05_logging",
           "06_early_stopping", "07_capstone"]
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
    assert differing <= {"batch_size", "seq_len", "max_steps", "eval_every", "eval_batches", "log_every",
                         "warmup_steps"}


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
    assert path.stat().st_size < 600_000, f"{name}: {path.stat().st_size:,} bytes stored"
    code = [c for c in _cells(name) if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert all(isinstance(n, int) for n in counts), "every code cell executed (nbval needs the counts)"
    assert counts == sorted(counts), "executed top to bottom"
    for c in code:
        for o in c["outputs"]:
            assert o["output_type"] != "error", f"{name}: a stored error output"
            blob = json.dumps({k: v for k, v in o.items() if k != "data"}) + json.dumps(
                {k: v for k, v in o.get("data", {}).items() if not k.startswith("image/")})
            assert not MACHINE_PATHS.search(blob), f"{name}: machine path in {MACHINE_PATHS.search(blob)[0]!r}"
    checked = [c for c in code if "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    assert checked and all(c["outputs"] for c in checked), "deterministic cells are checked, with outputs"
