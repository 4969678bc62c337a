"""Teacher correction: a LoRA adapter that teaches the teacher the corpus before it teaches a student.

A teacher that has never read the corpus hands the student its own mistakes about it. Minitron
(Sreenivas et al. 2024) fine-tunes the teacher on the distillation data first ("teacher correction");
torchtune's KD tutorial does the same. Here the teacher stays frozen and a low-rank adapter (peft
LoRA, Hu et al. 2021) learns the correction: W x + (alpha / r) B A x on the chosen projections, B = 0
at the start, so step 0 is exactly the teacher.

    kdlab correct-teacher --correct-steps 120 --correct-out runs/correct-teacher
    report = correct_teacher(cfg)     # validation/test perplexity before and after, the adapter's path

The loop is the plain LM loss (kdlab.loss.divergences.lm_loss) over the training split in the run's block
order, AdamW on the adapter only, kdlab's warmup + cosine schedule; a checkpoint every `save_every`
steps (adapter, optimizer, schedule, RNG) so `--resume` continues exactly. The adapter is written
in fp16 (half the bytes; the perplexity "after" is measured on the teacher merged from that fp16
file, the same way `kdlab prepare` merges it, so the figure describes what is shipped).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from kdlab.config import KDConfig
from kdlab.data.corpus import epoch_order, prepare_data
from kdlab.errors import KDLabError
from kdlab.loss.divergences import lm_loss, next_token_labels
from kdlab.models import ADAPTER_FILE, load_teacher, load_tokenizer, merge_adapter, quiet_peft
from kdlab.precision import Precision, describe_device, resolve_precision
from kdlab.training.evaluation import evaluate
from kdlab.training.schedule import lr_scheduler

log = logging.getLogger("kdlab")

SAMPLE_SETTINGS = dict(sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1, max_new_tokens=40, seed=0)


def lora_config(cfg: KDConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.correct_rank,
        lora_alpha=cfg.correct_alpha,
        target_modules=[m.strip() for m in cfg.correct_targets.split(",") if m.strip()],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _perplexities(model, data, cfg: KDConfig, precision: Precision) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in ("validation", "test"):
        m = evaluate(model, None, data[split].eval_batches(cfg.batch_size, cfg.eval_batches), precision)
        out[split], out[f"{split}_tokens"] = round(m["student_ppl"], 4), m["tokens"]
    return out


def _samples(model, tokenizer, cfg: KDConfig, precision: Precision) -> list[dict[str, str]]:
    from kdlab.generation import generate, held_out_prompts

    prompts = held_out_prompts(cfg.data, cfg.data_dir, n=4)
    return [
        {"prompt": c.prompt, "text": c.text}
        for c in generate(model, tokenizer, prompts, precision=precision, **SAMPLE_SETTINGS)
    ]


def _save_checkpoint(folder: Path, model, optimizer, scheduler, step: int) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, tmp / "adapter.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
        },
        tmp / "state.pt",
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_checkpoint(folder: Path, model, optimizer, scheduler) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(folder / "adapter.safetensors"))
    state = torch.load(folder / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def save_adapter(model, lcfg, folder: Path) -> Path:
    """The adapter's weights in fp16 safetensors plus peft's adapter_config.json, in `folder`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    lcfg.save_pretrained(str(folder))
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, folder / ADAPTER_FILE)
    return folder / ADAPTER_FILE


def correct_teacher(cfg: KDConfig, progress: bool = True) -> dict[str, Any]:
    """Train the LoRA correction of `cfg.teacher` on `cfg.data`'s training split; returns the report
    (also written to correct_out/meta.json) and leaves the adapter in correct_out/adapter/."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    out = Path(cfg.correct_out)
    ckpt = out / "checkpoint"
    if not cfg.resume and out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise KDLabError(
                f"correct_out={str(out)!r} already holds a correction; continue it with --resume, replace it with "
                f"--overwrite, or choose another --correct-out"
            )
        shutil.rmtree(out)
    if cfg.resume and not (ckpt / "state.pt").is_file():
        raise KDLabError(f"--resume: correct_out={str(out)!r} has no checkpoint to continue from")
    out.mkdir(parents=True, exist_ok=True)

    # the base stays fp32 (135M parameters: no reason to round it); bf16 autocast on CUDA
    precision = resolve_precision(cfg.device, "float32", cfg.autocast_dtype)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher, cfg.data_dir)
    base = load_teacher(cfg.teacher, cfg.data_dir, precision)
    data = prepare_data(cfg.data, cfg.data_dir, tokenizer, cfg.seq_len)
    train = data["train"] if not cfg.train_blocks else data["train"].head(cfg.train_blocks)
    lcfg = lora_config(cfg)
    before_path = out / "before.json"
    if before_path.is_file():  # measured by the run being resumed
        before = json.loads(before_path.read_text())
    else:
        log.info("measuring the teacher before correction (%s)", cfg.teacher)
        before = {"perplexity": _perplexities(base, data, cfg, precision)}
        before["samples"] = _samples(base, tokenizer, cfg, precision)
        before_path.write_text(json.dumps(before, indent=1))
    log.info(
        "before: validation ppl %.2f, test ppl %.2f", before["perplexity"]["validation"], before["perplexity"]["test"]
    )

    try:
        with quiet_peft():
            model = get_peft_model(base.requires_grad_(False), lcfg)
    except ValueError as e:  # e.g. a target module the model does not have
        raise KDLabError(f"correct_targets={cfg.correct_targets!r}: {str(e).splitlines()[0]}") from None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.correct_lr, weight_decay=0.0, betas=(0.9, 0.95))
    scheduler = lr_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.correct_steps)
    step = _load_checkpoint(ckpt, model, optimizer, scheduler) if cfg.resume else 0
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = max(1, len(train) // per_step)
    log.info(
        "LoRA r=%d alpha=%d on %s: %.2fM trainable parameters; %d steps of %d x %d tokens, lr %g",
        cfg.correct_rank,
        cfg.correct_alpha,
        cfg.correct_targets,
        n_params / 1e6,
        cfg.correct_steps,
        per_step,
        cfg.seq_len,
        cfg.correct_lr,
    )
    t0, seconds_before = time.perf_counter(), 0.0
    if cfg.resume and (out / "progress.json").is_file():
        seconds_before = json.loads((out / "progress.json").read_text())["seconds"]
    bar = tqdm(total=cfg.correct_steps, initial=step, desc="correct-teacher", disable=not progress)
    while step < cfg.correct_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        order = epoch_order(len(train), cfg.seed, epoch)[pos * per_step : (pos + 1) * per_step]
        loss_sum = 0.0
        for micro in order.split(cfg.batch_size):
            batch = {k: v.to(precision.device) for k, v in train.batch(micro).items()}
            with precision.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = lm_loss(logits, next_token_labels(batch["labels"])) / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(lm=f"{loss_sum:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.correct_steps:
            _save_checkpoint(ckpt, model, optimizer, scheduler, step)
            seconds = seconds_before + time.perf_counter() - t0
            (out / "progress.json").write_text(json.dumps({"step": step, "seconds": seconds}))
    bar.close()
    train_seconds = seconds_before + time.perf_counter() - t0

    adapter_dir = out / "adapter"
    save_adapter(model, lcfg, adapter_dir)
    # "after" is measured on the teacher merged from the fp16 file, exactly as `kdlab prepare` builds it
    merged = merge_adapter(load_teacher(cfg.teacher, cfg.data_dir, precision), adapter_dir)
    after = {
        "perplexity": _perplexities(merged, data, cfg, precision),
        "samples": _samples(merged, tokenizer, cfg, precision),
    }
    from kdlab.manifest import sha256_file

    report = {
        "teacher": cfg.teacher,
        "data": cfg.data,
        "commit": _git_commit(),
        "device": describe_device(precision.device),
        "rank": cfg.correct_rank,
        "alpha": cfg.correct_alpha,
        "targets": cfg.correct_targets,
        "trainable_parameters": n_params,
        "steps": cfg.correct_steps,
        "tokens": cfg.correct_steps * per_step * cfg.seq_len,
        "lr": cfg.correct_lr,
        "seed": cfg.seed,
        "train_seconds": round(train_seconds, 1),
        "eval_tokens": {k: before["perplexity"][f"{k}_tokens"] for k in ("validation", "test")},
        "before": before,
        "after": after,
        "sample_settings": SAMPLE_SETTINGS,
        "adapter_bytes": os.path.getsize(adapter_dir / ADAPTER_FILE),
        "adapter_sha256": sha256_file(adapter_dir / ADAPTER_FILE),
    }
    (adapter_dir / "meta.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info(
        "after %d steps (%.0f s): validation ppl %.2f -> %.2f, test ppl %.2f -> %.2f; adapter %s (%.1f MB)",
        cfg.correct_steps,
        train_seconds,
        before["perplexity"]["validation"],
        after["perplexity"]["validation"],
        before["perplexity"]["test"],
        after["perplexity"]["test"],
        adapter_dir,
        report["adapter_bytes"] / 1e6,
    )
    if not math.isfinite(after["perplexity"]["validation"]):
        raise KDLabError("the corrected teacher's validation perplexity is not finite; lower --correct-lr")
    return report


__all__ = ["correct_teacher", "merge_adapter", "lora_config", "save_adapter", "SAMPLE_SETTINGS"]
