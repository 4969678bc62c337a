"""Building a run's parts from its config: precision, tokenizer, teacher, data, student.

    precision, tokenizer, teacher, data, student = build_components(cfg)

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
from .models import build_student, count_parameters, load_teacher, load_tokenizer
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


def check_positions(seq_len: int, *models: torch.nn.Module) -> None:
    """A clear error, before any memory is spent, when `seq_len` exceeds a model's positions."""
    limit = min(
        (m.config.max_position_embeddings for m in models if getattr(m.config, "max_position_embeddings", None)),
        default=None,
    )
    if limit is not None and seq_len > limit:
        raise KDLabError(
            f"seq_len={seq_len} is longer than the models' maximum positions ({limit:,}); use seq_len <= {limit}"
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
    data = prepare_data(cfg.data, cfg.data_dir, tokenizer, cfg.seq_len)
    if cfg.train_blocks:
        data["train"] = data["train"].head(cfg.train_blocks)
    student = build_student(cfg.student, teacher, cfg.student_init, cfg.data_dir, precision, len(tokenizer))
    log.info(
        "teacher %s (%.1fM params) -> student %s (%.1fM params, init=%s); %s",
        cfg.teacher,
        count_parameters(teacher) / 1e6,
        cfg.student,
        count_parameters(student) / 1e6,
        cfg.student_init,
        precision.describe(),
    )
    log.info("data %s: %s", cfg.data, ", ".join(f"{s} {d.num_tokens:,} tokens" for s, d in data.items()))
    return precision, tokenizer, teacher, data, student


__all__ = ["build_components", "check_positions", "quiet_hf_progress", "quiet_libraries"]
