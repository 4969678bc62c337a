"""Throughput and peak GPU memory of `kdlab train` on the real architecture.

    python scripts/cuda_bench.py            # on a CUDA machine (runs on CPU too, slowly)

The teacher is SmolLM2-135M's architecture (data/teacher/smollm2-135m/config.json) with random
weights, so it runs where the converted weights are not available (the lent GPU machines have no
network and a 64 MiB upload limit); speed and memory depend on the shapes, not on the weights'
values. The student is the default `small` preset initialised from teacher layers. Each setting is
a fresh `kdlab train` child process; tokens/s is the mean of the last log interval (warm), peak
memory is torch.cuda.max_memory_allocated over the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name: extra flags
    "default (B4 T256, fp16 teacher, bf16 autocast)": [],
    "B16 T1024": ["--batch-size", "16", "--seq-len", "1024"],
    "all terms, B8 T256": [
        "--batch-size",
        "8",
        "--w-feature",
        "0.5",
        "--w-attention",
        "0.5",
        "--w-layerwise",
        "0.5",
        "--w-contrastive",
        "0.1",
        "--curriculum",
        "constant",
    ],
    "fp16 autocast + GradScaler": ["--autocast-dtype", "float16"],
    "top-k 256 KD": ["--kd-top-k", "256"],
}


def random_teacher(path: Path) -> Path:
    if (path / "model.safetensors").is_file():
        return path
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    src = ROOT / "data" / "teacher" / "smollm2-135m"
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(src)).save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="runs/cuda-bench")
    args = ap.parse_args()
    out = ROOT / args.out
    teacher = random_teacher(out / "teacher")
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} steps per setting")
    print(f"{'setting':50} {'tokens/s':>10} {'peak MiB':>9} {'s/step':>7} {'skipped':>7}")
    for i, (label, flags) in enumerate(SETTINGS.items()):
        run = out / f"run{i}"
        cmd = [
            sys.executable,
            "-m",
            "kdlab",
            "-q",
            "train",
            "--teacher",
            str(teacher),
            "--max-steps",
            str(args.steps),
            "--log-every",
            "10",
            "--log-first",
            "0",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--eval-batches",
            "2",
            "--out-dir",
            str(run),
            *flags,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            print(
                f"{label:50} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
            continue
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in recs if r["kind"] == "train"][-1]
        peak = last.get("peak_mem_mib", float("nan"))
        tps = last["tokens_per_s"]  # next-token targets per second: B * (T - 1) per step
        fl = dict(zip(flags[::2], flags[1::2]))
        step_s = int(fl.get("--batch-size", 4)) * (int(fl.get("--seq-len", 256)) - 1) / tps
        print(f"{label:50} {tps:>10,.0f} {peak:>9,.0f} {step_s:>7.3f} {last['skipped_steps']:>7}")


if __name__ == "__main__":
    main()
