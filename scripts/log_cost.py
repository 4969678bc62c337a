"""What the seed's logging costs: lines and wall time of N steps, seed-verbose against concise.

    python scripts/log_cost.py                  # 500 steps each, CUDA if present, else CPU
    python scripts/log_cost.py --steps 100 --device cpu

Both runs are `kdlab train` in a child process (so the output is counted as a user would see it)
with a tiny random student and teacher that share SmolLM2's 49,152-token vocabulary and tokenizer
(loss math over the full vocabulary, as in the real run; the models are small so the logging's
share of the time is visible). The same steps, data and seed; only --log-style differs.
Needs `make setup` (the tokenizer and the Austen corpus).
"""

from __future__ import annotations

import argparse
import os
import re
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
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/log-cost")
    ap.add_argument("--prepare-only", action="store_true", help="only build the tiny teacher (<out>/teacher)")
    args = ap.parse_args()
    out = ROOT / args.out
    teacher = tiny_teacher(out / "teacher")
    if args.prepare_only:
        print(f"tiny teacher: {teacher}")
        return
    rows = []
    for style in ("concise", "seed-verbose"):
        cmd = [sys.executable, "-m", "kdlab", "train", "--teacher", str(teacher), "--student", "tiny",
               "--student-init", "random", "--seq-len", "64", "--batch-size", "4", "--max-steps", str(args.steps),
               "--warmup-steps", "10", "--eval-every", "0", "--save-every", "0", "--device", args.device,
               "--log-style", style, "--out-dir", str(out / style)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"log_cost: {style} run failed:\n{proc.stderr[-3000:]}")
        text = proc.stdout + proc.stderr
        (out / f"{style}.log").write_text(text)
        train_s = float(re.search(r"tokens in (\d+(?:\.\d+)?) s", proc.stdout).group(1))
        device = re.search(r"device=(\w+)", text).group(1)
        rows.append((style, len(text.splitlines()), len(text.encode()), train_s, wall, device))
    base = rows[0]
    print(f"{args.steps} steps, tiny student and teacher, 49,152-token vocabulary, device {base[5]}")
    print(f"{'log style':14} {'lines':>7} {'bytes':>9} {'lines/step':>10} {'train s':>8} {'wall s':>7} {'time ratio':>10}")
    for style, lines, nbytes, train_s, wall, _ in rows:
        print(f"{style:14} {lines:>7,} {nbytes:>9,} {lines / args.steps:>10.1f} {train_s:>8.1f} {wall:>7.1f} "
              f"{wall / base[4]:>10.2f}")


if __name__ == "__main__":
    main()
