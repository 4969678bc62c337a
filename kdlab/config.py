"""Run configuration: one flat dataclass, validated on construction, loadable from YAML.

Precedence is defaults < YAML file < explicit overrides (the CLI's flags). Unknown keys are
errors, never silently ignored: a typo such as `alpha_dk: 0` would otherwise train a different
model than the user asked for.

    cfg = load_config("run.yaml", {"batch_size": 2, "epochs": 3})

Each field is declared with `setting(default, description, group=..., choices=...)`: one source for
the YAML key, the CLI flag and its help (`kdlab train --help`, grouped by section), the allowed
values that `KDConfig` checks, and docs (`field_info`, `field_help`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .curriculum import PRESETS, SHAPES, parse_ramps
from .early_stopping import METRICS, MODES
from .errors import KDLabError
from .feature_losses import FEATURE_LOSSES
from .losses import DIVERGENCES
from .pruning import LAYER_CHOICES, parse_layer_list
from .schedule import SCHEDULERS
from .terms import TERMS

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_STYLES = ("concise", "original-verbose")
STUDENT_INITS = ("random", "teacher-layers")
LOGIT_PROJECTIONS = ("align", "learned")
GENERATORS = ("student", "teacher")
ON_POLICY_LOSSES = ("divergence", "sampled_reverse_kl")

# The sections of KDConfig, in order: title -> what its fields are about (the CLI's argument groups).
GROUPS: dict[str, str] = {
    "data": "the corpus and how it is cut into training blocks",
    "models": "the teacher, the student and how the student starts",
    "loss": "the terms of the objective (kdlab.terms) and their maximum weights",
    "curriculum": "how each loss weight ramps up during training (kdlab.curriculum); each weight above is the "
    "maximum its ramp reaches",
    "on-policy": "training on continuations a model generates from prompts of the training blocks "
    "(kdlab.on_policy): GKD's mixed policy, on-policy distillation, sequence-level KD",
    "optimisation": "batches, steps, AdamW and the learning-rate schedule",
    "evaluation, logging, checkpoints": "when to evaluate, log and save, and where the run folder is",
    "early stopping": "stop when validation stops improving (kdlab.early_stopping); patience counts evaluations, "
    "not steps",
    "runtime": "seed, device, precision and compilation",
    "teacher correction": "`kdlab correct-teacher`: a LoRA adapter (peft) that fine-tunes the frozen teacher on the "
    "training split before it teaches (kdlab.correction); batch_size, seq_len, warmup_steps, lr_scheduler, "
    "save_every and resume apply too",
}


def setting(default: Any, help: str, *, group: str, choices: tuple[str, ...] | dict[str, Any] | None = None) -> Any:
    """A KDConfig field with its one-line description, its section and, if it has a fixed set of
    values, the container that lists them (a tuple, or a registry dict whose keys are the values;
    read at check time, so the help and the validation share one source).

    Dict defaults become a default_factory (each config gets its own copy).
    """
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {', '.join(GROUPS)}")
    if not help.strip():
        raise ValueError("a config field needs a description")
    metadata = {"help": help, "group": group, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _section(group: str) -> Callable[..., Any]:
    """`setting` for the fields under one section header of KDConfig."""
    return functools.partial(setting, group=group)


_data = _section("data")
_models = _section("models")
_loss = _section("loss")
_curriculum = _section("curriculum")
_on_policy = _section("on-policy")
_optimisation = _section("optimisation")
_evaluation = _section("evaluation, logging, checkpoints")
_early_stopping = _section("early stopping")
_runtime = _section("runtime")
_correction = _section("teacher correction")


@dataclass
class KDConfig:
    # --- data -------------------------------------------------------------------------------
    data: str = _data(
        "austen", "corpus: 'austen' (built by `kdlab prepare`), a text file, a folder of them, or an HF dataset name"
    )
    data_dir: str = _data("data", "folder for the corpus, the converted teacher and the token caches")
    seq_len: int = _data(256, "tokens per packed training block (>= 2)")
    train_blocks: int = _data(
        0, "train on the first N training blocks only (0 = all): a small corpus, e.g. to see overfitting"
    )

    # --- models -----------------------------------------------------------------------------
    teacher: str = _models(
        "smollm2-135m-austen",
        "teacher: built-in smollm2-135m-austen (corrected on Austen by a committed LoRA adapter) or smollm2-135m "
        "(as released), a local model folder or an HF id",
    )
    student: str = _models(
        "large",
        "student: a size preset, the teacher's width at a depth (kdlab.models.STUDENT_PRESETS: small 4 layers, "
        "medium 8, large 15, xl 22; tiny for tests), a local model folder or an HF id",
    )
    student_init: str = _models(
        "teacher-layers",
        "how a preset student starts: random weights, or copies of teacher layers chosen by "
        "student_layers (a model folder or HF id keeps its own)",
        choices=STUDENT_INITS,
    )
    student_depth: int = _models(
        0, "decoder layers of a preset student (0 = the preset's depth); at most the teacher's"
    )
    student_layers: str = _models(
        "importance",
        "which teacher layers a teacher-layers student copies: even (evenly spaced, first and last kept), "
        "importance (highest block influence on calibration blocks), drop-one (those whose removal raises the "
        "teacher's loss most), or a list such as 0,5,29 (kdlab.pruning)",
    )
    calib_blocks: int = _models(
        4, "training blocks (the first ones) on which importance and drop-one score the teacher's layers (>= 1)"
    )

    # --- loss -------------------------------------------------------------------------------
    alpha_kd: float = _loss(0.5, "weight of the KD term, in [0, 1]: total = alpha_kd * KD + (1 - alpha_kd) * LM")
    temperature: float = _loss(1.0, "KD temperature T (> 0); the KD term is scaled by T^2 (Hinton et al. 2015)")
    kd_top_k: int = _loss(
        0, "KD over the full vocabulary (0), or over the teacher's top-k tokens plus one tail bucket (k > 0)"
    )
    kd_divergence: str = _loss(
        "forward_kl",
        "KD divergence: forward_kl, reverse_kl (MiniLLM) or jsd (GKD's generalised JSD)",
        choices=DIVERGENCES,
    )
    jsd_beta: float = _loss(0.5, "jsd only: the mixture's weight on the teacher, in (0, 1)")
    # intermediate terms (kdlab.terms): at weight 0 a term is not computed, and needs no hidden states/attentions
    w_feature: float = _loss(0.0, "max weight of the router-mixed feature loss per student block (0 = off)")
    w_attention: float = _loss(
        0.0,
        "max weight of the MiniLM attention KL of mapped blocks (0 = off; > 0 switches both models to eager attention)",
    )
    w_layerwise: float = _loss(
        0.0, "max weight of the LN-MSE between projected student blocks and uniformly mapped teacher blocks (0 = off)"
    )
    w_contrastive: float = _loss(0.0, "max weight of the InfoNCE between pooled last states across the batch (0 = off)")
    feature_loss: str = _loss(
        "ln_mse", "distance of the feature term: ln_mse (scale-free, in [0, 4]) or cosine", choices=FEATURE_LOSSES
    )
    router_experts: int = _loss(
        4, "feature term: evenly spaced teacher blocks each student block's router chooses from"
    )
    router_top_k: int = _loss(2, "feature term: experts mixed per token, in [1, router_experts]")
    router_balance: float = _loss(
        0.1, "feature term: weight of the routers' load-balancing term inside it (0.01 let the routers collapse)"
    )
    contrastive_tau: float = _loss(0.1, "temperature of the contrastive term's InfoNCE (> 0)")
    term_weights: dict[str, float] = _loss(
        {},
        "max weights of registered terms that have no setting of their own "
        "(kdlab.terms.register_term), e.g. {my_term: 0.01}",
    )
    adaptive_balance: bool = _loss(False, "divide each loss term by an EMA of its magnitude")
    balance_momentum: float = _loss(0.99, "adaptive_balance: momentum of the magnitude EMA, in [0, 1)")
    grad_share_every: int = _loss(
        0, "every N steps, log each term's share of the student's grad norm (one extra backward per term; 0 = off)"
    )
    logit_projection: str = _loss(
        "align",
        "vocabularies of different size: align the logits by token id, or learn a projection (student side)",
        choices=LOGIT_PROJECTIONS,
    )
    loss_chunk_tokens: int = _loss(
        128,
        "rows of the [tokens x vocab] logits held in fp32 at a time, by the chunked and the fused loss "
        "(memory vs speed; 128 is fastest on CPU)",
    )
    fused_loss: bool = _loss(
        True,
        "compute KD + LM from the hidden states and the output projection chunk by chunk, never the [N, V] "
        "logits (kdlab.fused_loss), where the run allows it (kdlab train -v says); false = the logits path",
    )
    teacher_cache: str = _loss(
        "",
        "folder of a teacher cache (`kdlab cache-teacher`): KD reads the stored top-k "
        "instead of running the teacher; needs kd_top_k > 0 and no intermediate terms "
        "('' = live teacher)",
    )

    # --- curriculum (kdlab.curriculum): each weight above is the maximum its ramp reaches ---------
    curriculum: str = _curriculum(
        "original",
        "weight schedule: original (the write-up's table), original-phases "
        "(its earlier schedule) or constant (every term at full weight from "
        "step 0)",
        choices=PRESETS,
    )
    ramps: dict[str, Any] = _curriculum(
        {},
        f"per-term overrides of the preset, e.g. {{feature: {{start: 0.1, end: "
        f"0.4, shape: cosine}}}}: start and end are fractions of training, "
        f"shape is {' or '.join(SHAPES)}",
    )

    # --- on-policy (kdlab.on_policy) -----------------------------------------------------------
    on_policy: float = _on_policy(
        0.0,
        "lambda: the chance that an optimizer step trains on generated continuations instead of the "
        "corpus' text, in [0, 1] (0 = off-policy, 1 = every step; GKD)",
    )
    generator: str = _on_policy(
        "student",
        "who continues the prompts: the student (on-policy distillation; its own text gets no LM weight) "
        "or the teacher (sequence-level KD: the LM term learns the teacher's text)",
        choices=GENERATORS,
    )
    prompt_tokens: int = _on_policy(32, "tokens of each training block kept as the prompt (below seq_len)")
    gen_tokens: int = _on_policy(
        0, "tokens generated after each prompt (0 = the rest of the block: seq_len - prompt_tokens)"
    )
    gen_temperature: float = _on_policy(1.0, "sampling temperature of the generator (> 0)")
    gen_top_p: float = _on_policy(1.0, "nucleus sampling: keep the smallest token set holding this mass, in (0, 1]")
    on_policy_loss: str = _on_policy(
        "divergence",
        "loss on the student's own text: divergence (the KD term, kd_divergence and kd_top_k, on the generated "
        "positions) or sampled_reverse_kl (log q - log p of each sampled token as its advantage)",
        choices=ON_POLICY_LOSSES,
    )
    rkl_discount: float = _on_policy(
        0.0,
        "sampled_reverse_kl: a token's advantage adds discount^k times the log-ratio k tokens later, in [0, 1] "
        "(0 = per token)",
    )
    gen_samples: int = _on_policy(2, "prompt -> continuation pairs of the last generated batch in each train record")

    # --- optimisation -----------------------------------------------------------------------
    batch_size: int = _optimisation(4, "sequences per micro-batch")
    grad_accum: int = _optimisation(1, "micro-batches per optimizer step")
    epochs: int = _optimisation(
        1, "passes over the training set, when max_steps is -1 (giving epochs without max_steps sets max_steps to -1)"
    )
    max_steps: int = _optimisation(
        40, "optimizer steps; > 0 overrides epochs (as in HF TrainingArguments), -1 = train `epochs` epochs"
    )
    lr: float = _optimisation(3e-4, "peak learning rate of AdamW")
    weight_decay: float = _optimisation(0.01, "AdamW weight decay (on weight matrices only, not norms or biases)")
    warmup_steps: int = _optimisation(4, "optimizer steps of linear learning-rate warmup")
    lr_scheduler: str = _optimisation("cosine", "learning-rate schedule after the warmup", choices=SCHEDULERS)
    grad_clip: float = _optimisation(1.0, "maximum global grad norm (0 = no clipping)")
    max_nonfinite_steps: int = _optimisation(5, "stop the run after this many skipped (non-finite loss) steps in a row")

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = _evaluation(20, "optimizer steps between evaluations (0 = only before and after training)")
    eval_batches: int = _evaluation(4, "micro-batches per evaluation (0 = the whole split)")
    eval_cache_mb: int = _evaluation(
        1024, "MiB of the frozen teacher's evaluation logits kept between evaluations (0 = recompute each time)"
    )
    log_every: int = _evaluation(100, "optimizer steps per log line (interval means; no per-step host sync)")
    log_first: int = _evaluation(3, "also log each of the first N steps")
    log_style: str = _evaluation(
        "concise",
        "concise, or original-verbose: the original framework's ~36 lines per step, to measure their cost",
        choices=LOG_STYLES,
    )
    save_every: int = _evaluation(20, "optimizer steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = _evaluation(2, "resumable checkpoints kept in out_dir (the newest)")
    checkpoints: bool = _evaluation(
        True, "write resumable checkpoints (off for sweeps and the course; final/ and best/ are written either way)"
    )
    out_dir: str = _evaluation(
        "runs/default", "the run folder: config.yaml, metrics.jsonl, checkpoints, final/ and best/"
    )
    resume: bool = _evaluation(False, "continue from out_dir's latest checkpoint")
    overwrite: bool = _evaluation(
        False, "let a fresh run into a non-empty out_dir delete what is there (without it: refused)"
    )

    # --- early stopping (kdlab.early_stopping): patience counts evaluations ----------------------
    early_stopping: bool = _early_stopping(True, "stop when the monitored metric stops improving")
    es_monitor: str = _early_stopping(
        "val_kl",
        "metric watched: val_kl (KL(teacher || student), T = 1) or val_ce "
        "(the student's cross-entropy): fixed definitions",
        choices=METRICS,
    )
    es_patience: int = _early_stopping(20, "evaluations in a row without improvement before stopping")
    es_min_delta: float = _early_stopping(0.001, "smallest change of the metric that counts as an improvement")
    es_mode: str = _early_stopping("min", "which way is better: min (lower) or max (higher)", choices=MODES)
    es_warmup_steps: int = _early_stopping(
        -1, "evaluations before this step never count against patience (-1 = warmup_steps, the LR warmup)"
    )
    es_abort_threshold: float = _early_stopping(
        0.0, "stop at once when the metric passes this value, i.e. the run diverged (0 = off)"
    )
    restore_best: bool = _early_stopping(True, "end with the weights of the best evaluation")

    # --- runtime ----------------------------------------------------------------------------
    seed: int = _runtime(0, "the RNG seed (initialisation of the student and of the terms' modules, data order)")
    device: str = _runtime("auto", "where to run: auto = cuda if available, else cpu", choices=DEVICES)
    teacher_dtype: str = _runtime(
        "auto",
        "teacher weights: auto = float16 on CUDA (the original framework's set-up), float32 on CPU",
        choices=DTYPES,
    )
    autocast_dtype: str = _runtime(
        "auto",
        "student compute: auto = bfloat16 (else float16) autocast on CUDA, off on CPU; float32 = off",
        choices=DTYPES,
    )
    compile: bool = _runtime(
        False, "torch.compile the training step's student and teacher forwards (the first steps compile)"
    )

    # --- teacher correction (kdlab.correction, `kdlab correct-teacher`) ------------------------------
    correct_rank: int = _correction(8, "LoRA rank r of the correction adapter (>= 1)")
    correct_alpha: int = _correction(16, "LoRA alpha: the adapter's update is scaled by alpha / r")
    correct_targets: str = _correction(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated names of the teacher's linear layers that get an adapter",
    )
    correct_steps: int = _correction(120, "optimizer steps of the correction (>= 1)")
    correct_lr: float = _correction(1e-3, "peak learning rate of the adapter's AdamW (> 0)")
    correct_out: str = _correction(
        "runs/correct-teacher", "folder of the correction: its checkpoint, before.json and adapter/ (with meta.json)"
    )

    def __post_init__(self) -> None:
        _coerce_types(self)
        errors = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        def choice(name: str) -> None:  # the allowed values are the field's (the help lists the same)
            value, allowed = getattr(self, name), field_choices(name)
            need(value in allowed, f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")

        need(bool(self.data.strip()), "data='' is empty; give 'austen', a text file/folder or an HF dataset name")
        need(self.seq_len >= 2, f"seq_len={self.seq_len} must be >= 2 (one token to read, one to predict)")
        need(self.train_blocks >= 0, f"train_blocks={self.train_blocks} must be >= 0 (0 = every training block)")
        need(bool(self.teacher.strip()), "teacher='' is empty; give 'smollm2-135m-austen', a local folder or an HF id")
        need(bool(self.student.strip()), "student='' is empty; give a size preset, a local folder or an HF id")
        choice("student_init")
        need(self.student_depth >= 0, f"student_depth={self.student_depth} must be >= 0 (0 = the preset's depth)")
        if self.student_layers not in LAYER_CHOICES:
            try:
                parse_layer_list(self.student_layers)
            except ValueError as e:
                errors.append(str(e))
        need(self.calib_blocks >= 1, f"calib_blocks={self.calib_blocks} must be >= 1")
        need(0.0 <= self.alpha_kd <= 1.0, f"alpha_kd={self.alpha_kd} must be in [0, 1]")
        need(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature={self.temperature} must be a positive number (1.0 is the usual choice for LMs)",
        )
        need(self.kd_top_k >= 0, f"kd_top_k={self.kd_top_k} must be >= 0 (0 = full vocabulary)")
        choice("kd_divergence")
        need(0.0 < self.jsd_beta < 1.0, f"jsd_beta={self.jsd_beta} must be in (0, 1)")
        if self.teacher_cache:
            need(
                self.kd_top_k > 0,
                f"teacher_cache={self.teacher_cache!r} needs kd_top_k > 0 (the cache stores the "
                f"teacher's top-k), but kd_top_k={self.kd_top_k}",
            )
            active = [
                f"{n}={getattr(self, n)}"
                for n in ("w_feature", "w_attention", "w_layerwise", "w_contrastive")
                if getattr(self, n) > 0
            ]
            need(
                not active,
                f"teacher_cache={self.teacher_cache!r} holds the teacher's logits only, but "
                f"{', '.join(active)} needs its hidden states or attention maps; set those weights to 0 "
                f"or teacher_cache=''",
            )
        need(
            math.isfinite(self.on_policy) and 0.0 <= self.on_policy <= 1.0,
            f"on_policy={self.on_policy} must be in [0, 1] (0 = off-policy, 1 = every step on generated text)",
        )
        choice("generator")
        choice("on_policy_loss")
        if self.on_policy > 0:
            need(
                1 <= self.prompt_tokens < self.seq_len,
                f"prompt_tokens={self.prompt_tokens} must be in [1, seq_len={self.seq_len}): the prompt is a "
                f"prefix of a training block",
            )
            need(self.gen_tokens >= 0, f"gen_tokens={self.gen_tokens} must be >= 0 (0 = seq_len - prompt_tokens)")
            need(
                math.isfinite(self.gen_temperature) and self.gen_temperature > 0,
                f"gen_temperature={self.gen_temperature} must be > 0",
            )
            need(0.0 < self.gen_top_p <= 1.0, f"gen_top_p={self.gen_top_p} must be in (0, 1]")
            need(0.0 <= self.rkl_discount <= 1.0, f"rkl_discount={self.rkl_discount} must be in [0, 1]")
            need(self.gen_samples >= 0, f"gen_samples={self.gen_samples} must be >= 0")
            need(
                not self.teacher_cache,
                f"on_policy={self.on_policy} trains on text generated during the run, which no teacher cache holds; "
                f"set teacher_cache='' (or on_policy=0)",
            )
            if self.on_policy_loss == "sampled_reverse_kl":
                need(
                    self.generator == "student",
                    "on_policy_loss=sampled_reverse_kl scores the student's own samples; it needs generator=student",
                )
                need(
                    self.gen_temperature == 1.0 and self.gen_top_p == 1.0,
                    f"on_policy_loss=sampled_reverse_kl is unbiased only for samples of the student itself; it needs "
                    f"gen_temperature=1 and gen_top_p=1 (got {self.gen_temperature} and {self.gen_top_p})",
                )
        for name, value in self.term_weights.items():
            term = TERMS.get(name)
            if term is None:
                errors.append(f"term_weights: unknown term {name!r}; registered terms: {', '.join(TERMS)}")
            elif term.weight is not None:
                field_name = term.weight if isinstance(term.weight, str) else "alpha_kd"
                errors.append(f"term_weights: {name!r} has its own setting, {field_name}; set that instead")
            elif not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            ):
                errors.append(f"term_weights.{name}={value!r} must be a number >= 0")
        need(self.loss_chunk_tokens >= 1, f"loss_chunk_tokens={self.loss_chunk_tokens} must be >= 1")
        for name in ("w_feature", "w_attention", "w_layerwise", "w_contrastive", "router_balance"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, f"{name}={value} must be >= 0")
        choice("feature_loss")
        choice("logit_projection")
        need(self.router_experts >= 1, f"router_experts={self.router_experts} must be >= 1")
        need(
            1 <= self.router_top_k <= self.router_experts,
            f"router_top_k={self.router_top_k} must be in [1, router_experts={self.router_experts}]",
        )
        need(
            math.isfinite(self.contrastive_tau) and self.contrastive_tau > 0,
            f"contrastive_tau={self.contrastive_tau} must be > 0",
        )
        need(0.0 <= self.balance_momentum < 1.0, f"balance_momentum={self.balance_momentum} must be in [0, 1)")
        need(self.grad_share_every >= 0, f"grad_share_every={self.grad_share_every} must be >= 0")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        need(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        need(self.max_steps == -1 or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1, or -1 for no cap")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr} must be a positive number")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        choice("lr_scheduler")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        need(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1")
        for name in ("eval_every", "eval_batches", "eval_cache_mb", "save_every"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        need(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        need(self.log_first >= 0, f"log_first={self.log_first} must be >= 0")
        choice("log_style")
        choice("curriculum")
        try:
            parse_ramps(self.ramps)
        except KDLabError as e:
            errors.append(str(e))
        choice("es_monitor")
        choice("es_mode")
        need(self.es_patience >= 1, f"es_patience={self.es_patience} must be >= 1")
        need(
            math.isfinite(self.es_min_delta) and self.es_min_delta >= 0,
            f"es_min_delta={self.es_min_delta} must be >= 0",
        )
        need(self.es_warmup_steps >= -1, f"es_warmup_steps={self.es_warmup_steps} must be >= 0, or -1 for auto")
        need(
            math.isfinite(self.es_abort_threshold) and self.es_abort_threshold >= 0,
            f"es_abort_threshold={self.es_abort_threshold} must be >= 0 (0 = off)",
        )
        need(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        need(
            self.checkpoints or not self.resume, "resume=true needs checkpoints=true (there is nothing to resume from)"
        )
        need(
            not (self.resume and self.overwrite),
            "resume=true and overwrite=true contradict each other: "
            "resume continues the run in out_dir, overwrite deletes it",
        )
        need(bool(self.out_dir.strip()), "out_dir='' is empty")
        need(self.correct_rank >= 1, f"correct_rank={self.correct_rank} must be >= 1")
        need(self.correct_alpha >= 1, f"correct_alpha={self.correct_alpha} must be >= 1")
        need(
            any(m.strip() for m in self.correct_targets.split(",")),
            f"correct_targets={self.correct_targets!r} names no layer; list the layers to adapt, e.g. q_proj,v_proj",
        )
        need(self.correct_steps >= 1, f"correct_steps={self.correct_steps} must be >= 1")
        need(math.isfinite(self.correct_lr) and self.correct_lr > 0, f"correct_lr={self.correct_lr} must be > 0")
        choice("device")
        choice("teacher_dtype")
        choice("autocast_dtype")
        if errors:
            raise KDLabError("; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(KDConfig)}
_TYPES = typing.get_type_hints(KDConfig)


class FieldInfo(NamedTuple):
    """What there is to know about one config field: the YAML key `name`, its flag, and its help."""

    name: str
    flag: str  # the command-line flag, e.g. --alpha-kd
    type: Any  # int, float, str, bool or dict[...]
    default: Any
    help: str  # the one-line description
    group: str  # its section (a key of GROUPS)
    choices: tuple[str, ...] | None  # the allowed values, if there is a fixed set


def _field(name: str) -> dataclasses.Field:
    try:
        return FIELDS[name]
    except KeyError:
        raise KDLabError(f"unknown config key {name!r}; allowed keys: {', '.join(FIELDS)}") from None


def field_choices(name: str) -> tuple[str, ...] | None:
    """The values field `name` allows (the ones `KDConfig` checks), or None if it has no fixed set."""
    allowed = _field(name).metadata["choices"]
    return None if allowed is None else tuple(allowed)


def field_info(name: str) -> FieldInfo:
    f = _field(name)
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return FieldInfo(
        name,
        "--" + name.replace("_", "-"),
        _TYPES[name],
        default,
        f.metadata["help"],
        f.metadata["group"],
        field_choices(name),
    )


def format_value(value: Any) -> str:
    """A field value as it is written in YAML: true/false, '' for an empty string, {} for a mapping."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def field_help(name: str) -> str:
    """Field `name`'s help in one line: its description, allowed values and default (for docs).

    >>> field_help("lr_scheduler")
    'learning-rate schedule after the warmup (one of cosine, linear, constant; default: cosine)'
    """
    info = field_info(name)
    allowed = f"one of {', '.join(info.choices)}; " if info.choices else ""
    return f"{info.help} ({allowed}default: {format_value(info.default)})"


def fields_by_group() -> dict[str, list[str]]:
    """{section title: its field names}, sections and fields in KDConfig's order."""
    out: dict[str, list[str]] = {group: [] for group in GROUPS}
    for name, f in FIELDS.items():
        out[f.metadata["group"]].append(name)
    return out


def _coerce_types(cfg: KDConfig) -> None:
    """Check each field's type; ints are accepted where floats are expected (YAML writes 1 not 1.0)."""
    for name, typ in _TYPES.items():
        value = getattr(cfg, name)
        if typing.get_origin(typ) is dict:
            if value is None:
                setattr(cfg, name, {})
            elif not isinstance(value, dict):
                raise KDLabError(f"{name}={value!r} must be a mapping")
        elif typ is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, name, float(value))
        elif typ is bool and not isinstance(value, bool):
            raise KDLabError(f"{name}={value!r} must be true or false")
        elif typ in (int, str) and (not isinstance(value, typ) or isinstance(value, bool)):
            raise KDLabError(f"{name}={value!r} must be of type {typ.__name__}")
        elif typ is float and not isinstance(getattr(cfg, name), float):
            raise KDLabError(f"{name}={value!r} must be a number")


def parse_value(name: str, text: str) -> Any:
    """Convert a command-line string to the type of field `name` (used by the CLI's flags)."""
    typ = _TYPES[name]
    try:
        if typing.get_origin(typ) is dict:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                raise ValueError from None
        if typ is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(text)
    except ValueError:
        raise KDLabError(f"{name}={text!r} must be of type {getattr(typ, '__name__', 'mapping')}") from None


def config_from_dict(values: dict[str, Any]) -> KDConfig:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise KDLabError(f"unknown config key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(FIELDS)}")
    return KDConfig(**values)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> KDConfig:
    """Defaults, then the YAML file at `path` (if any), then `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise KDLabError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise KDLabError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise KDLabError(f"config file {str(p)!r} must hold a mapping of key: value, not {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    if "epochs" in values and "max_steps" not in values:
        values["max_steps"] = -1  # asked for epochs: train them, not the quick default's 40 steps
    return config_from_dict(values)


def save_config(cfg: KDConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "KDConfig",
    "load_config",
    "save_config",
    "config_from_dict",
    "parse_value",
    "FIELDS",
    "GROUPS",
    "FieldInfo",
    "setting",
    "field_info",
    "field_help",
    "field_choices",
    "fields_by_group",
    "format_value",
]
