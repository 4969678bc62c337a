"""Atomic checkpoints: a run killed at any moment leaves the previous checkpoint loadable.

Layout of `<out_dir>/checkpoints/`:
    step-000050/config.json, model.safetensors   the student (loadable with from_pretrained)
    step-000050/heads.safetensors                 routers and projections of the intermediate terms
    step-000050/trainer_state.pt                  optimizer, scheduler, objective (curriculum, balancer),
                                                  callbacks (by state_key), batch source position,
                                                  the unfinished log interval, RNG, history
    latest                                        name of the newest complete checkpoint
and `<out_dir>/best/` (the same weight files): the best evaluation so far, for restore-best.

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place;
`latest` is replaced the same way (os.replace is atomic on POSIX). So `latest` only ever names a
complete folder, and a crash mid-write leaves only a `.tmp-*` folder that the next save removes.
Weights are safetensors; trainer_state.pt is loaded with `weights_only=True` (no pickled code).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kdlab.errors import KDLabError
from kdlab.training.engine import Engine

STATE_FILE = "trainer_state.pt"
HEADS_FILE = "heads.safetensors"


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _write_weights(
    folder: Path, student: torch.nn.Module, weights: dict[str, torch.Tensor] | None, heads: torch.nn.Module | None
) -> None:
    """The student (from `weights`, its full state dict, when given: under FSDP2 the module holds shards
    only) as a from_pretrained folder, and the heads beside it."""
    from safetensors.torch import save_file

    student.save_pretrained(folder, state_dict=weights, safe_serialization=True)
    if heads is not None and len(heads.state_dict()):
        save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, folder / HEADS_FILE)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    student: torch.nn.Module,
    heads: torch.nn.Module | None,
    state: dict[str, Any],
    keep: int = 2,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` of the run in `out_dir` atomically and keep the newest `keep`. `state`
    is the trainer's `state_dict()`; `weights` the student's full state dict when the module holds
    only shards (FSDP2)."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    _write_weights(tmp, student, weights, heads)
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    final = root / name
    if final.exists():  # the same step saved again (e.g. an interrupt right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    with open(pointer, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.name != name)[: -(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def best_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "best"


def save_best(
    out_dir: str | Path,
    step: int,
    student: torch.nn.Module,
    heads: torch.nn.Module | None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The weights of the best evaluation so far, swapped in whole (tmp folder, then rename)."""
    final = best_dir(out_dir)
    tmp, old = final.with_name(".best.tmp"), final.with_name(".best.old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    _write_weights(tmp, student, weights, heads)
    (tmp / "step").write_text(f"{step}\n")
    _fsync_tree(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path:
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise KDLabError(f"no checkpoint to resume from in {root} (start without --resume)")
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file() or not (path / "model.safetensors").is_file():
        raise KDLabError(f"checkpoint {path} named by {pointer} is incomplete; delete it or start a new out_dir")
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint alone (its config can be checked before any weight loads)."""
    path = Path(path)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KDLabError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise KDLabError(f"checkpoint {path} is corrupt or unreadable: {str(e).splitlines()[0]}") from None


def load_checkpoint(
    path: str | Path,
    student: torch.nn.Module,
    heads: torch.nn.Module | None = None,
    state: bool = True,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Load the student's (and heads') weights from `path` in place and return the trainer state
    (`engine`: how the student is distributed; under FSDP2 each process keeps its shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    engine = engine or Engine()
    device = "cpu" if engine.kind == "fsdp2" else str(next(student.parameters()).device)
    want_heads = heads is not None and len(heads.state_dict()) > 0
    try:
        weights = load_file(path / "model.safetensors", device=device)
        head_weights = load_file(path / HEADS_FILE, device=device) if want_heads else {}
    except FileNotFoundError as e:
        raise KDLabError(
            f"checkpoint {path} is incomplete: {Path(e.filename).name} is missing; it was "
            "written by a run with other settings, or damaged"
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise KDLabError(f"checkpoint {path} is corrupt or unreadable: {str(e).splitlines()[0]}") from None
    if student.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    try:
        missing, unexpected = engine.load_full_state_dict(student, weights, strict=False)
    except RuntimeError as e:  # shapes differ: another student size
        detail = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e).splitlines()[0])
        raise KDLabError(
            f"checkpoint {path} does not fit this student ({detail}); resume with the same student settings"
        ) from None
    missing = [k for k in missing if not (k == "lm_head.weight" and student.config.tie_word_embeddings)]
    if missing or unexpected:
        raise KDLabError(
            f"checkpoint {path} does not fit this student (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "resume with the same student settings"
        )
    if want_heads:
        try:
            heads.load_state_dict(head_weights)
        except RuntimeError as e:
            raise KDLabError(
                f"checkpoint {path}: the heads do not fit these settings ({str(e).splitlines()[0]})"
            ) from None
    return read_trainer_state(path) if state else {}


__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "read_trainer_state",
    "save_best",
    "best_dir",
]
