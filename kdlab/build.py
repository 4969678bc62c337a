"""A config made into the parts of a run: precision, tokenizer, teacher, data, student, the engine,
the batch source, the objective and the callbacks, handed to the trainer.

    trainer = kdlab.build_trainer(cfg, callbacks=[MyCallback()])   # what `kdlab train` runs
    state = kdlab.train(cfg)                                        # the same, and fit()

    parts = build_components(cfg)                                   # the models and data alone
    trainer = build_trainer(cfg, parts=parts, batches=MySource(...))  # a part of your own instead

This is the one place that reads the config to choose parts (the on-policy objective or the plain
one, DDP or FSDP2, early stopping or none); the trainer takes what it is given and never imports
this file. Shared by `kdlab train`, `kdlab eval`, `kdlab cache-teacher`, the benchmark and the
course, so all of them see the same models and data for the same config.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from kdlab.config import KDConfig
from kdlab.data.alignment import prepare_paired_data, teacher_batch
from kdlab.data.batches import BatchSource, PackedBatches
from kdlab.data.corpus import PackedSplit, prepare_data
from kdlab.errors import KDLabError
from kdlab.loss.objective import Objective
from kdlab.models import (
    STUDENT_PRESETS,
    build_student,
    check_positions,
    check_vocabulary,
    count_parameters,
    load_teacher,
    load_tokenizer,
    resolve_model,
)
from kdlab.precision import Precision, resolve_precision
from kdlab.quiet import quiet_hf_progress
from kdlab.training.best_weights import BestWeights
from kdlab.training.callbacks import ProgressBar, tqdm_off
from kdlab.training.cross_tokenizer import CrossTokenizerObjective
from kdlab.training.early_stopping import EarlyStopping
from kdlab.training.engine import Engine, engine_from_env
from kdlab.training.on_policy import GeneratedBatches, OnPolicyObjective
from kdlab.training.state import TrainState
from kdlab.training.trainer import Trainer, total_steps
from kdlab.vocab import TokenizerPair, init_embedding, load_student_tokenizer

log = logging.getLogger("kdlab")


class Parts(NamedTuple):
    """The models and data of a run (a tuple: `precision, tokenizer, teacher, data, student = parts`)."""

    precision: Precision
    tokenizer: Any
    teacher: torch.nn.Module
    data: dict[str, PackedSplit]
    student: torch.nn.Module


@functools.lru_cache(maxsize=2)
def tokenizer_pair(student_tokenizer: str, teacher: str, data_dir: str) -> TokenizerPair:
    """The student's own tokenizer beside the teacher's (built once per process: it reads both vocabularies)."""
    return TokenizerPair(load_student_tokenizer(student_tokenizer), load_tokenizer(teacher, data_dir))


def _pretrained_vocabulary(cfg: KDConfig, tokens: int) -> None:
    """A pretrained student's embedding against its own tokenizer, from its config alone (before any weights load)."""
    if cfg.student in STUDENT_PRESETS:
        return
    from transformers import AutoConfig

    path = resolve_model(cfg.student, cfg.data_dir, "student")
    check_vocabulary(AutoConfig.from_pretrained(path).vocab_size, tokens, cfg.student)


def build_components(cfg: KDConfig) -> Parts:
    """(precision, tokenizer, teacher, data, student) as `cfg` describes them. With a student tokenizer
    of its own (cfg.student_tokenizer), `tokenizer` is the student's and the data is paired
    (kdlab.data.alignment): the student's tokens, the teacher's, and the chunks that align them."""
    precision = resolve_precision(cfg.device, cfg.teacher_dtype, cfg.autocast_dtype)
    engine = engine_from_env(precision.device.type, cfg.distributed)
    if engine.launched and precision.device.type == "cuda":
        precision = replace(precision, device=torch.device("cuda", engine.local_rank))
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher, cfg.data_dir)
    pair = None
    if cfg.student_tokenizer:
        pair = tokenizer_pair(cfg.student_tokenizer, cfg.teacher, str(cfg.data_dir))
        _pretrained_vocabulary(cfg, pair.s_size)
    teacher = load_teacher(cfg.teacher, cfg.data_dir, precision)
    check_positions(cfg.seq_len, teacher)  # before the data is packed at that length
    vocab = teacher.config.vocab_size
    if cfg.kd_top_k > vocab:
        raise KDLabError(
            f"kd_top_k={cfg.kd_top_k} is larger than the teacher's vocabulary ({vocab:,}); use 1 to {vocab}, "
            f"or 0 for the full vocabulary"
        )
    if pair is None:
        data = prepare_data(cfg.data, cfg.data_dir, tokenizer, cfg.seq_len)
    else:
        data = prepare_paired_data(cfg.data, cfg.data_dir, pair, cfg.seq_len)
    if cfg.train_blocks:
        data["train"] = data["train"].head(cfg.train_blocks)
    calibration = [data["train"].batch(list(range(min(cfg.calib_blocks, len(data["train"])))))]
    own = {}
    if pair is not None:  # the teacher scores its layers on its own tokens; the student's vocabulary is its own
        width = max(int(d.t_attention_mask.sum(1).max()) for d in data.values())
        limit = getattr(teacher.config, "max_position_embeddings", None)
        if limit and width > limit:
            raise KDLabError(
                f"seq_len={cfg.seq_len}: the teacher reads a block's text in up to {width} of its tokens, more than "
                f"its {limit:,} positions; use a smaller seq_len"
            )
        calibration = [teacher_batch(b) for b in calibration]
        own = {"tokenizer": pair.student}
        if cfg.student_init == "teacher-layers" and cfg.student in STUDENT_PRESETS:
            own["embedding"] = init_embedding(pair, teacher.get_input_embeddings().weight)
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
        **own,
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
    if pair is not None:
        share = data["validation"].aligned_share()
        log.info("%s; aligned positions: %.1f%% of the student's, %.1f%% of the teacher's (validation)",
                 pair.describe(), 100 * share["student"], 100 * share["teacher"])  # fmt: skip
        tokenizer = pair.student
    return Parts(precision, tokenizer, teacher, data, student)


def describe_init(cfg: KDConfig, student) -> str:
    """How the student started, as the log says it: its teacher layers, random, or loaded from a folder."""
    if cfg.student not in STUDENT_PRESETS:
        return f"loaded from {cfg.student}"
    if cfg.student_init == "random":
        return f"{student.config.num_hidden_layers} layers, random init"
    layers = getattr(student.config, "kdlab_teacher_layers", [])
    return f"teacher layers {','.join(map(str, layers))} ({student.config.kdlab_layer_choice})"


def batches_for_run(cfg: KDConfig, split, tokenizer, student, teacher, precision, engine: Engine):
    """The batch source `cfg` trains on: the packed corpus blocks (kdlab.data.batches.PackedBatches), and
    with on_policy > 0 those blocks cut to prompts and continued (kdlab.training.on_policy.GeneratedBatches)."""
    corpus = PackedBatches.for_run(cfg, split, tokenizer, student, teacher, engine)
    if cfg.on_policy == 0:
        return corpus
    pair = tokenizer_pair(cfg.student_tokenizer, cfg.teacher, str(cfg.data_dir)) if cfg.student_tokenizer else None
    return GeneratedBatches.for_run(cfg, corpus, tokenizer, student, teacher, precision, pair=pair)


def objective_for_run(cfg: KDConfig, student, teacher, total_steps: int):
    """The objective of `cfg`: kdlab.loss.objective.Objective, its on-policy override (on_policy > 0), or
    the cross-tokenizer one (a student tokenizer of its own)."""
    if cfg.student_tokenizer:
        pair = tokenizer_pair(cfg.student_tokenizer, cfg.teacher, str(cfg.data_dir))
        return CrossTokenizerObjective(cfg, student, teacher, total_steps, pair)
    if cfg.on_policy == 0:
        return Objective(cfg, student, teacher, total_steps)
    return OnPolicyObjective(cfg, student, teacher, total_steps)


def default_callbacks(cfg: KDConfig, given: list) -> list:
    """The callbacks the config asks for, after the user's: early stopping and the best weights, and a
    progress bar unless a given callback shows progress itself."""
    out: list = []
    if cfg.early_stopping:
        warmup = cfg.es_warmup_steps if cfg.es_warmup_steps >= 0 else cfg.warmup_steps  # -1: the LR warmup
        out.append(
            EarlyStopping(
                cfg.es_monitor, cfg.es_patience, cfg.es_min_delta, cfg.es_mode, warmup, cfg.es_abort_threshold or None
            )
        )
        if cfg.restore_best:
            out.append(BestWeights(cfg.es_monitor, cfg.es_mode))
    if not any(getattr(cb, "shows_progress", False) for cb in given):
        out.append(ProgressBar(disable=tqdm_off()))
    return out


def build_trainer(
    cfg: KDConfig,
    callbacks=(),
    *,
    parts: Parts | None = None,
    batches: BatchSource | None = None,
    objective: Objective | None = None,
    engine: Engine | None = None,
) -> Trainer:
    """A Trainer for `cfg`: its parts built (or the ones given: `parts` already loaded, a batch source,
    an objective or an engine of your own), the config's callbacks after `callbacks`."""
    with quiet_hf_progress():
        parts = parts or build_components(cfg)
    precision, tokenizer, teacher, data, student = parts
    engine = engine or engine_from_env(precision.device.type, cfg.distributed)
    check_positions(cfg.seq_len, teacher, student)
    batches = batches or batches_for_run(cfg, data["train"], tokenizer, student, teacher, precision, engine)
    objective = objective or objective_for_run(cfg, student, teacher, total_steps(cfg, batches))
    callbacks = [*callbacks, *default_callbacks(cfg, list(callbacks))]
    return Trainer(
        cfg,
        student,
        teacher,
        data,
        precision,
        tokenizer,
        callbacks,
        batches=batches,
        objective=objective,
        engine=engine,
    )


def train(cfg: KDConfig, callbacks=()) -> TrainState:
    """Build everything from `cfg` and run it; the function behind `kdlab train`."""
    return build_trainer(cfg, callbacks).fit()


__all__ = [
    "Parts",
    "build_components",
    "build_trainer",
    "train",
    "default_callbacks",
    "batches_for_run",
    "objective_for_run",
    "describe_init",
]
