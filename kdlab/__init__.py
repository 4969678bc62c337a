"""kdlab: knowledge distillation for causal language models, and a course built on it.

import kdlab
cfg = kdlab.load_config(overrides={"max_steps": 20})
state = kdlab.train(cfg)
print(kdlab.format_summary(state.history))

The package in wings: kdlab/loss/ (divergences, the fused loss, feature terms, terms, objective,
curriculum, cross-tokenizer losses), kdlab/data/ (corpus, batches, teacher caches, byte alignment),
kdlab/training/ (trainer, engine, callbacks, checkpoints, run folder, metrics, evaluation, the on-policy
and cross-tokenizer overrides), vocab.py (a student's own tokenizer), kdlab/course/ (the notebooks'
helpers; the core never imports it), and build.py, which makes a config into the trainer's parts.
"""

from kdlab.build import build_trainer, train
from kdlab.config import KDConfig, load_config, save_config
from kdlab.data.alignment import PairedSplit, align_chunks, byte_ends, prepare_paired_data
from kdlab.data.batches import BatchSource, PackedBatches
from kdlab.data.corpus import PackedSplit, load_documents, prepare_austen, prepare_data, tokenize_and_pack
from kdlab.data.teacher_cache import TeacherCache, build_teacher_cache, cache_key, open_teacher_cache
from kdlab.errors import KDLabError
from kdlab.loss.balance import AdaptiveBalancer
from kdlab.loss.cross_tokenizer import chunk_likelihood_loss, chunk_log_probs, chunk_sampled_reverse_kl, shared_vocab_kd
from kdlab.loss.curriculum import CurriculumScheduler, Ramp
from kdlab.loss.divergences import (
    DIVERGENCES,
    IGNORE_INDEX,
    kd_loss,
    kd_loss_topk,
    lm_loss,
    next_token_labels,
    sampled_reverse_kl,
    teacher_top_k,
)
from kdlab.loss.features import attention_kl, cosine_distance, info_nce, ln_mse, masked_mean_pool
from kdlab.loss.objective import Loss, Objective, StepCounts
from kdlab.loss.projection import StudentLogitProjector, align_vocab
from kdlab.loss.router import StudentAwareRouter
from kdlab.loss.terms import TERMS, Needs, Term, TermContext, register_term, unregister_term
from kdlab.models import STUDENT_PRESETS, build_student, load_teacher, load_tokenizer, prepare_teacher
from kdlab.precision import Precision, resolve_precision, student_logits, teacher_logits
from kdlab.training.best_weights import BestWeights
from kdlab.training.callbacks import Callback, ProgressBar
from kdlab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdlab.training.cross_tokenizer import CrossTokenizerObjective
from kdlab.training.early_stopping import EarlyStopping
from kdlab.training.engine import Engine
from kdlab.training.evaluation import evaluate, format_summary
from kdlab.training.on_policy import GeneratedBatches, OnPolicyObjective
from kdlab.training.trainer import Trainer, TrainState
from kdlab.vocab import TokenizerPair, init_embedding, load_student_tokenizer

__version__ = "0.1.0"

__all__ = [
    "KDConfig",
    "load_config",
    "save_config",
    "KDLabError",
    "CurriculumScheduler",
    "Ramp",
    "EarlyStopping",
    "kd_loss",
    "kd_loss_topk",
    "teacher_top_k",
    "lm_loss",
    "sampled_reverse_kl",
    "next_token_labels",
    "IGNORE_INDEX",
    "DIVERGENCES",
    "TeacherCache",
    "cache_key",
    "build_teacher_cache",
    "open_teacher_cache",
    "ln_mse",
    "cosine_distance",
    "attention_kl",
    "info_nce",
    "masked_mean_pool",
    "Objective",
    "Loss",
    "StepCounts",
    "Term",
    "TermContext",
    "Needs",
    "TERMS",
    "register_term",
    "unregister_term",
    "BatchSource",
    "PackedBatches",
    "GeneratedBatches",
    "OnPolicyObjective",
    "Callback",
    "ProgressBar",
    "BestWeights",
    "StudentAwareRouter",
    "AdaptiveBalancer",
    "align_vocab",
    "StudentLogitProjector",
    "Precision",
    "resolve_precision",
    "teacher_logits",
    "student_logits",
    "PackedSplit",
    "prepare_austen",
    "prepare_data",
    "load_documents",
    "tokenize_and_pack",
    "STUDENT_PRESETS",
    "prepare_teacher",
    "load_teacher",
    "load_tokenizer",
    "build_student",
    "evaluate",
    "format_summary",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "Trainer",
    "TrainState",
    "train",
    "build_trainer",
    "Engine",
    "PairedSplit",
    "align_chunks",
    "byte_ends",
    "prepare_paired_data",
    "shared_vocab_kd",
    "chunk_likelihood_loss",
    "chunk_log_probs",
    "chunk_sampled_reverse_kl",
    "CrossTokenizerObjective",
    "TokenizerPair",
    "init_embedding",
    "load_student_tokenizer",
]
