"""The payoff of a student with its own tokenizer: the same-tokenizer pruned student against the
small-vocabulary one, each distilled (KD + LM) and LM-only, three run seeds each.

    python scripts/cross_tokenizer_runs.py run --jobs 2    # every arm: `kdlab train`, two one-thread processes
    python scripts/cross_tokenizer_runs.py measure         # whole-split bits per byte, generation speed (quiet machine)
    python scripts/cross_tokenizer_runs.py report          # the markdown table

Every arm is `make run`'s default run (the corrected teacher; a 15-layer student of the teacher
layers chosen by importance; 40 optimizer steps of 4 x 256 student tokens; evaluation on the first
4 validation batches at steps 0, 20 and 40) with these settings changed:
    tokenizer   teacher (the teacher's 49,152 tokens) or austen-bpe-8k (--student-tokenizer; the
                student's embedding starts as kdlab.vocab.init_embedding makes it from the teacher's)
    objective   kd: alpha_kd 0.5 (KD + LM; across tokenizers KD is the shared-vocabulary KL),
                kd+chunk: the same plus term_weights.chunk 0.5 (chunk likelihood, small vocabulary only),
                lm: alpha_kd 0 (LM only: the baseline at equal steps, which never runs the teacher)
    seed        0, 1, 2 (data order; the student's layers and embedding do not depend on it)

The runs' own evaluations cover different text on the two sides (blocks of 256 tokens of each
tokenizer), so `measure` evaluates every final student on the *whole* validation split, each in its
own tokens: bits per byte over the same text (every byte of the split; a packed block's first
token, which nothing predicts, is the only text left out, once per block). Each finished arm is
added to benchmarks/cross_tokenizer.json at once, so an interrupted `run` continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from arm_lanes import Records, run_arms

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "benchmarks" / "cross_tokenizer.json"
TOKENIZERS = {"teacher": "", "austen-bpe-8k": "austen-bpe-8k"}
OBJECTIVES = {
    "kd": ["--alpha-kd=0.5"],
    "lm": ["--alpha-kd=0"],
    "kd+chunk": ["--alpha-kd=0.5", '--term-weights={"chunk": 0.5}'],
}
SEEDS = (0, 1, 2)


def arms() -> list[dict]:
    out = [dict(tokenizer=t, objective=o, seed=s) for t in TOKENIZERS for o in ("kd", "lm") for s in SEEDS]
    out += [dict(tokenizer="austen-bpe-8k", objective="kd+chunk", seed=s) for s in SEEDS]
    return out


def name(a: dict) -> str:
    return f"{a['tokenizer']}-{a['objective']}-s{a['seed']}"


def load() -> dict:
    return Records(RECORDS).load()


def save(records: dict) -> None:
    Records(RECORDS).save(records)


def summarise(out_dir: Path, a: dict, seconds: float) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "eval" and r["split"] == "validation"]
    train = [r for r in records if r["kind"] == "train"]
    student = json.loads((out_dir / "student.json").read_text())
    first, last = val[0], val[-1]
    return {
        **a,
        "parameters": student["parameters"],
        "teacher_layers": student["teacher_layers"],
        "steps": last["step"],
        "seconds": round(seconds, 1),
        "tokens_per_s": round(mean(r["tokens_per_s"] for r in train[1:]), 1),
        "step0_val_bpb": first["student_bpb"],
        "val_bpb": last["student_bpb"],
        "val_ppl": last["student_ppl"],
        "val_kl": last.get("kl"),
        "teacher_val_bpb": last.get("teacher_bpb"),
        "run_val_bytes": last["bytes"],
    }


def cmd_run(args) -> None:
    records = load()
    todo = [a for a in arms() if args.force or name(a) not in records["arms"]]
    todo = [a for a in todo if not args.only or a["objective"] in args.only.split(",")]

    def flags(a: dict) -> list[str]:
        return [f"--student-tokenizer={TOKENIZERS[a['tokenizer']]}", *OBJECTIVES[a["objective"]], f"--seed={a['seed']}"]

    def done_line(row: dict, s: float) -> str:
        return f"val bpb {row['step0_val_bpb']:.4f} -> {row['val_bpb']:.4f} in {s:.0f} s"

    run_arms(
        todo,
        Records(RECORDS),
        out_root=ROOT / "runs" / "xtok",
        name=name,
        flags=flags,
        summarise=summarise,
        jobs=args.jobs,
        extra=args.extra,
        done_line=done_line,
    )


def cmd_measure(args) -> None:
    """Whole-validation bits per byte of every final student and of the teacher, each in its own tokens;
    generation speed of the teacher and of one student per tokenizer (speed does not depend on the weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    import kdlab
    from kdlab.build import tokenizer_pair
    from kdlab.data.alignment import prepare_paired_data
    from kdlab.data.corpus import prepare_data
    from kdlab.generation import generate, held_out_prompts
    from kdlab.models import count_parameters, load_teacher
    from kdlab.payoff import generation_speed, token_bytes
    from kdlab.precision import describe_device, resolve_precision

    torch.set_num_threads(args.threads)
    cfg = kdlab.load_config(overrides={"device": "cpu"})
    precision = resolve_precision("cpu", "float32", "float32")
    pair = tokenizer_pair("austen-bpe-8k", cfg.teacher, cfg.data_dir)
    same = prepare_data(cfg.data, cfg.data_dir, pair.teacher, cfg.seq_len)["validation"]
    paired = prepare_paired_data(cfg.data, cfg.data_dir, pair, cfg.seq_len)["validation"]
    splits = {"teacher": (same, token_bytes(pair.teacher)), "austen-bpe-8k": (paired, token_bytes(pair.student))}
    teacher = load_teacher(cfg.teacher, cfg.data_dir, precision)
    records = load()
    out = {"device": describe_device(torch.device("cpu")), "threads": args.threads}
    m = kdlab.evaluate(teacher, None, same.eval_batches(8), precision, token_bytes=splits["teacher"][1])
    out["teacher"] = {"parameters": count_parameters(teacher), "val_bpb": m["student_bpb"], "val_bytes": m["bytes"]}
    print(f"teacher: whole-validation bpb {m['student_bpb']:.4f} over {m['bytes']:,} bytes", flush=True)
    for key, row in sorted(records["arms"].items()):
        model = AutoModelForCausalLM.from_pretrained(ROOT / "runs" / "xtok" / key / "final", dtype=torch.float32)
        split, tb = splits[row["tokenizer"]]
        m = kdlab.evaluate(model, None, split.eval_batches(8), precision, token_bytes=tb)
        row["whole_val_bpb"], row["whole_val_bytes"] = m["student_bpb"], m["bytes"]
        print(f"{key}: whole-validation bpb {m['student_bpb']:.4f} over {m['bytes']:,} bytes", flush=True)
    speed = {}
    for who, split in (("teacher", same), ("teacher-tokenizer student", same), ("austen-bpe-8k student", paired)):
        if who == "teacher":
            model = teacher
        else:
            tok = "teacher" if who.startswith("teacher") else "austen-bpe-8k"
            final = ROOT / "runs" / "xtok" / f"{tok}-kd-s0" / "final"
            model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        prompts = split.input_ids[:8, : args.prompt_tokens]
        speed[who] = {
            f"b{b}": generation_speed(model, prompts, batch_size=b, new_tokens=args.new_tokens) for b in (1, 8)
        }
        speed[who]["parameters"] = count_parameters(model)
        print(f"{who}: {speed[who]}", flush=True)
    s_bytes = float(splits["austen-bpe-8k"][1][paired.input_ids[paired.attention_mask.bool()]].sum())
    t_bytes = float(splits["teacher"][1][same.input_ids[same.attention_mask.bool()]].sum())
    out["bytes_per_token"] = {
        "teacher": t_bytes / int(same.attention_mask.sum()),
        "austen-bpe-8k": s_bytes / int(paired.attention_mask.sum()),
    }
    out["aligned_share"] = {s: prepare_paired_data(cfg.data, cfg.data_dir, pair, cfg.seq_len)[s].aligned_share()
                            for s in ("train", "validation", "test")}  # fmt: skip
    out["shared_tokens"] = len(pair.s_shared)
    out["speed"] = speed
    # what each writes: 4 held-out prompts, greedy and sampled, 32 new tokens (seed 0 of each arm)
    prompts = held_out_prompts(cfg.data, cfg.data_dir, n=4)
    sampled = dict(sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=0)
    samples = {"prompts": prompts}
    for who in ("teacher", "teacher-kd-s0", "teacher-lm-s0", "austen-bpe-8k-kd-s0", "austen-bpe-8k-lm-s0"):
        if who == "teacher":
            model, tok = teacher, pair.teacher
        else:
            final = ROOT / "runs" / "xtok" / who / "final"
            model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
            tok = pair.student if who.startswith("austen") else pair.teacher
        samples[who] = {
            mode: [c.text for c in generate(model, tok, prompts, max_new_tokens=32, **options)]
            for mode, options in (("greedy", {}), ("sampled", sampled))
        }
    out["samples"] = samples
    records["measure"] = out
    save(records)


def cmd_report(args) -> None:
    records = load()
    rows = records["arms"].values()
    ms = records.get("measure", {})
    head = ["tokenizer", "objective", "params", "seeds", "run val bpb (mean; min-max)", "whole-val bpb (mean; min-max)"]
    print("| " + " | ".join([*head, "train tok/s"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for tok in TOKENIZERS:
        for obj in OBJECTIVES:
            group = [r for r in rows if r["tokenizer"] == tok and r["objective"] == obj]
            if not group:
                continue

            def stat(key, group=group):
                vals = [r[key] for r in group if r.get(key) is not None]
                return f"{mean(vals):.4f}; {min(vals):.4f}-{max(vals):.4f}" if vals else "-"

            params = f"{group[0]['parameters'] / 1e6:.1f}M"
            tps = mean(r["tokens_per_s"] for r in group)
            print(
                f"| {tok} | {obj} | {params} | {len(group)} | {stat('val_bpb')} | {stat('whole_val_bpb')} | {tps:.0f} |"
            )
    if ms:
        print(f"\nteacher whole-validation bpb {ms['teacher']['val_bpb']:.4f}; bytes per token {ms['bytes_per_token']}")
        print(f"aligned share {ms['aligned_share']}; shared tokens {ms['shared_tokens']}")
        for who, s in ms["speed"].items():
            print(f"{who}: {s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--force", action="store_true")
    r.add_argument("--only", default="", help="objectives to run, comma-separated (default: all)")
    r.add_argument("extra", nargs="*", help="more `kdlab train` flags for every arm (after --)")
    m = sub.add_parser("measure")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--prompt-tokens", type=int, default=32)
    m.add_argument("--new-tokens", type=int, default=64)
    sub.add_parser("report")
    args = ap.parse_args()
    {"run": cmd_run, "measure": cmd_measure, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
