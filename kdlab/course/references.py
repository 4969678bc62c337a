"""The committed reference runs (notebooks/reference/, written by scripts/reference_runs.py) and the
records of any run: where the course finds what it compares against."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.errors import KDLabError

REFERENCE_DIR = Path("notebooks") / "reference"  # under the repository root


def repo_root() -> Path:
    """The checkout holding data/MANIFEST.json: the working directory or a parent, else the package's."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "data" / "MANIFEST.json").is_file():
            return folder
    return Path(__file__).resolve().parents[2]  # kdlab/course/__init__.py -> the checkout


def _rel(path: Path) -> str:
    return os.path.relpath(path, Path.cwd())


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run: `path` is a run folder (out_dir) or a metrics.jsonl file."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise KDLabError(f"no metrics file at {str(p)!r}; give a run folder (out_dir) or its metrics.jsonl")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Reference:
    """One committed reference run: its records, the samples of its final student, and how it was made."""

    arm: str
    history: list[dict[str, Any]]
    samples: dict[str, Any]  # {"greedy": [...], "sampled": [...], "distinct_2": ..., "teacher_nll": ...}
    meta: dict[str, Any]  # device, sizes, commit, seconds, settings

    def evals(self, split: str = "validation") -> list[dict[str, Any]]:
        return [r for r in self.history if r["kind"] == "eval" and r["split"] == split]

    @property
    def label(self) -> str:
        m = self.meta
        return f"reference: {m['steps']} steps of {m['batch_size']} x {m['seq_len']}"


def reference(arm: str) -> Reference:
    """The committed reference run `arm` (notebooks/reference/<arm>/; scripts/reference_runs.py)."""
    folder = repo_root() / REFERENCE_DIR / arm
    if not (folder / "meta.json").is_file():
        have = sorted(p.parent.name for p in (repo_root() / REFERENCE_DIR).glob("*/meta.json"))
        raise KDLabError(f"no reference run {arm!r} in {REFERENCE_DIR}; there are: {', '.join(have) or 'none'}")
    samples = folder / "samples.json"
    return Reference(
        arm,
        load_metrics(folder),
        json.loads(samples.read_text()) if samples.is_file() else {},
        json.loads((folder / "meta.json").read_text()),
    )


def reference_before() -> dict[str, Any]:
    """The text samples the reference runs start from (notebooks/reference/_before/samples.json):
    {"prompts": [...], "teacher": {...}, "student": {...}}, each side as a Reference's `samples`."""
    path = repo_root() / REFERENCE_DIR / "_before" / "samples.json"
    if not path.is_file():
        raise KDLabError(f"{path} is missing; python scripts/reference_runs.py writes it")
    return json.loads(path.read_text())


__all__ = ["REFERENCE_DIR", "Reference", "load_metrics", "reference", "reference_before", "repo_root"]
