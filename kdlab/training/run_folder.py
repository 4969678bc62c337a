"""A run's folder (`out_dir`): one run per folder, never two mixed.

    out_dir/config.yaml       the settings, written when the run starts
    out_dir/student.json      the student as built: parameters, depth, the teacher layers it copies
    out_dir/metrics.jsonl     every train and eval record, one JSON object per line
    out_dir/checkpoints/      resumable checkpoints (kdlab.training.checkpoint)
    out_dir/best/             the best evaluation's weights (kdlab.training.best_weights.BestWeights)
    out_dir/final/            the trained student as a plain HF folder (+ tokenizer)

A fresh run into a folder that holds anything is refused (continue it with `resume`, or replace it
with `overwrite`): a second run would otherwise replace the first's final/ and metrics.jsonl and
leave its checkpoints beside the new run's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from kdlab.config import KDConfig, save_config
from kdlab.errors import KDLabError
from kdlab.models import count_parameters
from kdlab.training.engine import Engine


def open_run_folder(
    cfg: KDConfig, engine: Engine, resume: Callable[[], None], history: Callable[[], list[dict]]
) -> Path:
    """Check and prepare `cfg.out_dir`, call `resume()` when resuming, and (re)write metrics.jsonl
    from `history()`: a resumed run drops the records written after its checkpoint. Returns the
    metrics file."""
    out = Path(cfg.out_dir)
    used = not cfg.resume and out.is_dir() and any(out.iterdir())
    if used and not cfg.overwrite:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise KDLabError(
            f"out_dir={str(out)!r} already holds a run ({held}); continue it with --resume, "
            f"replace it with --overwrite, or choose another --out-dir"
        )
    # every process has looked before rank 0 deletes or writes (else a slower one would find rank 0's
    # config.yaml and refuse the run's own folder)
    engine.barrier()
    if used and engine.is_main:
        shutil.rmtree(out)
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    engine.barrier()
    if cfg.resume:
        resume()
    metrics = out / "metrics.jsonl"
    if engine.is_main:
        tmp = out / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history()))
        os.replace(tmp, metrics)
    return metrics


def save_student_record(out_dir: str | Path, student: torch.nn.Module, engine: Engine) -> None:
    """out_dir/student.json: the student's size and, if it was cut from the teacher, which layers
    it kept and why (their scores), as kdlab.models recorded them in its config."""
    if not engine.is_main:
        return
    c = student.config
    record = {
        "parameters": count_parameters(student),
        "layers": c.num_hidden_layers,
        "teacher_layers": getattr(c, "kdlab_teacher_layers", None),
        "layer_choice": getattr(c, "kdlab_layer_choice", None),
        "layer_scores": getattr(c, "kdlab_layer_scores", None),
    }
    (Path(out_dir) / "student.json").write_text(json.dumps(record, indent=1) + "\n")


def save_final(out_dir: str | Path, student: torch.nn.Module, tokenizer, engine: Engine) -> Path:
    """The trained student (+ tokenizer) as a plain HF folder, out_dir/final, swapped in whole.
    Every process calls it (under FSDP2 the weights are gathered from all of them)."""
    final, tmp = Path(out_dir) / "final", Path(out_dir) / ".final.tmp"
    weights = engine.full_state_dict(student)
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    engine.barrier()
    return final


__all__ = ["open_run_folder", "save_final", "save_student_record"]
