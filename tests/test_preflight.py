"""`kdlab preflight` (kdlab/course/preflight.py) and the no-apt-get path of set-up (kdlab/data/corpus.py,
scripts/setup.sh)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kdlab.course.preflight as pf
import kdlab.data.corpus
from kdlab.errors import KDLabError

ROOT = Path(__file__).resolve().parent.parent
TEACHER_DIR = ROOT / "data" / "teacher" / "smollm2-135m"
DEB_NAME = json.loads((ROOT / "data" / "MANIFEST.json").read_text())["austen"]["deb"]["name"]
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


@pytest.fixture(autouse=True)
def _no_own_corpus(monkeypatch):
    monkeypatch.delenv("KDLAB_CORPUS", raising=False)


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "kdlab", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


# ------------------------------------------------------------------ the timing table's arithmetic


def test_expected_times_scale_by_the_step_time_ratio_by_hand():
    table = {
        "machine": "ref",
        "step_seconds": {"ci": 2.0, "cpu": 4.0, "gpu": None},
        "notebooks": {
            "00_quickstart": {"ci": 100, "cpu": 600, "gpu": 90, "reference": 30},
            "01_concepts": {"ci": None, "cpu": None, "gpu": None, "reference": None},
            "02_dtype_mismatch": {"ci": 40, "cpu": None, "gpu": None, "reference": 12},
        },
    }
    # this machine: a ci step takes 3.0 s (1.5x the reference's 2.0 s), a cpu step 2.0 s (0.5x its 4.0 s)
    got = pf.expected_seconds(table, {"ci": 3.0, "cpu": 2.0})
    # 100 x 3.0/2.0 = 150, 600 x 2.0/4.0 = 300; gpu measured there but not timed here; reference not scaled
    assert got["00_quickstart"] == {"ci": 150.0, "cpu": 300.0, "gpu": "not timed here", "reference": 30.0}
    assert got["01_concepts"] == {p: "not measured" for p in ("ci", "cpu", "gpu", "reference")}
    assert got["02_dtype_mismatch"] == {"ci": 60.0, "cpu": "not measured", "gpu": "not measured", "reference": 12.0}
    # a step time measured here but not on the reference machine cannot be scaled
    assert pf.expected_seconds(table, {"gpu": 0.1})["00_quickstart"]["gpu"] == "no reference step time"

    lines = pf.format_expected(got, pf.table_profiles(table))
    assert lines[0].split() == ["notebook", "ci", "cpu", "gpu", "reference"]
    assert re.match(r"\s*00_quickstart\s+2 min 30 s\s+5 min 00 s\s+not timed here\s+30 s$", lines[1])
    assert re.match(
        r"\s*total\s+3 min 30 s \+ 1 not measured\s+5 min 00 s \+ 2 not measured\s+-\s+42 s "
        r"\+ 1 not measured$",
        lines[-1],
    ), lines[-1]


def test_committed_timings_table_has_the_schema():
    table = pf.load_timings(ROOT / "notebooks" / "timings.json")
    assert isinstance(table["machine"], str) and table["machine"]
    assert set(table["notebooks"]) == set(LESSONS)
    for notebook, times in table["notebooks"].items():
        assert {"ci", "cpu", "reference"} <= set(times), notebook
        assert all(v is None or (isinstance(v, (int, float)) and v > 0) for v in times.values()), notebook
    assert {"ci", "cpu"} <= set(table["step_seconds"])
    assert all(v is None or v > 0 for v in table["step_seconds"].values())
    # the arithmetic copes with whatever is null in it
    pf.format_expected(pf.expected_seconds(table, {"ci": 1.0, "cpu": 1.0}), pf.table_profiles(table))


def test_a_broken_timings_table_is_one_line(tmp_path):
    with pytest.raises(KDLabError, match=r"timings.json is missing; it is part of the repository"):
        pf.load_timings(tmp_path / "timings.json")
    (tmp_path / "t.json").write_text('{"machine": "x"}')
    with pytest.raises(KDLabError, match=r"has no 'step_seconds' field"):
        pf.load_timings(tmp_path / "t.json")


def test_version_floors_follow_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'requires-python = ">={pf.MIN_PYTHON[0]}.{pf.MIN_PYTHON[1]}"' in text
    assert f'"torch>={pf.MIN_TORCH[0]}.{pf.MIN_TORCH[1]}"' in text
    assert pf.check_python((3, 9, 1))[0] is False and "Python >= 3.10" in pf.check_python((3, 9, 1))[1]
    assert pf.check_python((3, 12, 0)) == (True, "python 3.12.0 (>= 3.10)")


# ------------------------------------------------------------------ set-up checks: one line each


def test_a_missing_package_is_one_line_saying_what_to_do():
    def broken(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    ok, text = pf.check_package("ipywidgets", importer=broken)
    assert not ok and "\n" not in text
    assert text.startswith("ipywidgets: not importable (ModuleNotFoundError); run `make setup`")
    assert pf.format_check((ok, text)).split()[0] == "missing"
    assert pf.check_package("json")[0]


def test_missing_data_fails_in_one_line_each_and_skips_the_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "COURSE_PACKAGES", [*pf.COURSE_PACKAGES, ("kdlab_no_such_package", None)])
    lines = []
    rc = pf.run(data_dir=tmp_path, timings=ROOT / "notebooks" / "timings.json", out=lines.append)
    assert rc == 1
    missing = [line for line in lines if line.split()[:1] == ["missing"]]
    assert len(missing) == 3, lines
    assert any("kdlab_no_such_package: not importable" in m for m in missing)
    assert any(
        re.search(r"corpus: .*austen.*train\.jsonl is missing; run `make setup`.*KDLAB_CORPUS", m) for m in missing
    )
    assert any(re.search(r"teacher: .*smollm2-135m is not converted yet; run `make setup`", m) for m in missing)
    assert "  skipped: fix the set-up lines marked `missing` first" in lines  # no training without a teacher
    assert any(line.lstrip().startswith("00_quickstart") for line in lines)  # the table still prints
    assert lines[-1] == "preflight: 3 check(s) failed (lines marked missing)"


def test_a_corrupt_split_and_a_wrong_teacher_name_the_manifest(tmp_path):
    austen = tmp_path / "austen"
    austen.mkdir()
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        (austen / name).write_text("{}\n")
    ok, text = pf.check_corpus(tmp_path)
    assert not ok and re.search(r"checksum mismatch for the Austen split train.jsonl .*data/MANIFEST.json", text)
    teacher = tmp_path / "teacher" / "smollm2-135m"
    teacher.mkdir(parents=True)
    (teacher / "model.safetensors").write_bytes(b"x")
    (teacher / "kdlab-conversion.json").write_text(json.dumps({"source": "other.gguf", "model.safetensors": "0"}))
    ok, text = pf.check_teacher(tmp_path)
    assert not ok and "converted from 'other.gguf', but data/MANIFEST.json names" in text


def test_own_corpus_replaces_the_austen_check(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CORPUS", str(tmp_path / "mine.txt"))
    ok, text = pf.check_corpus(tmp_path)
    assert not ok and "does not exist" in text
    (tmp_path / "mine.txt").write_text("Some text.\n")
    assert pf.check_corpus(tmp_path)[0]


@pytest.mark.process
def test_preflight_help_and_bad_profile():
    result = _cli("preflight", "--help")
    assert result.returncode == 0, result.stderr
    assert "--profiles" in result.stdout and "timings.json" in result.stdout
    result = _cli("preflight", "--profiles", "reference", "--data-dir", "no-such-dir")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "kdlab: error: --profiles 'reference': choose from ci, cpu, gpu"


@pytest.mark.process
@pytest.mark.slow
def test_preflight_end_to_end_ci():
    if not (TEACHER_DIR / "kdlab-conversion.json").is_file():
        pytest.skip("data/teacher is missing: run `make setup` first")
    result = _cli("preflight", "--profiles", "ci", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in result.stderr
    step = re.search(r"ok\s+ci\s+4 x 64 tokens: (\d+\.\d+) s per step", out)
    assert step and float(step.group(1)) > 0, out
    assert re.search(r"^\s*00_quickstart\s+\d+ (min \d+ )?s\s", out, re.M), out  # ci: scaled, a duration
    assert out.rstrip().endswith("preflight: all checks passed")


# ------------------------------------------------------------------ no apt-get (macOS, Windows)


def test_no_apt_get_is_one_line_with_the_url_and_kdlab_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(kdlab.data.corpus.shutil, "which", lambda name: None)
    with pytest.raises(KDLabError) as e:
        kdlab.data.corpus._download_austen_deb(tmp_path / "downloads", DEB_NAME)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"https://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/{DEB_NAME}" in msg
    assert f"into {tmp_path / 'downloads'}/" in msg and "KDLAB_CORPUS=<a text file or folder>" in msg
    # a .deb put there by hand is used without apt-get
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / DEB_NAME).write_bytes(b"!<arch>\n")
    assert kdlab.data.corpus._download_austen_deb(tmp_path / "downloads", DEB_NAME) == tmp_path / "downloads" / DEB_NAME


@pytest.mark.process
@pytest.mark.slow
def test_kdlab_prepare_without_apt_get_exits_2_with_one_line(tmp_path):
    if not (TEACHER_DIR / "kdlab-conversion.json").is_file():
        pytest.skip("data/teacher is missing: run `make setup` first")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "smollm2-135m").symlink_to(TEACHER_DIR)
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}  # no apt-get anywhere on it
    result = _cli("-q", "prepare", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(
        "kdlab: error: the Austen corpus comes from Debian's r-cran-janeaustenr package "
        "and apt-get is not available here: download https://deb.debian.org/"
    )
    assert "KDLAB_CORPUS=" in lines[0]


def test_setup_sh_without_apt_get_says_one_line_about_chromium(tmp_path):
    """scripts/setup.sh on a machine without apt-get or chromium, its venv already set up (a stand-in python
    that records what it is asked to run): one line on chromium, and `kdlab prepare`'s exit code 2 passed on."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    fake = venv / "bin" / "python"
    fake.write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\n'
        'if [ "$1 $2" = "-m kdlab" ]; then echo "kdlab: error: (the corpus line)" >&2; exit 2; fi\n'
    )
    fake.chmod(0o755)
    stamp = hashlib.sha256(
        (tmp_path / "pyproject.toml").read_bytes() + (tmp_path / "scripts" / "setup.sh").read_bytes()
    ).hexdigest()[:16]
    (venv / ".kdlab-deps").write_text(stamp + "\n")
    tools = tmp_path / "tools"  # the few commands setup.sh uses, and no apt-get or chromium
    tools.mkdir()
    for tool in ("dirname", "cat", "sha256sum", "cut", "id"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(tools), "VENV": str(venv), "HOME": str(tmp_path)}
    result = subprocess.run(
        ["/bin/bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "setup: no apt-get here, so chromium is not installed; it only matters for the browser test: "
        "install chromium yourself or set KDLAB_SKIP_BROWSER=1",
        "kdlab: error: (the corpus line)",
    ]
    assert calls.read_text().splitlines() == ["-c import torch", "-m kdlab prepare"]
    # with KDLAB_CORPUS the participant's text is prepared instead of the Austen package
    calls.unlink()
    subprocess.run(
        ["/bin/bash", str(tmp_path / "scripts" / "setup.sh")],
        capture_output=True,
        text=True,
        env={**env, "KDLAB_CORPUS": "my text.txt"},
        timeout=60,
    )
    assert calls.read_text().splitlines()[-1] == "-m kdlab prepare --data my text.txt"


def test_the_time_tables_in_the_docs_are_timings_json():
    # README.md, notebooks/README.md and INSTRUCTOR.md show the table that `run_notebooks.py --time-lines` writes
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_notebooks

    want = run_notebooks.time_table(json.loads((ROOT / "notebooks" / "timings.json").read_text()))
    for rel in run_notebooks.TABLE_FILES:
        assert want in (ROOT / rel).read_text(), f"{rel}: its time table is not notebooks/timings.json's"
