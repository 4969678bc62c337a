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

from kdlab.data.teacher_cache import HIDDEN_DTYPES
from kdlab.data.teacher_cache import KINDS as CACHE_KINDS
from kdlab.errors import KDLabError
from kdlab.loss.curriculum import PRESETS, SHAPES, parse_ramps
from kdlab.loss.divergences import DIVERGENCES
from kdlab.loss.features import FEATURE_LOSSES
from kdlab.loss.terms import TERMS
from kdlab.pruning import LAYER_CHOICES, parse_layer_list
from kdlab.training.early_stopping import METRICS, MODES
from kdlab.training.engine import KINDS as ENGINE_KINDS
from kdlab.training.schedule import SCHEDULERS
from kdlab.vocab import STUDENT_TOKENIZERS

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
STUDENT_INITS = ("random", "teacher-layers")
LOGIT_PROJECTIONS = ("align", "learned")
GENERATORS = ("student", "teacher")
ON_POLICY_LOSSES = ("divergence", "sampled_reverse_kl")

# The sections of KDConfig, in order: title -> what its fields are about (the CLI's argument groups).
GROUPS: dict[str, str] = {
    "data": "the corpus and how it is cut into training blocks",
    "models": "the teacher, the student and how the student starts",
    "loss": "the terms of the objective (kdlab.loss.terms) and their maximum weights",
    "curriculum": "how each loss weight ramps up during training (kdlab.loss.curriculum); each weight above is the "
    "maximum its ramp reaches",
    "on-policy": "training on continuations a model generates from prompts of the training blocks "
    "(kdlab.training.on_policy): GKD's mixed policy, on-policy distillation, sequence-level KD",
    "optimisation": "batches, steps, AdamW and the learning-rate schedule",
    "evaluation, logging, checkpoints": "when to evaluate, log and save, and where the run folder is",
    "early stopping": "stop when validation stops improving (kdlab.training.early_stopping); patience counts "
    "evaluations, not steps",
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
    student_tokenizer: str = _models(
        "",
        "the student's own tokenizer, for distillation across tokenizers ('' = the teacher's): austen-bpe-8k "
        "(built in: a byte-level BPE of 8,192 tokens trained on Austen), a tokenizer.json, or a tokenizer folder",
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
    # intermediate terms (kdlab.loss.terms): at weight 0 a term is not computed, and needs no hidden states/attentions
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
        "(kdlab.loss.terms.register_term), e.g. {my_term: 0.01}",
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
        "logits (kdlab.loss.fused), where the run allows it (kdlab train -v says); false = the logits path",
    )
    teacher_cache: str = _loss(
        "",
        "folder of a teacher cache (`kdlab cache-teacher`): KD reads the stored teacher instead of running "
        "it; no intermediate terms ('' = live teacher)",
    )
    teacher_cache_kind: str = _loss(
        "top-k",
        "what the teacher cache holds: top-k (the teacher's k largest log-probabilities; needs kd_top_k > 0) "
        "or hidden (its final hidden states: the full-vocabulary KD, any divergence and kd_top_k, through "
        "the fused loss)",
        choices=CACHE_KINDS,
    )
    teacher_cache_dtype: str = _loss(
        "bfloat16",
        "a hidden cache's numbers: bfloat16 (2 bytes each) or float32 (exactly the CPU teacher's)",
        choices=HIDDEN_DTYPES,
    )

    # --- curriculum (kdlab.loss.curriculum): each weight above is the maximum its ramp reaches ---------
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

    # --- on-policy (kdlab.training.on_policy) -----------------------------------------------------------
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

    # --- early stopping (kdlab.training.early_stopping): patience counts evaluations ----------------------
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
    distributed: str = _runtime(
        "ddp",
        "under torchrun: ddp (a full replica of student and teacher per process) or fsdp2 (their layers "
        "sharded over the processes; kdlab.training.engine)",
        choices=ENGINE_KINDS,
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
        # every section is checked even after a failure, so that one error names every bad value at once
        problems = _Problems(self)
        for check in _SECTION_CHECKS:
            check(self, problems)
        if problems.messages:
            raise KDLabError("; ".join(problems.messages))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- validation, by section
class _Problems:
    """The messages of a config's failed checks, which KDConfig raises together in one error."""

    def __init__(self, cfg: KDConfig) -> None:
        self.cfg = cfg
        self.messages: list[str] = []

    def need(self, ok: bool, msg: str) -> None:
        if not ok:
            self.messages.append(msg)

    def choice(self, name: str) -> None:
        """Field `name` holds one of its allowed values (the same ones its help lists)."""
        value, allowed = getattr(self.cfg, name), field_choices(name)
        self.need(value in allowed, f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _term_weight_fields(*, teacher_forward: bool = False) -> list[str]:
    """The config fields holding registered terms' maximum weights (w_feature, ...), but not alpha_kd,
    which is both kd's and lm's (1 - alpha_kd) and has a check of its own, [0, 1].

    Read from the term registry (kdlab.loss.terms.TERMS), so a new built-in term with a weight field of
    its own is checked without an edit here. teacher_forward=True: only the terms that need the
    teacher's forward and cannot read a teacher cache instead (the intermediate terms).
    """
    return [
        t.weight
        for t in TERMS.values()
        if isinstance(t.weight, str)
        and t.weight != "alpha_kd"
        and (not teacher_forward or (t.needs.teacher and not t.reads_cache))
    ]


def _check_data(cfg: KDConfig, p: _Problems) -> None:
    p.need(bool(cfg.data.strip()), "data='' is empty; give 'austen', a text file/folder or an HF dataset name")
    p.need(cfg.seq_len >= 2, f"seq_len={cfg.seq_len} must be >= 2 (one token to read, one to predict)")
    p.need(cfg.train_blocks >= 0, f"train_blocks={cfg.train_blocks} must be >= 0 (0 = every training block)")


def _check_models(cfg: KDConfig, p: _Problems) -> None:
    p.need(bool(cfg.teacher.strip()), "teacher='' is empty; give 'smollm2-135m-austen', a local folder or an HF id")
    p.need(bool(cfg.student.strip()), "student='' is empty; give a size preset, a local folder or an HF id")
    p.choice("student_init")
    p.need(cfg.student_depth >= 0, f"student_depth={cfg.student_depth} must be >= 0 (0 = the preset's depth)")
    if cfg.student_layers not in LAYER_CHOICES:
        try:
            parse_layer_list(cfg.student_layers)  # its ValueError names the value and what is allowed
        except ValueError as e:
            p.messages.append(str(e))
    p.need(cfg.calib_blocks >= 1, f"calib_blocks={cfg.calib_blocks} must be >= 1")
    if cfg.student_tokenizer:
        _check_cross_tokenizer(cfg, p)


def _check_cross_tokenizer(cfg: KDConfig, p: _Problems) -> None:
    """What a student with a tokenizer of its own cannot be combined with (kdlab.training.cross_tokenizer)."""
    name = cfg.student_tokenizer
    p.need(
        name in STUDENT_TOKENIZERS or Path(name).expanduser().exists(),
        f"student_tokenizer={name!r} is neither a built-in tokenizer ({', '.join(STUDENT_TOKENIZERS)}) nor an "
        f"existing tokenizer.json or tokenizer folder",
    )
    positional = [f"{n}={getattr(cfg, n)}" for n in _term_weight_fields() if getattr(cfg, n) > 0]
    p.need(
        not positional,
        f"student_tokenizer={name!r}: {', '.join(positional)} compares the models position by position or layer "
        f"by layer, which two tokenizers do not share; set it to 0 (across tokenizers: kd, lm and term_weights.chunk)",
    )
    p.need(
        cfg.kd_top_k == 0,
        f"student_tokenizer={name!r} takes KD over the tokens both vocabularies share plus a tail bucket; "
        f"kd_top_k={cfg.kd_top_k} must be 0",
    )
    p.need(not cfg.teacher_cache, f"student_tokenizer={name!r} runs the teacher on its own tokens; no teacher "
           f"cache holds them: set teacher_cache=''")  # fmt: skip
    p.need(
        cfg.logit_projection == "align",
        f"student_tokenizer={name!r} compares the vocabularies by the bytes of their tokens; "
        f"logit_projection={cfg.logit_projection!r} must be 'align' (a learned map assumes aligned positions)",
    )
    p.need(
        cfg.rkl_discount == 0.0,
        f"student_tokenizer={name!r}: rkl_discount={cfg.rkl_discount} does not apply; across tokenizers every "
        f"chunk gets its row's whole log-ratio (the unbiased form, kdlab.loss.cross_tokenizer); leave it at 0",
    )
    p.need(
        not cfg.on_policy > 0 or cfg.generator == "student",
        f"student_tokenizer={name!r} with on_policy={cfg.on_policy}: the teacher would write in its own tokens, "
        f"which the student cannot read back; use generator=student",
    )


def _check_loss(cfg: KDConfig, p: _Problems) -> None:
    p.need(0.0 <= cfg.alpha_kd <= 1.0, f"alpha_kd={cfg.alpha_kd} must be in [0, 1]")
    p.need(
        math.isfinite(cfg.temperature) and cfg.temperature > 0,
        f"temperature={cfg.temperature} must be a positive number (1.0 is the usual choice for LMs)",
    )
    p.need(cfg.kd_top_k >= 0, f"kd_top_k={cfg.kd_top_k} must be >= 0 (0 = full vocabulary)")
    p.choice("kd_divergence")
    p.need(0.0 < cfg.jsd_beta < 1.0, f"jsd_beta={cfg.jsd_beta} must be in (0, 1)")
    p.choice("teacher_cache_kind")
    p.choice("teacher_cache_dtype")
    if cfg.teacher_cache and cfg.teacher_cache_kind == "hidden":
        p.need(
            cfg.fused_loss,
            f"teacher_cache={cfg.teacher_cache!r} holds the teacher's hidden states, which KD reads through "
            f"the fused loss; set fused_loss=true or teacher_cache=''",
        )
    if cfg.teacher_cache and cfg.teacher_cache_kind == "top-k":
        p.need(
            cfg.kd_top_k > 0,
            f"teacher_cache={cfg.teacher_cache!r} needs kd_top_k > 0 (the cache stores the "
            f"teacher's top-k), but kd_top_k={cfg.kd_top_k}",
        )
        active = [f"{n}={getattr(cfg, n)}" for n in _term_weight_fields(teacher_forward=True) if getattr(cfg, n) > 0]
        p.need(
            not active,
            f"teacher_cache={cfg.teacher_cache!r} holds the teacher's logits only, but "
            f"{', '.join(active)} needs its hidden states or attention maps; set those weights to 0 "
            f"or teacher_cache=''",
        )
    if cfg.teacher_cache and cfg.teacher_cache_kind == "hidden":
        active = [f"{n}={getattr(cfg, n)}" for n in _term_weight_fields(teacher_forward=True) if getattr(cfg, n) > 0]
        p.need(
            not active,
            f"teacher_cache={cfg.teacher_cache!r} holds the teacher's final hidden states only, but "
            f"{', '.join(active)} needs its other layers; set those weights to 0 or teacher_cache=''",
        )
    for name, value in cfg.term_weights.items():
        term = TERMS.get(name)
        if term is None:
            p.messages.append(f"term_weights: unknown term {name!r}; registered terms: {', '.join(TERMS)}")
        elif term.weight is not None:
            field_name = term.weight if isinstance(term.weight, str) else "alpha_kd"  # lm's weight is 1 - alpha_kd
            p.messages.append(f"term_weights: {name!r} has its own setting, {field_name}; set that instead")
        elif not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        ):
            p.messages.append(f"term_weights.{name}={value!r} must be a number >= 0")
    p.need(cfg.loss_chunk_tokens >= 1, f"loss_chunk_tokens={cfg.loss_chunk_tokens} must be >= 1")
    for name in (*_term_weight_fields(), "router_balance"):
        value = getattr(cfg, name)
        p.need(math.isfinite(value) and value >= 0, f"{name}={value} must be >= 0")
    p.choice("feature_loss")
    p.choice("logit_projection")
    p.need(cfg.router_experts >= 1, f"router_experts={cfg.router_experts} must be >= 1")
    p.need(
        1 <= cfg.router_top_k <= cfg.router_experts,
        f"router_top_k={cfg.router_top_k} must be in [1, router_experts={cfg.router_experts}]",
    )
    p.need(
        math.isfinite(cfg.contrastive_tau) and cfg.contrastive_tau > 0,
        f"contrastive_tau={cfg.contrastive_tau} must be > 0",
    )
    p.need(0.0 <= cfg.balance_momentum < 1.0, f"balance_momentum={cfg.balance_momentum} must be in [0, 1)")
    p.need(cfg.grad_share_every >= 0, f"grad_share_every={cfg.grad_share_every} must be >= 0")


def _check_curriculum(cfg: KDConfig, p: _Problems) -> None:
    p.choice("curriculum")
    try:
        parse_ramps(cfg.ramps)  # its KDLabError names the ramp and what is wrong with it
    except KDLabError as e:
        p.messages.append(str(e))


def _check_on_policy(cfg: KDConfig, p: _Problems) -> None:
    p.need(
        math.isfinite(cfg.on_policy) and 0.0 <= cfg.on_policy <= 1.0,
        f"on_policy={cfg.on_policy} must be in [0, 1] (0 = off-policy, 1 = every step on generated text)",
    )
    p.choice("generator")
    p.choice("on_policy_loss")
    if not cfg.on_policy > 0:
        return  # off-policy (or a lambda reported above): the generation settings are never read
    p.need(
        1 <= cfg.prompt_tokens < cfg.seq_len,
        f"prompt_tokens={cfg.prompt_tokens} must be in [1, seq_len={cfg.seq_len}): the prompt is a "
        f"prefix of a training block",
    )
    p.need(cfg.gen_tokens >= 0, f"gen_tokens={cfg.gen_tokens} must be >= 0 (0 = seq_len - prompt_tokens)")
    p.need(
        math.isfinite(cfg.gen_temperature) and cfg.gen_temperature > 0,
        f"gen_temperature={cfg.gen_temperature} must be > 0",
    )
    p.need(0.0 < cfg.gen_top_p <= 1.0, f"gen_top_p={cfg.gen_top_p} must be in (0, 1]")
    p.need(0.0 <= cfg.rkl_discount <= 1.0, f"rkl_discount={cfg.rkl_discount} must be in [0, 1]")
    p.need(cfg.gen_samples >= 0, f"gen_samples={cfg.gen_samples} must be >= 0")
    p.need(
        not cfg.teacher_cache,
        f"on_policy={cfg.on_policy} trains on text generated during the run, which no teacher cache holds; "
        f"set teacher_cache='' (or on_policy=0)",
    )
    if cfg.on_policy_loss == "sampled_reverse_kl":
        p.need(
            cfg.generator == "student",
            "on_policy_loss=sampled_reverse_kl scores the student's own samples; it needs generator=student",
        )
        p.need(
            cfg.gen_temperature == 1.0 and cfg.gen_top_p == 1.0,
            f"on_policy_loss=sampled_reverse_kl is unbiased only for samples of the student itself; it needs "
            f"gen_temperature=1 and gen_top_p=1 (got {cfg.gen_temperature} and {cfg.gen_top_p})",
        )


def _check_optimisation(cfg: KDConfig, p: _Problems) -> None:
    p.need(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1")
    p.need(cfg.grad_accum >= 1, f"grad_accum={cfg.grad_accum} must be >= 1")
    p.need(cfg.epochs >= 1, f"epochs={cfg.epochs} must be >= 1")
    p.need(cfg.max_steps == -1 or cfg.max_steps >= 1, f"max_steps={cfg.max_steps} must be >= 1, or -1 for no cap")
    p.need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr={cfg.lr} must be a positive number")
    p.need(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} must be >= 0")
    p.need(cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps} must be >= 0")
    p.choice("lr_scheduler")
    p.need(cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip} must be >= 0 (0 disables clipping)")
    p.need(cfg.max_nonfinite_steps >= 1, f"max_nonfinite_steps={cfg.max_nonfinite_steps} must be >= 1")


def _check_evaluation(cfg: KDConfig, p: _Problems) -> None:
    for name in ("eval_every", "eval_batches", "eval_cache_mb", "save_every"):
        p.need(getattr(cfg, name) >= 0, f"{name}={getattr(cfg, name)} must be >= 0")
    p.need(cfg.log_every >= 1, f"log_every={cfg.log_every} must be >= 1")
    p.need(cfg.log_first >= 0, f"log_first={cfg.log_first} must be >= 0")
    p.need(cfg.keep_checkpoints >= 1, f"keep_checkpoints={cfg.keep_checkpoints} must be >= 1")
    p.need(cfg.checkpoints or not cfg.resume, "resume=true needs checkpoints=true (there is nothing to resume from)")
    p.need(
        not (cfg.resume and cfg.overwrite),
        "resume=true and overwrite=true contradict each other: "
        "resume continues the run in out_dir, overwrite deletes it",
    )
    p.need(bool(cfg.out_dir.strip()), "out_dir='' is empty")


def _check_early_stopping(cfg: KDConfig, p: _Problems) -> None:
    p.choice("es_monitor")
    p.choice("es_mode")
    p.need(cfg.es_patience >= 1, f"es_patience={cfg.es_patience} must be >= 1")
    p.need(
        math.isfinite(cfg.es_min_delta) and cfg.es_min_delta >= 0,
        f"es_min_delta={cfg.es_min_delta} must be >= 0",
    )
    p.need(cfg.es_warmup_steps >= -1, f"es_warmup_steps={cfg.es_warmup_steps} must be >= 0, or -1 for auto")
    p.need(
        math.isfinite(cfg.es_abort_threshold) and cfg.es_abort_threshold >= 0,
        f"es_abort_threshold={cfg.es_abort_threshold} must be >= 0 (0 = off)",
    )


def _check_runtime(cfg: KDConfig, p: _Problems) -> None:
    for name in ("device", "teacher_dtype", "autocast_dtype", "distributed"):
        p.choice(name)


def _check_correction(cfg: KDConfig, p: _Problems) -> None:
    p.need(cfg.correct_rank >= 1, f"correct_rank={cfg.correct_rank} must be >= 1")
    p.need(cfg.correct_alpha >= 1, f"correct_alpha={cfg.correct_alpha} must be >= 1")
    p.need(
        any(m.strip() for m in cfg.correct_targets.split(",")),
        f"correct_targets={cfg.correct_targets!r} names no layer; list the layers to adapt, e.g. q_proj,v_proj",
    )
    p.need(cfg.correct_steps >= 1, f"correct_steps={cfg.correct_steps} must be >= 1")
    p.need(math.isfinite(cfg.correct_lr) and cfg.correct_lr > 0, f"correct_lr={cfg.correct_lr} must be > 0")


# one check per section of KDConfig, in the order of GROUPS (the order their messages are joined in)
_SECTION_CHECKS: tuple[Callable[[KDConfig, _Problems], None], ...] = (
    _check_data,
    _check_models,
    _check_loss,
    _check_curriculum,
    _check_on_policy,
    _check_optimisation,
    _check_evaluation,
    _check_early_stopping,
    _check_runtime,
    _check_correction,
)


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
