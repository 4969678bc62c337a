"""Arms of a grid, each one `kdlab train` run, in parallel one-thread lanes; each finished arm's summary
is added to a JSON file of records at once, so an interrupted grid continues where it stopped.

Shared by scripts/prune_grid.py and scripts/cross_tokenizer_runs.py:

    records = Records(ROOT / "benchmarks" / "x.json")
    run_arms(todo, records, out_root=ROOT / "runs" / "x", name=name, flags=flags_of, summarise=summarise,
             jobs=2, extra=[], done_line=lambda row, s: f"... in {s:.0f} s")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Records:
    """{"arms": {name: row}, "settings": ..., ...} in a JSON file, written atomically."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"arms": {}}

    def save(self, records: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def run_arms(
    todo: list[dict],
    records: Records,
    *,
    out_root: Path,
    name: Callable[[dict], str],
    flags: Callable[[dict], list[str]],
    summarise: Callable[[Path, dict, float], dict],
    jobs: int,
    extra: list[str],
    done_line: Callable[[dict, float], str],
) -> None:
    """Run every arm of `todo` (`kdlab -q train` with `flags(arm)` and `extra`, into out_root/name(arm),
    no checkpoints), `jobs` at a time with one thread each; record `summarise(out_dir, arm, seconds)`."""
    print(f"{len(todo)} arms to run, {jobs} at a time", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def run(a: dict) -> None:
        out = out_root / name(a)
        argv = [*flags(a), f"--out-dir={out}", "--overwrite", "--no-checkpoints", *extra]
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kdlab", "-q", "train", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            print(f"{name(a)} failed ({done.returncode}): {done.stderr.strip()[-500:]}", flush=True)
            return
        row = summarise(out, a, seconds)
        fresh = records.load()  # the other lane may have added its arm since
        fresh["arms"][name(a)] = row
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        fresh["settings"] = {"extra_flags": extra, "threads_per_arm": 1, "jobs": jobs, "commit": commit.stdout.strip()}
        records.save(fresh)
        print(f"{name(a)}: {done_line(row, seconds)}", flush=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run, todo))
    print(f"arms: {time.perf_counter() - t0:.0f} s wall", flush=True)
