"""What the original framework's logging costs: lines and wall time of N steps, original-verbose against concise.

    python scripts/log_cost.py                        # 500 steps each, tiny models, CUDA if present
    python scripts/log_cost.py --arch smollm2 --steps 500   # the real architecture (random weights)

Both runs are `kdlab train` in a child process (the output is counted as a user would see it),
with the same steps, data and seed; only --log-style differs. A 2-step run first builds the
token cache, so neither timed run pays for it; the styles then alternate (A B B A, `--repeats`
runs each) so a machine whose speed drifts favours neither. "loop s" is the training loop alone
(the sum of the log intervals' wall times); "wall s" is the whole process.

--arch tiny: a random 2-layer teacher and the tiny student, sharing SmolLM2's 49,152-token
vocabulary (the loss still spans the full vocabulary); --arch smollm2: SmolLM2-135M's shapes with
random weights (scripts/cuda_bench.py) and the default `small` student. Needs `make setup`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_teacher(path: Path) -> Path:
    if (path / "model.safetensors").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "teacher" / "smollm2-135m")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# `kdlab train` with the original framework's verbose logging (a course callback) when asked for
CHILD = """
import sys
from kdlab.cli import _setup_logging, build_parser, cmd_train
from kdlab.course.original import OriginalVerboseLogging
args = build_parser().parse_args(["train", *sys.argv[2:]])
_setup_logging(args.verbose)
sys.exit(cmd_train(args, [OriginalVerboseLogging()] if sys.argv[1] == "original-verbose" else []))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each style, interleaved")
    ap.add_argument("--seq-len", type=int, default=0, help="default: 64 (tiny), 256 (smollm2)")
    ap.add_argument("--out", default="runs/log-cost")
    ap.add_argument("--prepare-only", action="store_true", help="only build the tiny teacher (<out>/teacher)")
    args = ap.parse_args()
    out = ROOT / args.out
    if args.arch == "tiny":
        teacher = tiny_teacher(out / "teacher")
        model = [
            "--teacher",
            str(teacher),
            "--student",
            "tiny",
            "--student-init",
            "random",
            "--seq-len",
            str(args.seq_len or 64),
        ]
    else:
        sys.path.insert(0, str(ROOT / "scripts"))
        from cuda_bench import random_teacher

        teacher = random_teacher(out / "teacher-smollm2")
        model = ["--teacher", str(teacher), "--seq-len", str(args.seq_len or 256)]
    if args.prepare_only:
        print(f"teacher: {teacher}")
        return
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def run(style: str, steps: int, folder: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            style,
            *model,
            "--batch-size",
            str(args.batch_size),
            "--max-steps",
            str(steps),
            "--warmup-steps",
            "10",
            "--eval-every",
            "0",
            "--eval-batches",
            "1",
            "--save-every",
            "0",
            "--device",
            args.device,
            "--out-dir",
            str(out / folder),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            sys.exit(f"log_cost: {style} run failed:\n{proc.stderr[-3000:]}")
        return proc

    run("concise", 2, "warm-up")  # builds the token cache for this seq_len
    # interleaved A B B A ...: a machine whose speed drifts during the measurement biases neither style
    order = [("concise", "original-verbose")[(i + i // 2) % 2] for i in range(2 * args.repeats)]
    runs = []
    for i, style in enumerate(order):
        t0 = time.perf_counter()
        name = f"{args.arch}-b{args.batch_size}-{style}-{i}"
        proc = run(style, args.steps, name)
        wall = time.perf_counter() - t0
        text = proc.stdout + proc.stderr
        (out / f"{name}.log").write_text(text)
        recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        loop = sum(r["interval_s"] for r in recs if r["kind"] == "train")
        runs.append((style, len(text.splitlines()), len(text.encode()), loop, wall))
    device = "cuda" if "device=cuda" in text else "cpu"
    extra = ""
    if device == "cuda":
        import torch

        extra = f" ({torch.cuda.get_device_name()})"
    print(f"{args.steps} steps, arch {args.arch}, batch {args.batch_size} x {model[-1]} tokens, device {device}{extra}")
    print(
        f"{'run':3} {'log style':14} {'lines':>7} {'bytes':>9} {'lines/step':>10} {'loop s':>8} {'ms/step':>8} "
        f"{'wall s':>7}"
    )
    for i, (style, lines, nbytes, loop, wall) in enumerate(runs):
        print(
            f"{i:<3} {style:14} {lines:>7,} {nbytes:>9,} {lines / args.steps:>10.1f} {loop:>8.2f} "
            f"{1000 * loop / args.steps:>8.1f} {wall:>7.1f}"
        )
    mean = {s: sum(r[3] for r in runs if r[0] == s) / args.repeats for s in ("concise", "original-verbose")}
    spread = {s: [round(r[3], 2) for r in runs if r[0] == s] for s in mean}
    print(
        f"loop time, mean of {args.repeats}: concise {mean['concise']:.2f} s {spread['concise']}, original-verbose "
        f"{mean['original-verbose']:.2f} s {spread['original-verbose']}; "
        f"ratio {mean['original-verbose'] / mean['concise']:.3f}"
    )


if __name__ == "__main__":
    main()
