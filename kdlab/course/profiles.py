"""The course's profiles (ci, cpu, gpu, reference): one knob that scales every notebook's runs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.build import build_trainer
from kdlab.config import KDConfig, load_config
from kdlab.course.references import reference, repo_root
from kdlab.errors import KDLabError
from kdlab.quiet import quiet_libraries
from kdlab.training.best_weights import BestWeights
from kdlab.training.callbacks import ProgressBar, fire
from kdlab.training.state import TrainState

ENV_VAR = "KDLAB_PROFILE"
CORPUS_VAR = "KDLAB_CORPUS"


# The pair every notebook trains, its reference runs and stored outputs were made with: `kdlab train`'s
# default pair (docs/payoff.md), the Austen-corrected teacher and the 15 of its layers that matter most.
# Named here, not inherited, so that a change of kdlab's defaults cannot silently move the course away
# from its committed runs: tests/test_course.py checks that the two agree.
COURSE_PAIR = {"teacher": "smollm2-135m-austen", "student": "large", "student_depth": 0, "student_layers": "importance"}


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
        return (
            f"profile {self.name!r} ({self.reason}): {self.steps} steps of {self.batch_size} x {self.seq_len} "
            f"tokens, evaluation every {self.eval_every} steps on {self.eval_batches} batches"
        )

    def scaled(self, factor: float) -> int:
        """`factor` x the profile's steps, at least 4 (a run needs a few steps to show a trend)."""
        return max(4, round(self.steps * factor))

    def config(self, run: str, **overrides: Any) -> KDConfig:
        """The default run's config at this profile's sizes, writing to runs/course/<run>.

        `overrides` win over the profile, exactly as CLI flags win over a YAML file. No resumable
        checkpoints (the notebooks never resume; each would write ~0.5 GB): the final model and the
        early-stopping best are still written. A notebook run again replaces its own runs.
        """
        root = repo_root()
        steps = overrides.get("max_steps", self.steps)
        values: dict[str, Any] = {
            "data_dir": _rel(root / "data"),
            "out_dir": _rel(root / "runs" / "course" / run),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "max_steps": self.steps,
            "eval_every": self.eval_every,
            "eval_batches": self.eval_batches,
            "log_every": max(1, steps // 20),
            "log_first": 3,  # ~20 points per curve
            "warmup_steps": max(1, steps // 10),
            "checkpoints": False,
            "overwrite": True,  # running a notebook again replaces its runs
            **COURSE_PAIR,
        }
        corpus = os.environ.get(CORPUS_VAR, "").strip()
        if corpus:
            values["data"] = corpus
        values.update(overrides)
        return load_config(overrides=values)

    def noise(self, arm: str):
        """Three committed seeds of `arm` (kdlab.course.verdicts.Arm) at exactly this profile's size: the
        yardstick a live run of that arm is judged against. `ci` runs: notebooks/reference/ci/; `cpu`
        runs and the replayed reference runs: notebooks/reference/. None at `gpu` (not measured)."""
        from kdlab.course.verdicts import Arm

        prefix = {"ci": "ci/", "cpu": "", "reference": ""}.get(self.name)
        return None if prefix is None else Arm.reference(prefix + arm, name=f"{arm}, {self.name} size")

    @property
    def replays(self) -> bool:
        """True for the `reference` profile: `fit` replays committed runs instead of training."""
        return self.name == "reference"

    def fit(self, trainer, arm: str) -> TrainState:
        """`trainer.fit()`; under the reference profile, the reference run `arm` replayed instead.

        The replay feeds the committed records, in order, to the trainer's callbacks (on_train_begin,
        on_log for train records, on_eval for evaluations, on_train_end) and stops where a callback
        asks to stop, as a run would; BestWeights and the progress bar sit it out, since nothing was
        trained. The state returned holds the replayed history; `trainer.student` is still the
        untrained student."""
        if not self.replays:
            return trainer.fit()
        ref, s = reference(arm), trainer.state
        # nothing is trained, so nothing to save or restore, and no progress bar to drive
        callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, (BestWeights, ProgressBar))]
        fire(callbacks, "on_train_begin", trainer)
        for record in ref.history:
            if s.should_stop:
                break
            s.history.append(record)
            if record["kind"] == "train":
                s.step, s.tokens = record["step"], record.get("tokens", s.tokens)
            fire(callbacks, "on_log" if record["kind"] == "train" else "on_eval", trainer, record)
        if not s.should_stop:  # replayed to the end: the run's own totals
            s.tokens = ref.meta.get("tokens", s.tokens)
        s.stop_reason = s.stop_reason or ref.meta.get("stop_reason", "")
        s.skipped_steps = ref.meta.get("skipped_steps", 0)
        fire(callbacks, "on_train_end", trainer)
        return s

    def train(self, cfg: KDConfig, arm: str, callbacks=()) -> TrainState:
        """`kdlab.train(cfg, callbacks)`, or the reference run `arm` replayed (see `fit`)."""
        return self.fit(build_trainer(cfg, callbacks), arm)


PROFILES: dict[str, Profile] = {
    # ~1.5 s per step on a 2-core CPU: each notebook's runs fit in about two minutes. Evaluation on 16
    # blocks (4,080 tokens, what `kdlab train` evaluates on): on 4 blocks one seed's perplexity moved
    # 18% against its twins' while the test split (another 1,020 tokens) ranked it with them
    "ci": Profile("ci", steps=30, batch_size=4, seq_len=64, eval_every=10, eval_batches=16, measure_batches=2),
    # a laptop: 4x the ci run at its block length, the sizes of the committed reference runs, so a
    # participant's main run redraws its reference curve
    "cpu": Profile("cpu", steps=120, batch_size=4, seq_len=64, eval_every=20, eval_batches=16, measure_batches=4),
    # one GPU: the default run's sequence length, long enough for the curriculum's phases to matter
    "gpu": Profile("gpu", steps=1500, batch_size=16, seq_len=256, eval_every=50, eval_batches=16, measure_batches=8),
    # no training: every run is the committed reference run replayed; other cells at `ci` sizes
    "reference": Profile(
        "reference", steps=30, batch_size=4, seq_len=64, eval_every=10, eval_batches=16, measure_batches=2
    ),
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


def describe_machine() -> str:
    """This machine in one line, for recorded timings: "2-core <CPU model>, no GPU, torch 2.13.0+cpu, 2 threads"."""
    import platform

    import torch

    from kdlab.precision import cpu_names

    names = cpu_names()
    cpu = f"{len(names)}-core {names[0]}" if names else platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def quiet() -> None:
    """Notebook set-up: transformers' and datasets' warnings and progress bars off, so stored outputs
    hold only what the lesson prints (kdlab's own warnings still show)."""
    quiet_libraries()


def _rel(path: Path) -> str:
    return os.path.relpath(path, Path.cwd())


__all__ = ["CORPUS_VAR", "COURSE_PAIR", "ENV_VAR", "PROFILES", "Profile", "describe_machine", "profile", "quiet"]
