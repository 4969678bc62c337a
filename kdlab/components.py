"""Building a run's parts from its config: precision, tokenizer, teacher, data, student, and the
trainer's default batch source and objective.

    precision, tokenizer, teacher, data, student = build_components(cfg)
    batches = batches_for_run(cfg, data["train"], tokenizer, student, teacher, precision, dist)
    objective = objective_for_run(cfg, student, teacher, total_steps)

Shared by `kdlab train`, `kdlab eval`, `kdlab cache-teacher`, the benchmark and the course, so
all of them see the same models and data for the same config.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import torch

from .config import KDConfig
from .data import prepare_data
from .distributed import init_from_env
from .errors import KDLabError
from .models import STUDENT_PRESETS, build_student, count_parameters, load_teacher, load_tokenizer
from .precision import resolve_precision

log = logging.getLogger("kdlab")


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers' own progress bars (weight loading, every checkpoint's save) off for a while:
    in a notebook each is a widget, and a run saves many times."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def quiet_libraries() -> None:
    """transformers' and datasets' warnings and progress bars off for good (the CLI and the course):
    their chatter (weight-loading bars, hub notices) hides kdlab's own lines."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def check_positions(seq_len: int, *models: torch.nn.Module, name: str = "seq_len") -> None:
    """A clear error, before any memory is spent, when `seq_len` (the setting `name`) exceeds a model's positions."""
    limit = min(
        (m.config.max_position_embeddings for m in models if getattr(m.config, "max_position_embeddings", None)),
        default=None,
    )
    if limit is not None and seq_len > limit:
        raise KDLabError(
            f"{name}={seq_len} is longer than the models' maximum positions ({limit:,}); use {name} <= {limit}"
        )


def build_components(cfg: KDConfig):
    """(precision, tokenizer, teacher, data, student) as `cfg` describes them."""
    precision = resolve_precision(cfg.device, cfg.teacher_dtype, cfg.autocast_dtype)
    info = init_from_env(precision.device.type)
    if info.enabled and precision.device.type == "cuda":
        precision = replace(precision, device=torch.device("cuda", info.local_rank))
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher, cfg.data_dir)
    teacher = load_teacher(cfg.teacher, cfg.data_dir, precision)
    check_positions(cfg.seq_len, teacher)  # before the data is packed at that length
    vocab = teacher.config.vocab_size
    if cfg.kd_top_k > vocab:
        raise KDLabError(
            f"kd_top_k={cfg.kd_top_k} is larger than the teacher's vocabulary ({vocab:,}); use 1 to {vocab}, "
            f"or 0 for the full vocabulary"
        )
    data = prepare_data(cfg.data, cfg.data_dir, tokenizer, cfg.seq_len)
    if cfg.train_blocks:
        data["train"] = data["train"].head(cfg.train_blocks)
    calibration = [data["train"].batch(list(range(min(cfg.calib_blocks, len(data["train"])))))]
    student = build_student(
        cfg.student,
        teacher,
        cfg.student_init,
        cfg.data_dir,
        precision,
        len(tokenizer),
        depth=cfg.student_depth,
        layers=cfg.student_layers,
        calibration=calibration,
    )
    log.info(
        "teacher %s (%.1fM params) -> student %s (%.1fM params, %s); %s",
        cfg.teacher,
        count_parameters(teacher) / 1e6,
        cfg.student,
        count_parameters(student) / 1e6,
        describe_init(cfg, student),
        precision.describe(),
    )
    log.info("data %s: %s", cfg.data, ", ".join(f"{s} {d.num_tokens:,} tokens" for s, d in data.items()))
    return precision, tokenizer, teacher, data, student


def describe_init(cfg: KDConfig, student) -> str:
    """How the student started, as the log says it: its teacher layers, random, or loaded from a folder."""
    if cfg.student not in STUDENT_PRESETS:
        return f"loaded from {cfg.student}"
    if cfg.student_init == "random":
        return f"{student.config.num_hidden_layers} layers, random init"
    layers = getattr(student.config, "kdlab_teacher_layers", [])
    return f"teacher layers {','.join(map(str, layers))} ({student.config.kdlab_layer_choice})"


def batches_for_run(cfg: KDConfig, split, tokenizer, student, teacher, precision, dist):
    """The batch source `cfg` trains on: the packed corpus blocks (kdlab.batches.PackedBatches), and
    with on_policy > 0 those blocks cut to prompts and continued (kdlab.on_policy.GeneratedBatches)."""
    from .batches import PackedBatches

    corpus = PackedBatches.for_run(cfg, split, tokenizer, student, teacher, dist)
    if cfg.on_policy == 0:
        return corpus
    from .on_policy import GeneratedBatches

    return GeneratedBatches.for_run(cfg, corpus, tokenizer, student, teacher, precision)


def objective_for_run(cfg: KDConfig, student, teacher, total_steps: int):
    """The objective of `cfg`: kdlab.objective.Objective, or its on-policy override (on_policy > 0)."""
    from .objective import Objective

    if cfg.on_policy == 0:
        return Objective(cfg, student, teacher, total_steps)
    from .on_policy import OnPolicyObjective

    return OnPolicyObjective(cfg, student, teacher, total_steps)


__all__ = [
    "build_components",
    "batches_for_run",
    "objective_for_run",
    "check_positions",
    "quiet_hf_progress",
    "quiet_libraries",
]
