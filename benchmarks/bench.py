"""kdlab's performance figures, each measured side by side in one run.

    python benchmarks/bench.py                  # every section that fits this machine
    python benchmarks/bench.py loss trainer     # some sections
    python benchmarks/bench.py loss --tokens 4096

Sections (see benchmarks/RESULTS.md for recorded figures and the machines they came from):

  loss     KD loss forward+backward at V = 49,152: the plain autograd version (whole [N, V] fp32
           tensors, `kdlab.loss.divergences.kd_loss_reference`) against kdlab's chunked `kd_loss`, full and
           top-k 256. Each variant runs in a fresh child process, so one's allocations cannot hide
           in another's peak.
  fused    KD + LM from the student's final hidden states and output projection (D = 576, V = 49,152):
           plain autograd on the full logits, kdlab's chunked losses on the full logits (the path the
           trainer takes today) and kdlab.loss.fused (no [N, V] tensor); peak memory above the inputs
           (hidden states and weights), the logits, their gradients and dL/dW (V x D) included.
  step     a whole default-pair training step at B16 x T256: peak RSS and time, the logits path against
           the fused loss, each in a fresh process, alternating.
  trainer  time per step of the kdlab Trainer against a minimal hand-written PyTorch loop doing the
           same forward and backward (KD+LM) on the default pair, the two taking turns step by step;
           then all six terms against KD+LM, with a profile of where a step's time goes.
  cache    the teacher cached on disk (kdlab.data.teacher_cache): its top-256, and its final hidden
           states in bfloat16 and float32; bytes a token, build time, then time per step against the
           live teacher, same run otherwise, taking turns, and each cache's KD against the live one.
  engine   2 processes under torchrun at the default global batch B4 x T256: DDP against FSDP2,
           taking turns (relaunches itself under torchrun).
  flops    (CPU) the default step's achieved GFLOP/s against the rate of its own matrix products run
           alone (the shapes read from the profiler), and where the rest of the step's time goes.
  cuda     (CUDA only) tokens/s, peak memory and MFU of the default pair, eager and torch.compile,
           and the largest batch that fits.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs), both measured above what was allocated before the
measured call (the inputs). Times are medians of repeated calls after a warm-up; arms that are
compared take turns step by step, because this kind of machine drifts by 20% within minutes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop lines in the output
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VOCAB = 49_152  # SmolLM2's vocabulary
GiB, MiB = 2**30, 2**20


# ------------------------------------------------------------------------------------ measuring
class PeakMemory:
    """Peak memory allocated above the level at `start()`: CUDA allocator or the CPU process's RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def _cpu(self, field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = self._cpu("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._cpu("VmHWM") - self.base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return f"CPU {model.group(1) if model else '?'} ({os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------ 1. KD loss
LOSS_VARIANTS = ("naive", "chunked", "top-k 256")
# glibc serves large blocks from its heap once a freed mmap raised its threshold, and keeps them:
# the resident set would then count freed memory. A fixed threshold returns every large block at
# free, so the peak RSS is the peak of live allocations (what CUDA's allocator counter reports).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _loss_child(variant: str, n: int, device: str, repeats: int, half: bool, mode: str) -> dict:
    """One variant on (n, V) logits: peak memory of one forward+backward ("mem") or its median time
    over `repeats` calls after a warm-up ("time"). `half`: bf16 student and fp16 teacher logits, as
    the CUDA precision policy produces them; else fp32 (the CPU policy)."""
    from kdlab.loss.divergences import kd_loss, kd_loss_reference

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    # logits of a plausible size (std 3): student and teacher differ, as early in training
    s = torch.randn(n, VOCAB, device=dev, generator=g).mul_(3)
    t = torch.randn(n, VOCAB, device=dev, generator=g).mul_(3)
    if half:
        s, t = s.to(torch.bfloat16), t.to(torch.float16)
    s.requires_grad_(True)
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    mask[255::256] = False  # the last position of each 256-token block has no target

    def step():
        if variant == "naive":
            loss = kd_loss_reference(s, t, mask)
        else:
            loss = kd_loss(s, t, mask, top_k=256 if variant == "top-k 256" else 0)
        loss.backward()
        return loss

    meter = PeakMemory(dev)
    step()  # warm-up: allocator, kernels, thread pools
    times, peak = [], 0
    for _ in range(1 if mode == "mem" else repeats):
        s.grad = None
        sync(dev)
        meter.start()
        t0 = time.perf_counter()
        loss = step()
        sync(dev)
        times.append(time.perf_counter() - t0)
        peak = max(peak, meter.peak())
    return {
        "peak": peak,
        "time": statistics.median(times),
        "loss": loss.item(),
        "grad_norm": s.grad.float().norm().item(),
    }


def _vs_naive(rows: dict, r: dict) -> tuple[str, str]:
    """Peak memory and time of row `r` relative to the "naive" row ("-" before it exists)."""
    base = rows.get("naive")
    return (f"{r['peak'] / base['peak']:.1%}", f"{r['time'] / base['time']:.2f}x") if base else ("-", "-")


def bench_loss(args) -> None:
    dev = torch.device(args.device)
    print(f"\n## 1. KD loss, V = {VOCAB:,}, forward + backward ({device_name(dev)})")
    print(
        "peak: memory allocated above the inputs (student and teacher logits), including the [N, V] gradient; "
        f"time: median of {args.repeats} calls"
    )
    print(
        f"{'logits':<26} {'tokens':>6} {'variant':<10} {'peak MiB':>9} {'vs naive':>8} {'time s':>8} "
        f"{'vs naive':>8} {'loss':>10} {'|grad|':>10}"
    )
    for half in (False, True):
        dtypes = "bf16 student, fp16 teacher" if half else "fp32"
        for n in args.tokens:
            fp32_tensor = n * VOCAB * 4
            rows = {}
            for variant in LOSS_VARIANTS:
                # the naive version's peak is 5 fp32 [N, V] tensors above its inputs (measured at every N
                # that fits); skip it, with 10% to spare, where that cannot fit in this machine's memory
                inputs = fp32_tensor if half else 2 * fp32_tensor
                need = 1.1 * (5 * fp32_tensor + inputs)
                if variant == "naive" and dev.type == "cpu" and need > _available_memory():
                    print(
                        f"{dtypes:<26} {n:>6} {variant:<10} not run: needs ~{need / GiB:.0f} GiB, "
                        f"{_available_memory() / GiB:.0f} GiB available"
                    )
                    continue
                r = {}
                for mode in ("mem", "time"):
                    cmd = [
                        sys.executable,
                        __file__,
                        "_loss_child",
                        variant,
                        str(n),
                        args.device,
                        str(args.repeats),
                        str(int(half)),
                        mode,
                    ]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV if mode == "mem" else None)
                    if out.returncode:
                        r = {"error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
                        break
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    r["peak" if mode == "mem" else "time"] = res[mode if mode == "time" else "peak"]
                    r.update(loss=res["loss"], grad_norm=res["grad_norm"])
                if "error" in r:
                    print(f"{dtypes:<26} {n:>6} {variant:<10} failed: {r['error']}")
                    continue
                rows[variant] = r
                rel_mem, rel_t = _vs_naive(rows, r)
                print(
                    f"{dtypes:<26} {n:>6} {variant:<10} {r['peak'] / MiB:>9,.0f} {rel_mem:>8} {r['time']:>8.3f} "
                    f"{rel_t:>8} {r['loss']:>10.6f} {r['grad_norm']:>10.6f}",
                    flush=True,
                )
        print(f"(one [N, V] fp32 tensor: {', '.join(f'{n * VOCAB * 4 / MiB:,.0f} MiB at N={n}' for n in args.tokens)})")


# ------------------------------------------------------------------------------------ 1b. fused loss
FUSED_VARIANTS = ("naive", "chunked", "fused")
HIDDEN = 576  # SmolLM2-135M's width (teacher and student)


def _fused_child(variant: str, n: int, device: str, repeats: int, mode: str) -> dict:
    """One variant of 0.5 KD + 0.5 LM from (n, D) hidden states: peak memory of one forward+backward
    ("mem") or its median time ("time"), fp32 (the CPU policy)."""
    import torch.nn.functional as F

    from kdlab.loss.divergences import kd_loss, kd_loss_reference, lm_loss
    from kdlab.loss.fused import fused_linear_kd_lm

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, HIDDEN, device=dev, generator=g).requires_grad_(True)
    w = (torch.randn(VOCAB, HIDDEN, device=dev, generator=g) * 0.1).requires_grad_(True)
    th = torch.randn(n, HIDDEN, device=dev, generator=g)
    tw = torch.randn(VOCAB, HIDDEN, device=dev, generator=g) * 0.1
    targets = torch.randint(0, VOCAB, (n,), device=dev, generator=g)
    targets[255::256] = -100  # the last position of each 256-token block has no target
    mask = targets != -100

    def step():
        if variant == "fused":
            loss = fused_linear_kd_lm(h[None], w, (th[None], tw), targets[None]).total
        else:
            s, t = h @ w.T, th @ tw.T  # the [N, V] logits
            if variant == "naive":
                kd = kd_loss_reference(s, t, mask)
                lm = F.cross_entropy(s, targets, ignore_index=-100)
            else:
                kd, lm = kd_loss(s[None], t[None], mask[None]), lm_loss(s[None], targets[None])
            loss = 0.5 * kd + 0.5 * lm
        loss.backward()
        return loss

    meter = PeakMemory(dev)
    step()
    times, peak = [], 0
    for _ in range(1 if mode == "mem" else repeats):
        h.grad = w.grad = None
        sync(dev)
        meter.start()
        t0 = time.perf_counter()
        loss = step()
        sync(dev)
        times.append(time.perf_counter() - t0)
        peak = max(peak, meter.peak())
    return {"peak": peak, "time": statistics.median(times), "loss": loss.item(), "grad_norm": w.grad.norm().item()}


def bench_fused(args) -> None:
    dev = torch.device(args.device)
    print(f"\n## 1b. KD + LM from hidden states, D = {HIDDEN}, V = {VOCAB:,}, fp32 ({device_name(dev)})")
    print(
        "peak: memory allocated above the inputs (hidden states, weights), logits, their gradients and dL/dW "
        f"included; time: median of {args.repeats} calls, forward + backward"
    )
    print(f"{'tokens':>6} {'variant':<8} {'peak MiB':>9} {'vs naive':>8} {'time s':>8} {'vs naive':>8} {'loss':>10}")
    for n in args.tokens:
        rows = {}
        for variant in FUSED_VARIANTS:
            # the naive version's peak: 7 fp32 [N, V] tensors (measured: 5,376 MiB at N = 4,096), plus
            # about 1 GiB for the process and its inputs; at N = 16,384 that is 22 GiB, which a quiet
            # 24 GiB machine has
            need = 7 * n * VOCAB * 4 + GiB
            if variant == "naive" and dev.type == "cpu" and need > _available_memory():
                have = _available_memory() / GiB
                print(f"{n:>6} {variant:<8} not run: needs ~{need / GiB:.0f} GiB, {have:.0f} GiB available")
                continue
            r = {}
            for mode in ("mem", "time"):
                cmd = [sys.executable, __file__, "_fused_child", variant, str(n), args.device, str(args.repeats), mode]
                out = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV if mode == "mem" else None)
                if out.returncode:
                    r = {"error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
                    break
                res = json.loads(out.stdout.strip().splitlines()[-1])
                r[mode if mode == "time" else "peak"] = res["time" if mode == "time" else "peak"]
                r.update(loss=res["loss"])
            if "error" in r:
                print(f"{n:>6} {variant:<8} failed: {r['error']}")
                continue
            rows[variant] = r
            rel_mem, rel_t = _vs_naive(rows, r)
            print(
                f"{n:>6} {variant:<8} {r['peak'] / MiB:>9,.0f} {rel_mem:>8} {r['time']:>8.3f} {rel_t:>8} "
                f"{r['loss']:>10.6f}",
                flush=True,
            )
    print(f"(one [N, V] fp32 tensor: {', '.join(f'{n * VOCAB * 4 / MiB:,.0f} MiB at N={n}' for n in args.tokens)})")


# ------------------------------------------------------------------------------------ 1c. a whole step
def _step_child(fused: bool, batch: int, seq: int, device: str, steps: int) -> dict:
    """Peak RSS of whole default-pair training steps (`Trainer.step`), with the fused loss or the logits
    path, in a fresh process: the first step warms up, the next `steps` are measured (their time is
    measured elsewhere, without this process's allocator setting: see bench_step)."""
    import kdlab
    from kdlab.quiet import quiet_libraries

    quiet_libraries()
    over = {
        "device": device,
        "batch_size": batch,
        "seq_len": seq,
        "fused_loss": fused,
        "out_dir": str(ROOT / "runs" / "bench" / f"step-{int(fused)}"),
        "overwrite": True,
        "checkpoints": False,
        "early_stopping": False,
        "eval_every": 0,
        "log_first": 0,
        "log_every": 1000,
    }
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    assert trainer.objective.fused is fused, trainer.objective.fused_off
    dev = torch.device(device)
    meter = PeakMemory(dev)
    trainer.step()
    sync(dev)
    meter.start()
    for _ in range(steps):
        trainer.step()
    sync(dev)
    total = meter._cpu("VmHWM") if dev.type == "cpu" else torch.cuda.max_memory_allocated(dev)
    return {"peak_total": total, "peak_above": meter.peak()}


def bench_step(args) -> None:
    dev = torch.device(args.device)
    b, t = args.step_batch
    print(f"\n## 1c. A whole default-pair step, B{b} x T{t}, logits path against the fused loss ({device_name(dev)})")
    print("peak RSS: each path in a fresh process, the peak resident set during its measured steps and its rise")
    print("above the level before them, with glibc returning every allocation over 1 MiB at once (so the peak is")
    print("what the tensors hold); time: both paths in one process without that setting (it slows allocation-heavy")
    print(f"code, the fused loss's chunks more), taking turns step by step, {args.step_rounds} rounds, one warm-up")
    rss: dict[bool, dict] = {}
    for fused in (False, True):
        cmd = [sys.executable, __file__, "_step_child", str(int(fused)), str(b), str(t), args.device]
        out = subprocess.run([*cmd, str(args.steps_measured)], capture_output=True, text=True, env=CHILD_ENV)
        if out.returncode:
            print(f"fused={fused}: failed: {(out.stderr.strip().splitlines() or ['killed'])[-1]}")
            return
        rss[fused] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {'path':<14} {'peak RSS GB':>11} {'rise GB':>8}")
    for fused, label in ((False, "logits"), (True, "fused")):
        print(f"  {label:<14} {rss[fused]['peak_total'] / 1e9:>11.2f} {rss[fused]['peak_above'] / 1e9:>8.2f}")
    comp = args.components()
    names = {False: "logits path (fused_loss=false)", True: "fused loss (the default)"}
    arms = {names[f]: trainer_arm(comp, 10_000, batch_size=b, seq_len=t, fused_loss=f) for f in (False, True)}
    ratio = report(interleaved(arms, args.step_rounds, 1, dev), names[False], b * (t - 1))
    print(
        f"  -> fused / logits: peak RSS {rss[True]['peak_total'] / rss[False]['peak_total']:.2f}x, "
        f"time {ratio[names[True]]:.2f}x"
    )


def _available_memory() -> int:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024


# ------------------------------------------------------------------------------------ 2. trainer
ALL_SIX = {"w_feature": 0.5, "w_attention": 0.5, "w_layerwise": 0.5, "w_contrastive": 0.1, "curriculum": "constant"}


class Components:
    """The default pair and corpus, loaded once; every measured arm trains its own copy of the student."""

    def __init__(self, args):
        import kdlab
        from kdlab.build import build_components
        from kdlab.quiet import quiet_libraries

        quiet_libraries()
        self.args = args
        self.base = {
            "device": args.device,
            "out_dir": str(ROOT / "runs" / "bench"),
            "checkpoints": False,
            "early_stopping": False,
            "eval_every": 0,
            "eval_batches": 1,
            "save_every": 0,
            "log_first": 0,
        }
        cfg = kdlab.load_config(overrides=self.base)
        self.precision, self.tokenizer, self.teacher, self.data, self.student = build_components(cfg)
        self.batch_size, self.seq_len = cfg.batch_size, cfg.seq_len

    def trainer(self, data=None, teacher=None, **overrides):
        """A Trainer on a fresh copy of the initial student, ready for `step()` (what fit() loops over)."""
        import kdlab
        from kdlab.build import Parts

        cfg = kdlab.load_config(overrides={**self.base, **overrides})
        parts = Parts(
            self.precision, self.tokenizer, teacher or self.teacher, data or self.data, copy.deepcopy(self.student)
        )
        trainer = kdlab.build_trainer(cfg, parts=parts)
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        return trainer


def interleaved(arms: dict, steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each of `steps` calls per arm, the arms taking turns call by call (order reversed
    every round), so a machine that speeds up or slows down during the run affects them alike."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    times = {k: [] for k in arms}
    for i in range(steps):
        for name, fn in list(arms.items()) if i % 2 == 0 else list(arms.items())[::-1]:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def trainer_arm(comp: Components, steps: int, **kwargs):
    """One step of kdlab's Trainer as fit() runs it (batches, step, bookkeeping, one log line per
    `steps` steps), as a callable."""
    trainer = comp.trainer(max_steps=10_000, log_every=steps, **kwargs)
    return trainer.step


def minimal_loop_arm(comp: Components):
    """The same KD+LM step written by hand in plain PyTorch, as a callable: the default batches in
    the same order, student forward under the same precision, teacher forward without grad,
    0.5 KD + 0.5 LM with kdlab's loss functions, backward, clip to 1.0, fused AdamW, cosine schedule."""
    from transformers import get_scheduler

    from kdlab.data.corpus import epoch_order
    from kdlab.loss.divergences import IGNORE_INDEX, kd_loss, lm_loss, next_token_labels

    student, teacher, prec, train = copy.deepcopy(comp.student), comp.teacher, comp.precision, comp.data["train"]
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)
    sched = get_scheduler("cosine", opt, num_warmup_steps=4, num_training_steps=10_000)
    order, bs, step = epoch_order(len(train), 0, 0), comp.batch_size, [0]

    def one_step():
        i = step[0]
        step[0] += 1
        batch = train.batch(order[i * bs : (i + 1) * bs])
        ids = batch["input_ids"].to(prec.device)
        tgt = next_token_labels(batch["labels"]).to(prec.device)  # (B, T)
        mask = tgt != IGNORE_INDEX
        n = mask.sum()
        with prec.autocast():
            s_logits = student(input_ids=ids).logits  # (B, T, V)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        loss = 0.5 * kd_loss(s_logits, t_logits, mask, num_valid=n) + 0.5 * lm_loss(s_logits, tgt, num_valid=n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return one_step


def report(times: dict[str, list[float]], base: str, tokens: int) -> dict[str, float]:
    """Median seconds per step of each arm, its tokens/s, and its time against `base` as the median
    of the per-round ratios (the arms ran side by side in each round), with their quartiles."""
    print(f"  {'arm':<46} {'s/step':>7} {'tokens/s':>9} {'time ratio':>11} {'(quartiles)':>15}")
    out = {}
    for k, v in times.items():
        med = statistics.median(v)
        ratios = [a / b for a, b in zip(v, times[base])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[k] = statistics.median(ratios)
        print(f"  {k:<46} {med:>7.3f} {tokens / med:>9,.0f} {out[k]:>10.3f}x {f'({q1:.3f}-{q3:.3f})':>15}")
    print(f"  (time ratio: per round, the arm's step time over that of '{base}')")
    return out


def profile_steps(comp: Components, steps: int, teacher=None, **overrides) -> list[tuple[str, float]]:
    """Seconds per step in each of the trainer's named phases (kdlab.training.trainer.phase), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step = trainer_arm(comp, 10_000, teacher=teacher, **overrides)
    step()  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if comp.precision.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(comp.precision.device)
        wall = time.perf_counter() - t0
    rows = [
        (e.key.removeprefix("kdlab: "), e.cpu_time_total / 1e6 / steps)
        for e in prof.key_averages()
        if e.key.startswith("kdlab: ")
    ]
    rows.sort(key=lambda r: -r[1])
    return [*rows, ("step (wall)", wall / steps)]


def bench_trainer(args) -> None:
    comp = args.components()
    dev, n = comp.precision.device, args.steps
    tokens = comp.batch_size * (comp.seq_len - 1)
    print(
        f"\n## 2. Trainer overhead, default pair (SmolLM2-135M -> small, {comp.precision.describe()}), "
        f"B{comp.batch_size} x T{comp.seq_len}"
    )
    print(f"median of {n} steps per arm after {args.warmup} warm-up steps, the arms taking turns step by step")
    times = interleaved(
        {"minimal PyTorch loop, KD+LM": minimal_loop_arm(comp), "kdlab Trainer, KD+LM": trainer_arm(comp, n)},
        n,
        args.warmup,
        dev,
    )
    ratio = report(times, "minimal PyTorch loop, KD+LM", tokens)
    over = ratio["kdlab Trainer, KD+LM"] - 1
    print(f"  -> the kdlab Trainer takes {over:+.1%} time per step against the minimal loop")

    # attention transfer switches its models to eager attention: a teacher of its own for that arm
    six_teacher = copy.deepcopy(comp.teacher)
    times = interleaved(
        {
            "kdlab Trainer, KD+LM": trainer_arm(comp, n),
            "kdlab Trainer, all six terms": trainer_arm(comp, n, teacher=six_teacher, **ALL_SIX),
        },
        n,
        args.warmup,
        dev,
    )
    print("\nall six terms (KD, LM, feature, attention, layerwise, contrastive; constant weights) against KD+LM:")
    report(times, "kdlab Trainer, KD+LM", tokens)
    for label, teacher, overrides in (("KD+LM", None, {}), ("all six terms", six_teacher, ALL_SIX)):
        rows = profile_steps(comp, args.profile_steps, teacher=teacher, **overrides)
        wall = rows[-1][1]
        print(
            f"where a step's time goes, {label} (torch.profiler, mean of {args.profile_steps} steps; "
            f"the phases do not overlap; the rest of the wall time is batching and bookkeeping)"
        )
        for name, sec in rows:
            print(f"  {name:<26} {sec * 1e3:>9.1f} ms {sec / wall:>7.1%}")


# ------------------------------------------------------------------------------------ 3. cache
def bench_cache(args) -> None:
    from kdlab.data.corpus import PackedSplit
    from kdlab.data.teacher_cache import build_teacher_cache, cache_key

    comp = args.components()
    dev, n = comp.precision.device, args.steps
    tokens = comp.batch_size * (comp.seq_len - 1)
    blocks = comp.batch_size * (n + args.warmup)  # every step of the run reads blocks that are cached
    full = comp.data["train"]
    part = PackedSplit(full.input_ids[:blocks], full.attention_mask[:blocks])
    data = {**comp.data, "train": part}
    print(f"\n## 3. Cached teacher, default pair, B{comp.batch_size} x T{comp.seq_len} ({comp.precision.describe()})")
    kinds = {  # label -> (cache key, the run's settings)
        "top-256": (cache_key(part, comp.tokenizer, comp.teacher, 256, 1.0), {"kd_top_k": 256}),
        "hidden, bfloat16": (
            cache_key(part, comp.tokenizer, comp.teacher, kind="hidden", dtype="bfloat16"),
            {"teacher_cache_kind": "hidden", "teacher_cache_dtype": "bfloat16"},
        ),
        "hidden, float32": (
            cache_key(part, comp.tokenizer, comp.teacher, kind="hidden", dtype="float32"),
            {"teacher_cache_kind": "hidden", "teacher_cache_dtype": "float32"},
        ),
    }
    paths = {}
    print(f"caches of the first {blocks} training blocks ({blocks * comp.seq_len:,} tokens):")
    for label, (key, _) in kinds.items():
        paths[label] = ROOT / "runs" / "bench" / f"teacher-cache-{label.replace(', ', '-')}"
        t0 = time.perf_counter()
        cache = build_teacher_cache(paths[label], comp.teacher, part, key, device=dev)
        build = time.perf_counter() - t0
        whole_gib, whole_min = cache.bytes_per_token * len(full) * comp.seq_len / GiB, build / blocks * len(full) / 60
        print(
            f"  {label:<17} {cache.bytes_per_token:>6,.0f} bytes a token, built in {build:5.1f} s "
            f"({build / blocks * 1e3:.0f} ms a block); the whole Austen train split, {len(full):,} blocks: "
            f"{whole_gib:.2f} GiB, ~{whole_min:.0f} min"
        )
    arm = {label: dict(overrides, teacher_cache=str(paths[label])) for label, (_, overrides) in kinds.items()}
    print(f"median of {n} steps per arm after {args.warmup} warm-up steps, the arms taking turns step by step")
    times = interleaved(
        {
            "live teacher, full-vocabulary KD (default)": trainer_arm(comp, n, data=data),
            "live teacher, top-256 KD": trainer_arm(comp, n, data=data, kd_top_k=256),
            "top-256 cache, top-256 KD": trainer_arm(comp, n, data=data, **arm["top-256"]),
            "hidden cache (bf16), full-vocabulary KD": trainer_arm(comp, n, data=data, **arm["hidden, bfloat16"]),
            "hidden cache (fp32), full-vocabulary KD": trainer_arm(comp, n, data=data, **arm["hidden, float32"]),
        },
        n,
        args.warmup,
        dev,
    )
    ratio = report(times, "live teacher, full-vocabulary KD (default)", tokens)
    hidden = ratio["hidden cache (bf16), full-vocabulary KD"]
    print(
        f"  -> the hidden cache's steps are {1 / hidden:.2f}x as fast as the live teacher's with the same "
        f"(full-vocabulary) KD; the top-256 cache's {1 / ratio['top-256 cache, top-256 KD']:.2f}x, with top-256 KD"
    )
    print("KD of the first step's batch from each cache against the live teacher (the fused loss, same student):")
    for label, value in cache_kd_against_live(comp, data, arm).items():
        print(f"  {label:<17} {value}")
    for path in paths.values():
        shutil.rmtree(path)


def cache_kd_against_live(comp, data, arms: dict[str, dict]) -> dict[str, str]:
    """The KD and LM terms of one training batch with the teacher read from each cache, against the live
    teacher's (same student, same batch): the caches' equality figures at the benchmark's size."""

    @torch.no_grad()
    def first_terms(**overrides) -> dict[str, float]:
        t = comp.trainer(data=data, **overrides)
        loss = t.objective.loss(t.model, t.teacher, t.batches.next_step()[0], t.precision)
        return {k: float(loss.terms[k]) for k in ("kd", "lm")}

    live_full, live_top = first_terms(), first_terms(kd_top_k=256)
    out = {}
    for label, overrides in arms.items():
        live = live_top if "kd_top_k" in overrides else live_full
        got = first_terms(**overrides)
        out[label] = ", ".join(
            f"{k} {got[k]:.6f} vs {live[k]:.6f} (rel {abs(got[k] - live[k]) / abs(live[k]):.1e})" for k in ("kd", "lm")
        )
    return out


# ------------------------------------------------------------------------------------ 3c. engines
def bench_engine(args) -> None:
    """2 processes (torchrun, gloo on CPU) at the default pair's global batch B4 x T256: DDP against FSDP2,
    both trainers built in the same two processes and taking turns step by step."""
    if "WORLD_SIZE" not in os.environ:  # relaunch this section under torchrun; rank 0 prints
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
        cmd += ["engine", "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)), "TQDM_DISABLE": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out = [line for line in proc.stdout.splitlines() if not line.startswith("kdlab benchmark on")]
        print("\n".join(out))
        if proc.returncode != 0:
            sys.exit(f"engine section failed:\n{proc.stderr[-3000:]}")
        return
    comp = args.components()
    world, dev, n = int(os.environ["WORLD_SIZE"]), comp.precision.device, args.steps
    per_process = 4 // world
    tokens = per_process * world * (comp.seq_len - 1)
    print(
        f"\n## 3c. DDP against FSDP2, {world} processes ({'gloo' if dev.type == 'cpu' else 'nccl'}, "
        f"{os.environ.get('OMP_NUM_THREADS', '?')} threads each), default pair, global batch "
        f"B{per_process * world} x T{comp.seq_len} ({per_process} a process)"
    )
    print(f"median of {n} steps per arm after {args.warmup} warm-up steps, the arms taking turns step by step")
    arms = {
        "DDP (a full student and teacher a process)": trainer_arm(comp, n, batch_size=per_process),
        # fully_shard changes the modules in place: a teacher of its own
        "FSDP2 (student and teacher sharded)": trainer_arm(
            comp, n, teacher=copy.deepcopy(comp.teacher), batch_size=per_process, distributed="fsdp2"
        ),
    }
    ratio = report(interleaved(arms, n, args.warmup, dev), "DDP (a full student and teacher a process)", tokens)
    print(f"  -> an FSDP2 step takes {ratio['FSDP2 (student and teacher sharded)']:.2f}x the DDP step's time")


# ------------------------------------------------------------------------------------ 3b. CPU FLOP/s
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
OP_CLASSES = (  # where a step's time goes: the first class whose pattern is in the op's name
    ("matrix products", GEMM_OPS),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("softmax / log-softmax / exp (losses)", ("softmax", "aten::exp", "logsumexp")),
    ("optimizer (AdamW)", ("adam",)),
    (
        "copies, casts, layout",
        ("copy_", "aten::to", "contiguous", "clone", "cat", "index", "gather", "scatter", "fill"),
    ),
    (
        "elementwise (norms, SiLU, rotary, adds)",
        ("mul", "add", "sub", "div", "silu", "pow", "rsqrt", "mean", "neg", "sum", "where", "clamp", "sigmoid", "norm"),
    ),
)


def _gemm_flops(name: str, shapes: list) -> tuple[float, tuple] | None:
    """2 x M x K x N (x batch) of one matrix-product call, and the shapes that define it."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n, ("mm", m, k, n)
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n, ("mm", m, k, n)
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * a[2] * b[2], ("bmm", a[0], a[1], a[2], b[2])
    except (ValueError, IndexError, TypeError):
        return None
    return None


def _standalone_seconds(shape: tuple, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median seconds of one matrix product of this shape on fresh tensors (after a warm-up)."""
    if shape[0] == "mm":
        _, m, k, n = shape
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    else:
        _, bb, m, k, n = shape
        a, b = torch.randn(bb, m, k, dtype=dtype), torch.randn(bb, k, n, dtype=dtype)
        fn = lambda: torch.bmm(a, b)  # noqa: E731
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops_of(step, walls: list[float]) -> dict:
    """One arm of the flops section: its step's times (`walls`, measured without the profiler), its
    matrix products alone, its profile by class."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    gemm_flops, gemm_in_step, shapes = 0.0, 0.0, {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in GEMM_OPS and (got := _gemm_flops(e.key, e.input_shapes)) is not None:
            flops, shape = got
            gemm_flops += flops * e.count
            gemm_in_step += e.self_cpu_time_total / 1e6
            shapes[shape] = shapes.get(shape, 0) + e.count
    by_class: dict[str, float] = {}
    ops = [e for e in prof.key_averages() if not e.key.startswith(("kdlab: ", "ProfilerStep"))]
    for e in ops:
        cls = next((c for c, pats in OP_CLASSES if any(p in e.key.lower() for p in pats)), "other")
        by_class[cls] = by_class.get(cls, 0.0) + e.self_cpu_time_total / 1e6
    return {
        "wall": statistics.median(walls),
        "steps": len(walls),
        "gemm_flops": gemm_flops,
        "gemm_in_step": gemm_in_step,
        "calls": sum(shapes.values()),
        "shapes": len(shapes),
        "alone": sum(_standalone_seconds(sh, torch.float32) * n for sh, n in shapes.items()),
        "by_class": by_class,
        "profiled": sum(by_class.values()),
        "top": [(e.key, e.self_cpu_time_total / 1e6) for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]],
    }


def bench_flops(args) -> None:
    """The default step's achieved GFLOP/s against the rate of its own matrix products run alone; the
    fused loss (the default) and the logits path side by side."""
    comp = args.components()
    dev = comp.precision.device
    if dev.type != "cpu":
        print("\n## 3b. CPU FLOP/s: a CPU section (run with --device cpu)")
        return
    print(
        f"\n## 3b. The default CPU step's FLOP/s against its matrix products' own rate "
        f"(B{comp.batch_size} x T{comp.seq_len}, {comp.precision.describe()}, {torch.get_num_threads()} threads)"
    )
    print("matrix-product FLOPs from the profiler's shapes (2 M K N per call); 'alone': each shape timed on fresh")
    print(
        f"tensors (median of 5) x its calls; step: median of {args.flops_steps} steps after {args.warmup} warm-up, "
        "the arms taking turns step by step"
    )
    arms = {"fused loss (default)": {}, "logits path (fused_loss=false)": {"fused_loss": False}}
    steps = {name: trainer_arm(comp, 10_000, **over) for name, over in arms.items()}
    # the steps' times without the profiler, the arms taking turns (the machine drifts within minutes)
    walls = interleaved(steps, args.flops_steps, args.warmup, dev)
    got = {name: _flops_of(steps[name], walls[name]) for name in arms}
    print(
        f"  {'arm':<32} {'GFLOP':>6} {'step s':>7} {'GFLOP/s':>8} {'alone s':>8} {'GFLOP/s':>8} "
        f"{'reached':>8} {'in-step':>8}"
    )
    for name, r in got.items():
        g = r["gemm_flops"] / 1e9
        print(
            f"  {name:<32} {g:6.0f} {r['wall']:7.2f} {g / r['wall']:8.1f} {r['alone']:8.2f} {g / r['alone']:8.1f} "
            f"{r['alone'] / r['wall']:8.0%} {r['gemm_in_step'] / r['alone']:7.2f}x"
        )
    print(
        "  (reached = the step's GFLOP/s over its products' own rate; in-step = their time inside the step over alone)"
    )
    classes = list(
        dict.fromkeys(c for r in got.values() for c in sorted(r["by_class"], key=lambda c: -r["by_class"][c]))
    )
    print("where a profiled step's time goes (self time per operator class, the profiler's overhead included):")
    print(f"  {'class':<42} " + " ".join(f"{n[:20]:>20}" for n in got))
    for cls in classes:
        cells = [
            f"{r['by_class'].get(cls, 0.0):7.2f} s {r['by_class'].get(cls, 0.0) / r['profiled']:6.1%}"
            for r in got.values()
        ]
        print(f"  {cls:<42} " + " ".join(f"{c:>20}" for c in cells))
    for name, r in got.items():
        print(f"  largest operators, {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["top"]))


# ------------------------------------------------------------------------------------ 4. CUDA
# dense bf16/fp16 tensor-core peak of the SXM parts, from NVIDIA's datasheets (FLOP/s)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def matmul_params(model) -> int:
    """Weights that enter a matmul per token: all but the input embedding lookup (the output
    projection counts even when it is tied to the embedding)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p is not emb)
    return n + (out.numel() if out is emb else 0)


def flops_per_token(model, seq_len: int, training: bool) -> float:
    """PaLM's model-FLOPs count (Chowdhery et al. 2022, appendix B): 6N + 12 L H Q T per trained token,
    a third of it for a forward alone."""
    c = model.config
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * seq_len
    return (6 * matmul_params(model) + attn) * (1 if training else 1 / 3)


def bench_cuda(args) -> None:
    dev = torch.device(args.device)
    if dev.type != "cuda" and not args.dry_run:
        print("\n## 4. CUDA: not run (no CUDA device here; the figures in benchmarks/RESULTS.md name their GPU)")
        return
    comp = args.components()
    name = device_name(dev)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    seq = comp.data["train"].input_ids.shape[1]
    per_token = flops_per_token(comp.student, seq, True) + flops_per_token(comp.teacher, seq, False)
    print(f"\n## 4. CUDA: the default pair on {name} ({comp.precision.describe()}), T{seq}, KD+LM")
    print(
        f"model FLOPs per token: {per_token / 1e9:.2f} GFLOP (student 6N + attention, teacher forward 2N + "
        f"attention); MFU against {f'{peak / 1e12:.0f} TFLOP/s dense bf16' if peak else 'an unknown peak'}"
    )
    print(f"{'setting':<16} {'batch':>5} {'tokens/s':>10} {'peak MiB':>9} {'MFU':>6}")
    batches = (1, 2) if args.dry_run else (4, 32)
    for label, overrides in (("eager", {}), ("torch.compile", {"compile": True})):
        for b in batches:  # one arm at a time, so that the peak memory is this setting's own
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            arm = {label: trainer_arm(comp, args.steps, batch_size=b, **overrides)}
            tps = b * (seq - 1) / statistics.median(interleaved(arm, args.steps, args.warmup, dev)[label])
            mem = torch.cuda.max_memory_allocated() / MiB if dev.type == "cuda" else float("nan")
            mfu = f"{tps * per_token / peak:.1%}" if peak else "-"
            print(f"{label:<16} {b:>5} {tps:>10,.0f} {mem:>9,.0f} {mfu:>6}", flush=True)
            del arm
    if dev.type == "cuda":
        print(f"largest batch (x T{seq}) that trains 2 steps, eager: {largest_batch(comp)}")


def largest_batch(comp: Components) -> str:
    """Double the batch until a step runs out of memory, then bisect between the last two sizes."""

    def fits(b: int) -> bool:
        torch.cuda.empty_cache()
        trainer = None
        try:
            trainer = comp.trainer(batch_size=b, max_steps=2)
            for _ in range(2):
                trainer.train_step(trainer.batches.next_step())
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del trainer
            for p in comp.student.parameters():  # a step cut short leaves gradients behind
                p.grad = None
            torch.cuda.empty_cache()

    lo, hi = 0, 16
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > len(comp.data["train"]):
            return f">= {lo} (the training split has {len(comp.data['train'])} blocks)"
    while hi - lo > max(1, lo // 16):  # to within ~6%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    seq = comp.data["train"].input_ids.shape[1]
    return f"{lo} sequences ({lo * seq:,} tokens per step); {hi} runs out of memory"


# ------------------------------------------------------------------------------------ main
SECTIONS = {
    "loss": bench_loss,
    "fused": bench_fused,
    "step": bench_step,
    "trainer": bench_trainer,
    "cache": bench_cache,
    "engine": bench_engine,
    "flops": bench_flops,
    "cuda": bench_cuda,
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_step_child":
        fused, b, t, device, steps = sys.argv[2:7]
        print(json.dumps(_step_child(fused == "1", int(b), int(t), device, int(steps))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_fused_child":
        variant, n, device, repeats, mode = sys.argv[2:7]
        print(json.dumps(_fused_child(variant, int(n), device, int(repeats), mode)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_loss_child":
        variant, n, device, repeats, half, mode = sys.argv[2:8]
        print(json.dumps(_loss_child(variant, int(n), device, int(repeats), half == "1", mode)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", help=f"which to run (default: all): {', '.join(SECTIONS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="loss: N of the [N, V] logits")
    ap.add_argument("--repeats", type=int, default=3, help="loss: timed calls per measurement (after one warm-up)")
    ap.add_argument("--step-batch", type=int, nargs=2, default=[16, 256], help="step: batch size and sequence length")
    ap.add_argument("--steps-measured", type=int, default=2, help="step: measured steps per peak-RSS process")
    ap.add_argument("--step-rounds", type=int, default=4, help="step: timed rounds, the two paths taking turns")
    ap.add_argument("--steps", type=int, default=12, help="trainer, cache, cuda: timed steps per arm")
    ap.add_argument("--warmup", type=int, default=2, help="trainer, cache, cuda: untimed steps per arm first")
    ap.add_argument("--dry-run", action="store_true", help="cuda: run the section's code on any device, tiny batches")
    ap.add_argument("--profile-steps", type=int, default=3, help="trainer: steps under torch.profiler")
    ap.add_argument("--flops-steps", type=int, default=3, help="flops: timed steps (then one under the profiler)")
    args = ap.parse_args()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun (the engine section): rank 0 prints
        sys.stdout = open(os.devnull, "w")
    loaded = []
    args.components = lambda: loaded[0] if loaded else loaded.append(Components(args)) or loaded[0]
    for name in args.sections:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    print(
        f"kdlab benchmark on {device_name(torch.device(args.device))}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    for name in args.sections or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
