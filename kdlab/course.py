"""The course's one knob: a profile that scales every notebook's runs, same code path at every size.

    P = kdlab.course.profile()                 # KDLAB_PROFILE=ci|cpu|gpu, else gpu if CUDA, else cpu
    cfg = P.config("04-curriculum/linear", w_feature=0.5, max_steps=P.steps)
    print(P)                                   # what was chosen, and why

`make test` sets KDLAB_PROFILE=ci, so each notebook runs in about two minutes on a 2-core CPU;
`make lab` leaves it unset, so a laptop gets "cpu" (a few minutes per notebook, clearer curves) and
a GPU machine "gpu" (longer runs at the default pair's full sequence length). Every profile trains
the real default pair: the SmolLM2-135M teacher and the 4-layer student initialised from it, on
the Austen corpus. Only sizes change: steps, batch, sequence length, evaluation batches.

Notebooks run with the notebook's folder as working directory, so paths are resolved against the
repository (the folder holding data/MANIFEST.json) and given relative to the working directory:
stored outputs then never hold a machine's absolute paths.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import KDConfig, load_config
from .errors import KDLabError
from .trainer import quiet_libraries

ENV_VAR = "KDLAB_PROFILE"


@dataclass(frozen=True)
class Profile:
    name: str
    steps: int  # optimizer steps of a notebook's main run
    batch_size: int
    seq_len: int
    eval_every: int  # evaluations (and early-stopping checks) every this many steps
    eval_batches: int  # validation batches per evaluation (the same ones every time)
    measure_batches: int  # batches for the loss-magnitude measurements of notebooks 02 and 03
    reason: str = ""  # how the profile was chosen

    def __str__(self) -> str:
        return (f"profile {self.name!r} ({self.reason}): {self.steps} steps of {self.batch_size} x {self.seq_len} "
                f"tokens, evaluation every {self.eval_every} steps on {self.eval_batches} batches")

    def scaled(self, factor: float) -> int:
        """`factor` x the profile's steps, at least 4 (a run needs a few steps to show a trend)."""
        return max(4, round(self.steps * factor))

    def config(self, run: str, **overrides: Any) -> KDConfig:
        """The default run's config at this profile's sizes, writing to runs/course/<run>.

        `overrides` win over the profile, exactly as CLI flags win over a YAML file. No resumable
        checkpoints (the notebooks never resume; each would write ~0.5 GB): the final model and the
        early-stopping best are still written.
        """
        root = repo_root()
        steps = overrides.get("max_steps", self.steps)
        values: dict[str, Any] = {
            "data_dir": _rel(root / "data"), "out_dir": _rel(root / "runs" / "course" / run),
            "batch_size": self.batch_size, "seq_len": self.seq_len, "max_steps": self.steps,
            "eval_every": self.eval_every, "eval_batches": self.eval_batches,
            "log_every": max(1, steps // 20), "log_first": 3,  # ~20 points per curve
            "warmup_steps": max(1, steps // 10), "checkpoints": False,
        }
        values.update(overrides)
        return load_config(overrides=values)


PROFILES: dict[str, Profile] = {
    # ~1.8 s per step on a 2-core CPU: each notebook's runs fit in about two minutes
    "ci": Profile("ci", steps=30, batch_size=4, seq_len=64, eval_every=10, eval_batches=4, measure_batches=2),
    # a laptop: a few minutes per notebook, longer curves
    "cpu": Profile("cpu", steps=120, batch_size=4, seq_len=128, eval_every=10, eval_batches=8, measure_batches=4),
    # one GPU: the default run's sequence length, long enough for the curriculum's phases to matter
    "gpu": Profile("gpu", steps=1500, batch_size=16, seq_len=256, eval_every=50, eval_batches=16, measure_batches=8),
}


def profile(name: str | None = None) -> Profile:
    """The profile named, else $KDLAB_PROFILE, else "gpu" when CUDA is available, else "cpu"."""
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip()
        reason = f"from ${ENV_VAR}"
    else:
        reason = "named"
    if not name:
        import torch

        name = "gpu" if torch.cuda.is_available() else "cpu"
        reason = f"${ENV_VAR} unset, " + ("CUDA available" if name == "gpu" else "no CUDA device")
    if name not in PROFILES:
        raise KDLabError(f"{ENV_VAR}={name!r} is not a profile; choose one of {', '.join(PROFILES)}")
    return dataclasses.replace(PROFILES[name], reason=reason)


def repo_root() -> Path:
    """The checkout holding data/MANIFEST.json: the working directory or a parent, else the package's."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "data" / "MANIFEST.json").is_file():
            return folder
    return Path(__file__).resolve().parent.parent


def _rel(path: Path) -> str:
    return os.path.relpath(path, Path.cwd())


def quiet() -> None:
    """Notebook set-up: transformers' and datasets' warnings and progress bars off, so stored outputs
    hold only what the lesson prints (kdlab's own warnings still show)."""
    quiet_libraries()


__all__ = ["ENV_VAR", "PROFILES", "Profile", "profile", "quiet", "repo_root"]
