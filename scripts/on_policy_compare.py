"""Off-policy against mixed against on-policy distillation at equal wall time, on the real pair.

    python scripts/on_policy_compare.py                                  # lambda 0, 0.5, 1 x seeds 0, 1
    python scripts/on_policy_compare.py --minutes 3 --lambdas 0 1 --seeds 0 --out /tmp/op.json
    python scripts/on_policy_compare.py --student runs/default/final     # from a distilled student (GKD's set-up)

Each arm trains the default pair (SmolLM2-135M -> the `small` student) for the same wall-clock budget
of training steps (evaluation and generation of the measured samples are outside it), with a constant
learning rate after the warmup so that stopping on time cuts no schedule short. After it:
    val KL       teacher-forced KL(teacher || student) on the validation split (the usual measure)
    teacher NLL  the teacher's per-token NLL of the student's own greedy continuations of held-out
                 prompts (the exposure-bias measure: lower = text the teacher finds more likely)
    distinct-2   of those continuations (near 0 = "a a a a", near 1 = varied)
    gen share    the share of the training time spent generating (0 for lambda = 0)
The table prints each arm's mean over the seeds and the seed-to-seed spread; a difference between two
arms counts only where it exceeds twice the larger spread. Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import kdlab  # noqa: E402
import kdlab.course  # noqa: E402
from kdlab.generation import distinct_n, generate, held_out_prompts, teacher_nll  # noqa: E402


class TimeBudget(kdlab.Callback):
    """Stop a (single-process) run once its training loop has run `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, 0.0

    def on_train_begin(self, trainer) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, trainer, out) -> None:
        if time.perf_counter() - self.started >= self.seconds:
            trainer.state.should_stop, trainer.state.stop_reason = True, f"wall-time budget of {self.seconds:.0f} s"


def run_arm(lam: float, seed: int, args) -> dict:
    P = kdlab.course.profile("ci")  # paths only; the sizes come from the flags
    overrides = dict(
        on_policy=lam,
        seed=seed,
        **({"student": args.student} if args.student else {}),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        prompt_tokens=args.prompt_tokens,
        max_steps=100_000,  # the time budget ends the run
        lr_scheduler="constant",
        warmup_steps=4,
        eval_every=0,
        eval_batches=args.eval_batches,
        log_every=10,
        early_stopping=False,
        checkpoints=False,
    )
    cfg = P.config(f"on-policy-compare/lambda{lam}-seed{seed}", **overrides)
    trainer = kdlab.build_trainer(cfg, callbacks=[TimeBudget(args.minutes * 60)])
    t0 = time.perf_counter()
    state = trainer.fit()
    seconds = time.perf_counter() - t0
    prompts = held_out_prompts(cfg.data, cfg.data_dir, args.prompts)
    greedy = generate(trainer.student, trainer.tokenizer, prompts, args.new_tokens, precision=trainer.precision)
    train = [r for r in state.history if r["kind"] == "train"]
    gen_s = sum(r.get("generate_s", 0.0) for r in train)
    train_s = sum(r["interval_s"] for r in train)
    val = [r for r in state.history if r["kind"] == "eval" and r["split"] == "validation"][-1]
    return {
        "on_policy": lam,
        "seed": seed,
        "steps": state.step,
        "seconds": round(seconds, 1),
        "val_kl": val["kl"],
        "teacher_nll": teacher_nll(trainer.teacher, trainer.tokenizer, greedy, trainer.precision),
        "distinct_2": distinct_n(greedy, 2),
        "generate_share": gen_s / max(train_s, 1e-9),
        "generated_steps": round(sum(r.get("on_policy_share", 0.0) * r["steps"] for r in train)),
        "samples": [{"prompt": c.prompt, "continuation": c.text} for c in greedy[:2]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="values of on_policy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall time per arm")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts continued for the measures")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--student", default="", help="start every arm from this model folder (default: the preset)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "on_policy_compare.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kdlab.course.quiet()
    rows = []
    for seed in args.seeds:  # seeds outside, so an interrupted sweep still has every arm of seed 0
        for lam in args.lambdas:
            rows.append(run_arm(lam, seed, args))
            r = rows[-1]
            print(
                f"lambda {lam:.2f} seed {seed}: {r['steps']} steps in {r['seconds']:.0f} s; val KL {r['val_kl']:.4f}, "
                f"teacher NLL {r['teacher_nll']:.3f}, distinct-2 {r['distinct_2']:.3f}, "
                f"generating {r['generate_share']:.0%}",
                flush=True,
            )
            args.out.write_text(
                json.dumps(
                    {
                        "device": kdlab.course.describe_machine(),
                        "settings": {k: str(v) for k, v in vars(args).items()},
                        "runs": rows,
                    },
                    indent=1,
                )
                + "\n"
            )
    print(f"\n{'lambda':>6} | {'steps':>5} | {'val KL':>15} | {'teacher NLL':>15} | {'distinct-2':>15} | gen share")
    for lam in args.lambdas:
        arm = [r for r in rows if r["on_policy"] == lam]

        def cell(key: str, arm=arm) -> str:
            vals = [r[key] for r in arm]
            spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else float("nan")
            return f"{statistics.mean(vals):.4f} ± {spread:.4f}"

        steps = statistics.mean(r["steps"] for r in arm)
        share = statistics.mean(r["generate_share"] for r in arm)
        print(
            f"{lam:6.2f} | {steps:5.0f} | {cell('val_kl'):>15} | {cell('teacher_nll'):>15} | "
            f"{cell('distinct_2'):>15} | {share:.0%}"
        )
    print("(mean over seeds ± half their range; a difference counts where it exceeds twice the larger ± )")


if __name__ == "__main__":
    main()
