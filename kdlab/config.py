"""Run configuration: one flat dataclass, validated on construction, loadable from YAML.

Precedence is defaults < YAML file < explicit overrides (the CLI's flags). Unknown keys are
errors, never silently ignored: a typo such as `alpha_dk: 0` would otherwise train a different
model than the user asked for.

    cfg = load_config("run.yaml", {"batch_size": 2, "epochs": 3})
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .curriculum import PRESETS, parse_ramps
from .early_stopping import METRICS
from .errors import KDLabError
from .losses import DIVERGENCES

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULERS = ("cosine", "linear", "constant")
LOG_STYLES = ("concise", "seed-verbose")
STUDENT_INITS = ("random", "teacher-layers")


@dataclass
class KDConfig:
    # --- data -------------------------------------------------------------------------------
    data: str = "austen"  # "austen" (built at set-up), text file(s)/folder, or an HF dataset name
    data_dir: str = "data"  # corpus, converted teacher and token caches live here
    seq_len: int = 256  # tokens per packed training block
    # train on the first N training blocks only (0 = all): a small corpus, e.g. to see overfitting
    train_blocks: int = 0

    # --- models -----------------------------------------------------------------------------
    teacher: str = "smollm2-135m"  # built-in name, local folder or HF id
    student: str = "small"  # size preset (see kdlab.models.STUDENT_PRESETS), local folder or HF id
    student_init: str = "teacher-layers"  # "random" or copy evenly spaced teacher layers

    # --- loss -------------------------------------------------------------------------------
    alpha_kd: float = 0.5  # total = alpha_kd * KD + (1 - alpha_kd) * LM
    temperature: float = 1.0  # KD temperature T; the KD term is scaled by T^2 (Hinton et al. 2015)
    kd_top_k: int = 0  # 0 = full vocabulary; k > 0 = teacher top-k plus one tail bucket
    kd_divergence: str = "forward_kl"  # forward_kl, reverse_kl (MiniLLM) or jsd (GKD's generalised JSD)
    jsd_beta: float = 0.5  # JSD mixture weight on the teacher, in (0, 1)
    # intermediate terms (kdlab.terms); weight 0 = not computed, and no hidden states/attentions
    w_feature: float = 0.0  # router-mixed feature loss, per student block
    w_attention: float = 0.0  # MiniLM attention KL of mapped blocks (switches to eager attention)
    w_layerwise: float = 0.0  # LN-MSE of projected student blocks vs uniformly mapped teacher blocks
    w_contrastive: float = 0.0  # InfoNCE of pooled last states across the batch
    feature_loss: str = "ln_mse"  # ln_mse (scale-free, in [0, 4]) or cosine
    router_experts: int = 4  # teacher blocks each router chooses from (evenly spaced)
    router_top_k: int = 2  # experts mixed per token
    router_balance: float = 0.1  # weight of the load-balancing term inside the feature term (0.01 let routers collapse)
    contrastive_tau: float = 0.1
    adaptive_balance: bool = False  # divide each term by an EMA of its magnitude
    balance_momentum: float = 0.99
    grad_share_every: int = 0  # every N steps log each term's share of the student's grad norm (0 = off)
    logit_projection: str = "align"  # vocabularies of different size: align by id, or "learned" (student side)
    loss_chunk_tokens: int = 128  # rows of [tokens x vocab] upcast to fp32 at a time (fastest on CPU)
    # folder of a cached teacher (kdlab cache-teacher): KD reads the teacher's stored top-k instead
    # of running its forward in each step; needs kd_top_k > 0 and no intermediate terms ("" = live)
    teacher_cache: str = ""

    # --- curriculum (kdlab.curriculum): each weight above is the maximum its ramp reaches ---------
    curriculum: str = "seed"  # seed (the write-up's table), seed-phases (its earlier schedule), constant
    # per-term overrides of the preset, e.g. {feature: {start: 0.1, end: 0.4, shape: cosine}}
    ramps: dict[str, Any] = field(default_factory=dict)

    # --- optimisation -----------------------------------------------------------------------
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    # optimizer steps; > 0 overrides `epochs` (as in HF TrainingArguments), -1 = train `epochs`.
    # load_config: giving `epochs` without `max_steps` means -1, so `--epochs 3` trains 3 epochs.
    max_steps: int = 40
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 4
    lr_scheduler: str = "cosine"
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    max_nonfinite_steps: int = 5  # stop after this many skipped (non-finite loss) steps in a row

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = 20  # optimizer steps between evaluations (0 = only before and after)
    eval_batches: int = 4  # micro-batches per evaluation (0 = the whole split)
    log_every: int = 100  # optimizer steps per log line (interval means; no per-step host sync)
    log_first: int = 3  # also log each of the first N steps
    log_style: str = "concise"  # or "seed-verbose": the seed's ~36 lines per step, to measure its cost
    save_every: int = 20  # optimizer steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    checkpoints: bool = True  # false: no resumable checkpoints (sweeps, the course); final/ and best/ still written
    out_dir: str = "runs/default"
    resume: bool = False  # continue from out_dir's latest checkpoint

    # --- early stopping (kdlab.early_stopping): patience counts evaluations ----------------------
    early_stopping: bool = True
    es_monitor: str = "val_kl"  # val_kl (KL(teacher || student), T = 1) or val_ce: fixed definitions
    es_patience: int = 20
    es_min_delta: float = 0.001
    es_mode: str = "min"
    es_warmup_steps: int = -1  # checks before this step never count against patience; -1 = the LR warmup (warmup_steps)
    es_divergence: float = 0.0  # stop at once when the metric passes this value (0 = off)
    restore_best: bool = True  # end with the weights of the best evaluation

    # --- runtime ----------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    teacher_dtype: str = "auto"  # auto = float16 on CUDA (the seed's set-up), float32 on CPU
    autocast_dtype: str = "auto"  # student compute: auto = bf16/fp16 autocast on CUDA, off on CPU
    compile: bool = False  # torch.compile the training step's student and teacher forwards (first steps compile)

    def __post_init__(self) -> None:
        _coerce_types(self)
        errors = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            need(value in allowed, f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")

        need(bool(self.data.strip()), "data='' is empty; give 'austen', a text file/folder or an HF dataset name")
        need(self.seq_len >= 2, f"seq_len={self.seq_len} must be >= 2 (one token to read, one to predict)")
        need(self.train_blocks >= 0, f"train_blocks={self.train_blocks} must be >= 0 (0 = every training block)")
        need(bool(self.teacher.strip()), "teacher='' is empty; give 'smollm2-135m', a local folder or an HF id")
        need(bool(self.student.strip()), "student='' is empty; give a size preset, a local folder or an HF id")
        choice("student_init", STUDENT_INITS)
        need(0.0 <= self.alpha_kd <= 1.0, f"alpha_kd={self.alpha_kd} must be in [0, 1]")
        need(math.isfinite(self.temperature) and self.temperature > 0,
             f"temperature={self.temperature} must be a positive number (1.0 is the usual choice for LMs)")
        need(self.kd_top_k >= 0, f"kd_top_k={self.kd_top_k} must be >= 0 (0 = full vocabulary)")
        choice("kd_divergence", DIVERGENCES)
        need(0.0 < self.jsd_beta < 1.0, f"jsd_beta={self.jsd_beta} must be in (0, 1)")
        if self.teacher_cache:
            need(self.kd_top_k > 0, f"teacher_cache={self.teacher_cache!r} needs kd_top_k > 0 (the cache stores the "
                                    f"teacher's top-k), but kd_top_k={self.kd_top_k}")
            active = [f"{n}={getattr(self, n)}" for n in ("w_feature", "w_attention", "w_layerwise", "w_contrastive")
                      if getattr(self, n) > 0]
            need(not active, f"teacher_cache={self.teacher_cache!r} holds the teacher's logits only, but "
                             f"{', '.join(active)} needs its hidden states or attention maps; set those weights to 0 "
                             f"or teacher_cache=''")
        need(self.loss_chunk_tokens >= 1, f"loss_chunk_tokens={self.loss_chunk_tokens} must be >= 1")
        for name in ("w_feature", "w_attention", "w_layerwise", "w_contrastive", "router_balance"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, f"{name}={value} must be >= 0")
        choice("feature_loss", ("ln_mse", "cosine"))
        choice("logit_projection", ("align", "learned"))
        need(self.router_experts >= 1, f"router_experts={self.router_experts} must be >= 1")
        need(1 <= self.router_top_k <= self.router_experts,
             f"router_top_k={self.router_top_k} must be in [1, router_experts={self.router_experts}]")
        need(math.isfinite(self.contrastive_tau) and self.contrastive_tau > 0,
             f"contrastive_tau={self.contrastive_tau} must be > 0")
        need(0.0 <= self.balance_momentum < 1.0, f"balance_momentum={self.balance_momentum} must be in [0, 1)")
        need(self.grad_share_every >= 0, f"grad_share_every={self.grad_share_every} must be >= 0")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        need(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        need(self.max_steps == -1 or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1, or -1 for no cap")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr} must be a positive number")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        choice("lr_scheduler", SCHEDULERS)
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        need(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1")
        for name in ("eval_every", "eval_batches", "save_every"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        need(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        need(self.log_first >= 0, f"log_first={self.log_first} must be >= 0")
        choice("log_style", LOG_STYLES)
        choice("curriculum", tuple(PRESETS))
        try:
            parse_ramps(self.ramps)
        except KDLabError as e:
            errors.append(str(e))
        choice("es_monitor", tuple(METRICS))
        choice("es_mode", ("min", "max"))
        need(self.es_patience >= 1, f"es_patience={self.es_patience} must be >= 1")
        need(math.isfinite(self.es_min_delta) and self.es_min_delta >= 0, f"es_min_delta={self.es_min_delta} must be >= 0")
        need(self.es_warmup_steps >= -1, f"es_warmup_steps={self.es_warmup_steps} must be >= 0, or -1 for auto")
        need(math.isfinite(self.es_divergence) and self.es_divergence >= 0,
             f"es_divergence={self.es_divergence} must be >= 0 (0 = off)")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        need(self.checkpoints or not self.resume, "resume=true needs checkpoints=true (there is nothing to resume from)")
        need(bool(self.out_dir.strip()), "out_dir='' is empty")
        choice("device", DEVICES)
        choice("teacher_dtype", DTYPES)
        choice("autocast_dtype", DTYPES)
        if errors:
            raise KDLabError("; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(KDConfig)}
_TYPES = typing.get_type_hints(KDConfig)


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
        raise KDLabError(
            f"unknown config key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(FIELDS)}"
        )
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


__all__ = ["KDConfig", "load_config", "save_config", "config_from_dict", "parse_value", "FIELDS"]
