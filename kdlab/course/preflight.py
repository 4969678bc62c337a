"""`kdlab preflight`: a participant's check before a workshop, in three parts.

1. **Set-up.** Python and torch versions, the packages the course imports, the prepared corpus and the
   converted teacher (checked against data/MANIFEST.json with `kdlab.manifest.verify`, the function
   `kdlab prepare` verifies with), CUDA. One line per check: `ok ...` or `missing ...: <what to do>`.
2. **Step time.** One training step of the course's default run at each profile's sizes this machine
   can afford (ci and cpu; gpu too with CUDA): the trainer is built once per size from
   `kdlab.course.profile(name).config("preflight/<name>", ...)` into a temporary folder, one warm-up
   `trainer.step()`, then the mean of two more.
3. **Expected notebook times.** notebooks/timings.json holds each notebook's time per profile measured
   on one named reference machine, and that machine's step time at each profile's sizes. Here:
   expected = measured notebook time x (this machine's step time / the reference machine's).
   The `reference` profile replays committed runs instead of training, so its time is not scaled.

Exit code 0 when every check passes, 1 when one fails (each failure is one line).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from kdlab.errors import KDLabError

# pyproject.toml's requires-python and its torch requirement (tests/test_preflight.py keeps them in step)
MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 6)
# what the notebooks import beyond kdlab's own dependencies: (module, distribution)
COURSE_PACKAGES = [
    ("ipywidgets", "ipywidgets"),
    ("matplotlib", "matplotlib"),
    ("jupyterlab", "jupyterlab"),
    ("nbval", "nbval"),
]
TRAINING_PROFILES = ("ci", "cpu", "gpu")  # the profiles that train (not `reference`, which replays)
REPLAY_PROFILES = ("reference",)  # timed as measured: their time does not depend on the step time
CORPUS_ENV = "KDLAB_CORPUS"  # = kdlab.course.CORPUS_VAR; not imported from there: kdlab.course imports torch
SETUP_HINT = "run `make setup`"

Check = tuple[bool, str]  # (passed, the line's text after "ok"/"missing")


# --------------------------------------------------------------------------------------------
# 1. set-up checks: each returns (passed, text); the text of a failure says what to do
# --------------------------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_python(version_info=sys.version_info) -> Check:
    v = ".".join(str(x) for x in version_info[:3])
    need = ".".join(map(str, MIN_PYTHON))
    if tuple(version_info[:2]) >= MIN_PYTHON:
        return True, f"python {v} (>= {need})"
    return (
        False,
        f"python {v}: the course needs Python >= {need}; create the environment with a newer one "
        f"(PYTHON=python3.11 make setup)",
    )


def check_torch() -> Check:
    need = ".".join(map(str, MIN_TORCH))
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is a set-up problem
        return False, f"torch: not importable ({type(e).__name__}); {SETUP_HINT} (it installs torch==2.13.0)"
    if _version_tuple(torch.__version__) < MIN_TORCH:
        return False, f"torch {torch.__version__}: the course needs torch >= {need}; pip install 'torch>={need}'"
    return True, f"torch {torch.__version__} (>= {need})"


def check_package(module: str, dist: str | None = None, importer: Callable = importlib.import_module) -> Check:
    try:
        importer(module)
    except Exception as e:  # noqa: BLE001
        return False, (
            f'{module}: not importable ({type(e).__name__}); {SETUP_HINT} (or pip install -e ".[dev,notebooks]")'
        )
    try:
        version = importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return True, f"{module} {version}"


def check_corpus(data_dir: str | Path) -> Check:
    """The Austen splits against data/MANIFEST.json, or the participant's own corpus ($KDLAB_CORPUS)."""
    from kdlab.manifest import load_manifest, verify

    own = os.environ.get(CORPUS_ENV, "").strip()
    if own:
        missing = [p for p in own.split(",") if not Path(p).expanduser().exists()]
        if missing:
            return (
                False,
                f"corpus: {CORPUS_ENV}={own!r} but {missing[0]!r} does not exist; give a text file or a "
                f"folder of .txt files, or unset {CORPUS_ENV} for the Austen corpus",
            )
        return True, f"corpus: {CORPUS_ENV}={own} (your own text; the Austen corpus is not needed)"
    folder = Path(data_dir) / "austen"
    try:
        splits = load_manifest()["austen"]["splits"]
        for name, sha in splits.items():
            path = folder / name
            if not path.is_file():
                return (
                    False,
                    f"corpus: {path} is missing; {SETUP_HINT} (or `kdlab prepare`), or set "
                    f"{CORPUS_ENV}=<a text file or folder> to use your own text",
                )
            verify(path, sha, f"the Austen split {name}")
    except KDLabError as e:
        return False, f"corpus: {e}"
    return True, f"corpus: {folder} ({', '.join(splits)}) matches data/MANIFEST.json"


def check_teacher(data_dir: str | Path) -> Check:
    """The converted teacher: made from the GGUF file data/MANIFEST.json names, weights as converted."""
    from kdlab.manifest import load_manifest, verify
    from kdlab.models import BUILTIN_TEACHERS

    folder = Path(data_dir) / BUILTIN_TEACHERS["smollm2-135m"]
    stamp = folder / "kdlab-conversion.json"
    fix = f"{SETUP_HINT} (or `kdlab prepare`)"
    if not stamp.is_file() or not (folder / "model.safetensors").is_file():
        return False, f"teacher: {folder} is not converted yet; {fix}"
    try:
        gguf = load_manifest()["teacher"]["gguf"]["file"]
        record = json.loads(stamp.read_text())
        if record.get("source") != gguf:
            return False, (
                f"teacher: {folder} was converted from {record.get('source')!r}, but data/MANIFEST.json "
                f"names {gguf!r}; delete {folder} and {fix}"
            )
        verify(folder / "model.safetensors", record["model.safetensors"], "the converted teacher's weights")
    except KDLabError as e:
        return False, f"teacher: {e}"
    except (KeyError, ValueError) as e:
        return False, f"teacher: {stamp} is unreadable ({type(e).__name__}); delete {folder} and {fix}"
    return True, f"teacher: {folder} converted from {gguf}, weights verified"


def check_cuda() -> Check:
    """Informational: a CPU machine passes (the course then picks the cpu profile)."""
    import torch

    if torch.cuda.is_available():
        return True, f"CUDA: {torch.cuda.get_device_name(0)} (the course picks the gpu profile)"
    return True, "CUDA: none (fine: the course picks the cpu profile; KDLAB_PROFILE=ci for ~2-minute notebooks)"


def setup_checks(data_dir: str | Path) -> dict[str, Check]:
    """Every set-up check by name, in the order they are printed."""
    checks = {"python": check_python(), "torch": check_torch()}
    checks |= {m: check_package(m, d) for m, d in COURSE_PACKAGES}
    checks |= {"corpus": check_corpus(data_dir), "teacher": check_teacher(data_dir)}
    if checks["torch"][0]:
        checks["cuda"] = check_cuda()
    return checks


def format_check(check: Check) -> str:
    ok, text = check
    return f"  {'ok' if ok else 'missing':8} {text}"


# --------------------------------------------------------------------------------------------
# 2. one training step per profile size
# --------------------------------------------------------------------------------------------


def affordable_profiles(cuda: bool | None = None) -> list[str]:
    """ci and cpu everywhere; gpu only where CUDA is available."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return [p for p in TRAINING_PROFILES if p != "gpu" or cuda]


def time_step(name: str, timed_steps: int = 2) -> float:
    """Seconds per training step of the course's default run at profile `name`'s sizes."""
    import torch

    from kdlab.build import build_trainer
    from kdlab.course.profiles import profile

    with tempfile.TemporaryDirectory(prefix=f"kdlab-preflight-{name}-") as out:
        cfg = profile(name).config(
            f"preflight/{name}",
            max_steps=timed_steps + 1,
            eval_every=0,
            checkpoints=False,
            early_stopping=False,
            out_dir=out,
        )
        trainer = build_trainer(cfg)
        cuda = trainer.precision.device.type == "cuda"
        trainer.step()  # warm-up: allocator, kernels, first batches
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(timed_steps):
            trainer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / timed_steps
        del trainer
    return seconds


# --------------------------------------------------------------------------------------------
# 3. the committed timing table, scaled to this machine
# --------------------------------------------------------------------------------------------


def timings_path() -> Path:
    from kdlab.course.references import repo_root

    return repo_root() / "notebooks" / "timings.json"


def load_timings(path: str | Path) -> dict:
    """notebooks/timings.json, checked for the fields the arithmetic needs (KDLabError if unusable)."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise KDLabError(
            f"{path} is missing; it is part of the repository (git checkout notebooks/timings.json)"
        ) from None
    except ValueError as e:
        raise KDLabError(f"{path} is not valid JSON ({e})") from None
    for key in ("machine", "step_seconds", "notebooks"):
        if key not in table:
            raise KDLabError(f"{path} has no {key!r} field; see the schema in kdlab/course/preflight.py")
    return table


def expected_seconds(table: dict, local_step: dict[str, float]) -> dict[str, dict[str, float | str]]:
    """{notebook: {profile: expected seconds here, or why there is none}}.

    expected = the reference machine's notebook time x local_step[profile] / table's step time;
    replay profiles (`reference`) are taken as measured. A null in the table reads "not measured".
    """
    ref_step = table.get("step_seconds") or {}
    out: dict[str, dict[str, float | str]] = {}
    for notebook, times in table["notebooks"].items():
        row: dict[str, float | str] = {}
        for prof, measured in (times or {}).items():
            if measured is None:
                row[prof] = "not measured"
            elif prof in REPLAY_PROFILES:
                row[prof] = float(measured)
            elif prof not in local_step:
                row[prof] = "not timed here"
            elif not ref_step.get(prof):
                row[prof] = "no reference step time"
            else:
                row[prof] = float(measured) * local_step[prof] / float(ref_step[prof])
        out[notebook] = row
    return out


def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_expected(expected: dict[str, dict[str, float | str]], profiles: Iterable[str]) -> list[str]:
    """The expected times as an aligned table, with a total per profile ("+ n?" counts unmeasured notebooks)."""
    profiles = list(profiles)
    rows: list[list[str]] = [["notebook", *profiles]]
    totals = {p: 0.0 for p in profiles}
    unmeasured = {p: 0 for p in profiles}
    for notebook, row in expected.items():
        cells = [notebook]
        for p in profiles:
            value = row.get(p, "not measured")
            if isinstance(value, float):
                totals[p] += value
                cells.append(format_duration(value))
            else:
                unmeasured[p] += 1
                cells.append(value)
        rows.append(cells)
    total = ["total"]
    for p in profiles:
        if unmeasured[p] == len(expected):
            total.append("-")
        else:
            total.append(format_duration(totals[p]) + (f" + {unmeasured[p]} not measured" if unmeasured[p] else ""))
    rows.append(total)
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]))]
    return ["  " + "".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def table_profiles(table: dict) -> list[str]:
    """The profile columns of the table, in the course's order (ci, cpu, gpu, reference, then any other)."""
    seen = {p for times in table["notebooks"].values() for p in (times or {})}
    order = [*TRAINING_PROFILES, *REPLAY_PROFILES]
    return [p for p in order if p in seen] + sorted(seen - set(order))


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def run(
    profiles: list[str] | None = None,
    timings: str | Path | None = None,
    data_dir: str | Path | None = None,
    timing: bool = True,
    out=print,
) -> int:
    """The whole pre-flight check; returns the exit code (0 all passed, 1 a check failed)."""
    from kdlab.course.profiles import PROFILES
    from kdlab.course.references import repo_root

    data_dir = Path(data_dir) if data_dir is not None else repo_root() / "data"
    if timing:  # a bad --profiles is refused before any check runs
        if profiles is None:
            profiles = affordable_profiles()
        unknown = [p for p in profiles if p not in TRAINING_PROFILES or p not in PROFILES]
        if unknown:
            raise KDLabError(f"--profiles {unknown[0]!r}: choose from {', '.join(TRAINING_PROFILES)}")
        if "gpu" in profiles and "gpu" not in affordable_profiles():
            raise KDLabError("--profiles gpu needs a CUDA device (its 16 x 256-token steps are for a GPU)")
    out("kdlab preflight: set-up")
    checks = setup_checks(data_dir)
    for c in checks.values():
        out(format_check(c))
    failed = sum(not ok for ok, _ in checks.values())
    if not timing:
        return 1 if failed else 0

    try:
        table = load_timings(timings or timings_path())
    except KDLabError as e:
        out(format_check((False, f"timings: {e}")))
        table = None
        failed += 1

    out("")
    out("kdlab preflight: one training step of the course's default run (1 warm-up, mean of 2)")
    local: dict[str, float] = {}
    if not all(checks[name][0] for name in ("torch", "corpus", "teacher")):  # what a training step needs
        out("  skipped: fix the set-up lines marked `missing` first")
    else:
        ref_step = (table or {}).get("step_seconds") or {}
        kdlab_log = logging.getLogger("kdlab")
        level = kdlab_log.level
        if kdlab_log.getEffectiveLevel() > logging.DEBUG:
            kdlab_log.setLevel(logging.WARNING)  # the trainer's load and step lines are noise here
        try:
            for name in profiles:
                p = PROFILES[name]
                what = f"{name:4} {p.batch_size} x {p.seq_len} tokens"
                try:
                    local[name] = time_step(name)
                except Exception as e:  # noqa: BLE001 - one line per failed check, not a traceback
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    out(format_check((False, f"{what}: the step failed ({type(e).__name__}: {first})")))
                    failed += 1
                    continue
                ref = ref_step.get(name)
                vs = (
                    f" (reference machine {ref:.2f} s: {local[name] / ref:.2f}x)"
                    if ref
                    else " (reference machine: not measured)"
                )
                out(format_check((True, f"{what}: {local[name]:.2f} s per step{vs}")))
        finally:
            kdlab_log.setLevel(level)

    if table is not None:
        out("")
        out(
            "expected time of each notebook here: the time measured on the reference machine x this machine's "
            "step time / the reference machine's"
        )
        out(
            f"  (reference machine: {table['machine']}"
            + (f", at commit {str(table['measured_at_commit'])[:12]}" if table.get("measured_at_commit") else "")
            + "; `reference` replays recorded runs, so its times are not scaled)"
        )
        for line in format_expected(expected_seconds(table, local), table_profiles(table)):
            out(line)
    out("")
    out(f"preflight: {'all checks passed' if not failed else f'{failed} check(s) failed (lines marked missing)'}")
    return 1 if failed else 0


def cmd_preflight(args) -> int:
    profiles = None
    if args.profiles is not None:
        profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    return run(profiles=profiles, timings=args.timings, data_dir=args.data_dir, timing=not args.no_timing)


def add_command(subparsers) -> None:
    """`kdlab preflight`: registered with the CLI through the entry point "kdlab.commands" (pyproject.toml)."""
    p = subparsers.add_parser(
        "preflight",
        help="a participant's check before the course: set-up, step time, notebook times",
        description="Checks the set-up (Python, torch, the course's packages, the corpus and teacher "
        "against data/MANIFEST.json, CUDA), times one training step of the course's "
        "default run at each profile's sizes, and prints each notebook's expected time "
        "here from notebooks/timings.json. Exit code 0 when every check passes, 1 when "
        "one fails.",
    )
    p.add_argument(
        "--profiles", metavar="LIST", help="comma-separated profiles to time (default: ci,cpu, and gpu with CUDA)"
    )
    p.add_argument("--no-timing", action="store_true", help="set-up checks only (seconds instead of about a minute)")
    p.add_argument("--timings", metavar="FILE", help="the timing table (default: notebooks/timings.json)")
    p.add_argument("--data-dir", metavar="DIR", help="where `kdlab prepare` put the data (default: data/)")
    p.set_defaults(func=cmd_preflight)


__all__ = [
    "COURSE_PACKAGES",
    "TRAINING_PROFILES",
    "affordable_profiles",
    "check_corpus",
    "check_package",
    "check_teacher",
    "expected_seconds",
    "format_expected",
    "load_timings",
    "run",
    "setup_checks",
    "time_step",
]
