"""The grid that chooses the default student: depth x layer choice x objective, at equal steps.

    python scripts/prune_grid.py run --jobs 2   # every arm: `kdlab train`, two one-thread processes
    python scripts/prune_grid.py step0          # perplexity before training: even / importance / drop-one layers
    python scripts/prune_grid.py speed          # generation speed of the teacher and of each depth (quiet machine)
    python scripts/prune_grid.py report         # the markdown table and docs/images/prune_grid.png

Every arm is `make run`'s default run (40 optimizer steps of 4 x 256 tokens on the default teacher,
evaluation on the same 4 validation batches at steps 0, 20 and 40, then on 4 test batches) with
three settings changed: student_depth d, student_layers (even | importance) and alpha_kd (0.5: KD +
LM, or 0: LM only, the baseline at equal steps, which never runs the teacher). Three run seeds
(the data order) for the arms that decide the default. Each finished arm is added to
benchmarks/prune_grid.json at once, so an interrupted grid continues where it stopped (`run` skips
arms already recorded; --force reruns them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

from arm_lanes import Records, run_arms

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "benchmarks" / "prune_grid.json"
FIGURE = ROOT / "docs" / "images" / "prune_grid.png"
DEPTHS = (4, 8, 15, 22)
CHOICES = ("even", "importance")
MODES = {"kd": 0.5, "lm": 0.0}  # alpha_kd
SEEDS = (0, 1, 2)


def arms(decide: tuple[int, ...]) -> list[dict]:
    out = []
    for depth in DEPTHS:
        for layers in CHOICES:
            for mode in MODES:
                seeds = SEEDS if depth in decide and layers == "importance" else SEEDS[:1]
                for seed in seeds:
                    out.append(dict(depth=depth, layers=layers, mode=mode, seed=seed))
    # longest first (deeper, and KD runs the teacher too), so two lanes finish together
    return sorted(out, key=lambda a: (-(a["depth"] * 3 + (30 if a["mode"] == "kd" else 0)), a["seed"]))


def name(a: dict) -> str:
    return f"d{a['depth']}-{a['layers']}-{a['mode']}-s{a['seed']}"


def load() -> dict:
    return Records(RECORDS).load()


def save(records: dict) -> None:
    Records(RECORDS).save(records)


def summarise(out_dir: Path, a: dict, seconds: float) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "eval" and r["split"] == "validation"]
    test = [r for r in records if r["kind"] == "eval" and r["split"] == "test"][-1]
    student = json.loads((out_dir / "student.json").read_text())
    first, last = val[0], val[-1]
    return {
        **a,
        "parameters": student["parameters"],
        "teacher_layers": student["teacher_layers"],
        "steps": last["step"],
        "seconds": round(seconds, 1),
        "step0_val_ppl": first["student_ppl"],
        "val_ppl": last["student_ppl"],
        "val_bpb": last["student_bpb"],
        "val_kl": last["kl"],
        "val_top1": last["top1_agree"],
        "test_ppl": test["student_ppl"],
        "test_bpb": test["student_bpb"],
        "test_kl": test["kl"],
        "teacher_val_ppl": last["teacher_ppl"],
        "teacher_val_bpb": last["teacher_bpb"],
        "teacher_test_ppl": test["teacher_ppl"],
        "val_tokens": last["tokens"],
    }


def cmd_run(args) -> None:
    records = load()
    todo = [a for a in arms(args.decide) if args.force or name(a) not in records["arms"]]

    def flags(a: dict) -> list[str]:
        return [
            f"--student-depth={a['depth']}",
            f"--student-layers={a['layers']}",
            f"--alpha-kd={MODES[a['mode']]}",
            f"--seed={a['seed']}",
        ]

    def done_line(row: dict, s: float) -> str:
        return f"val ppl {row['step0_val_ppl']:.1f} -> {row['val_ppl']:.2f} in {s:.0f} s"

    run_arms(
        todo,
        Records(RECORDS),
        out_root=ROOT / "runs" / "grid",
        name=name,
        flags=flags,
        summarise=summarise,
        jobs=args.jobs,
        extra=args.extra,
        done_line=done_line,
    )


def _components():
    import kdlab
    from kdlab.build import build_components

    cfg = kdlab.load_config(overrides={"student_init": "random", "device": "cpu"})
    precision, tokenizer, teacher, data, _ = build_components(cfg)
    return kdlab, cfg, precision, tokenizer, teacher, data


def cmd_step0(args) -> None:
    """Validation perplexity of students cut from the teacher, before any training."""
    kdlab, cfg, precision, tokenizer, teacher, data = _components()
    from kdlab.pruning import choose_layers, even_layers, layer_scores

    calibration = [data["train"].batch(list(range(cfg.calib_blocks)))]
    t0 = time.perf_counter()
    scores = {m: layer_scores(teacher, calibration, m) for m in ("importance", "drop-one")}
    score_s = time.perf_counter() - t0
    n = len(teacher.model.layers)
    rows = {}
    for depth in DEPTHS:
        for choice in ("even", "importance", "drop-one"):
            layers = even_layers(depth, n) if choice == "even" else choose_layers(scores[choice], depth)
            student = kdlab.build_student("small", teacher, "teacher-layers", cfg.data_dir, precision,
                                          layers=",".join(map(str, layers)))  # fmt: skip
            m = kdlab.evaluate(student, None, data["validation"].eval_batches(cfg.batch_size, cfg.eval_batches),
                               precision)  # fmt: skip
            rows[f"d{depth}-{choice}"] = {
                "depth": depth,
                "choice": choice,
                "layers": layers,
                "val_ppl": m["student_ppl"],
            }
            print(f"depth {depth:2} {choice:10} val ppl {m['student_ppl']:>14,.1f}  layers {layers}", flush=True)
    records = load()
    records["step0"] = {"teacher": cfg.teacher, "scores": scores, "scoring_seconds": round(score_s, 1), "rows": rows,
                        "val_tokens": m["tokens"]}  # fmt: skip
    save(records)


def cmd_speed(args) -> None:
    """Greedy generation speed, KV cache, batch 1 and 8, of the teacher and a student of each depth."""
    import torch

    kdlab, cfg, precision, tokenizer, teacher, data = _components()
    from kdlab.payoff import generation_speed
    from kdlab.precision import describe_device

    torch.set_num_threads(args.threads)
    prompts = data["validation"].input_ids[:8, :32]
    out = {"device": describe_device(precision.device), "new_tokens": 64, "prompt_tokens": 32, "models": {}}
    models = {"teacher": teacher}
    for depth in DEPTHS:
        models[f"d{depth}"] = kdlab.build_student("small", teacher, "teacher-layers", cfg.data_dir, precision,
                                                  depth=depth)  # fmt: skip
    for who, model in models.items():
        row = {"parameters": sum(p.numel() for p in model.parameters())}
        for b in (1, 8):
            row[f"b{b}"] = generation_speed(model, prompts, b, 64, repeats=args.repeats)
        out["models"][who] = row
        print(f"{who:8} {row['parameters'] / 1e6:6.1f}M  b1 {row['b1']:7.1f}  b8 {row['b8']:7.1f} tokens/s", flush=True)
    records = load()
    records["speed"] = out
    save(records)


def _groups(records: dict) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records["arms"].values():
        groups.setdefault((r["depth"], r["layers"], r["mode"]), []).append(r)
    return groups


def cmd_report(args) -> None:
    records = load()
    speed = records.get("speed", {}).get("models", {})
    step0 = records.get("step0", {}).get("rows", {})
    groups = _groups(records)
    any_arm = next(iter(records["arms"].values()))
    t_ppl = any_arm["teacher_val_ppl"]
    print(
        "| depth | params | layers | step-0 val ppl | objective | seeds | val ppl (mean; min-max) | x teacher | "
        "val bpb | test ppl | val KL | speed x teacher b1 / b8 |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for (depth, layers, mode), rs in sorted(groups.items()):
        ppl = [r["val_ppl"] for r in rs]
        spread = f"; {min(ppl):.2f}-{max(ppl):.2f}" if len(rs) > 1 else ""
        s = speed.get(f"d{depth}")
        sp = f"{s['b1'] / speed['teacher']['b1']:.2f} / {s['b8'] / speed['teacher']['b8']:.2f}" if s else "-"
        s0 = step0.get(f"d{depth}-{layers}", {}).get("val_ppl", rs[0]["step0_val_ppl"])
        print(
            f"| {depth} | {rs[0]['parameters'] / 1e6:.1f}M | {layers} | {s0:,.0f} | "
            f"{'KD + LM' if mode == 'kd' else 'LM only'} | {len(rs)} | {mean(ppl):.2f}{spread} | "
            f"{mean(ppl) / t_ppl:.2f} | {mean(r['val_bpb'] for r in rs):.4f} | {mean(r['test_ppl'] for r in rs):.2f} | "
            f"{mean(r['val_kl'] for r in rs):.3f} | {sp} |"
        )
    print(f"\nteacher: val ppl {t_ppl:.2f}, val bpb {any_arm['teacher_val_bpb']:.4f}, test ppl "
          f"{any_arm['teacher_test_ppl']:.2f} ({any_arm['val_tokens']:,} validation tokens)")  # fmt: skip
    if speed:
        print(f"speed ({records['speed']['device']}): " + ", ".join(
            f"{k} {v['b1']:.1f} / {v['b8']:.1f}" for k, v in speed.items()) + " tokens/s at batch 1 / 8")  # fmt: skip
    if step0:
        print("\n| depth | " + " | ".join(f"{c} (step-0 val ppl)" for c in ("even", "importance", "drop-one")) + " |")
        print("|---|---|---|---|")
        for depth in DEPTHS:
            cells = [step0.get(f"d{depth}-{c}") for c in ("even", "importance", "drop-one")]
            print(f"| {depth} | " + " | ".join(f"{c['val_ppl']:,.1f} ({','.join(map(str, c['layers']))})"
                                                 if c else "-" for c in cells) + " |")  # fmt: skip
    if speed:
        _figure(groups, speed, t_ppl)


def _figure(groups, speed, t_ppl) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {("even", "kd"): ("o", "tab:blue"), ("importance", "kd"): ("o", "tab:red"),
             ("even", "lm"): ("s", "tab:cyan"), ("importance", "lm"): ("s", "tab:orange")}  # fmt: skip
    for (layers, mode), (marker, color) in style.items():
        xs, ys, lo, hi = [], [], [], []
        for depth in DEPTHS:
            rs = groups.get((depth, layers, mode))
            if not rs or f"d{depth}" not in speed:
                continue
            ppl = [r["val_ppl"] for r in rs]
            xs.append(speed[f"d{depth}"]["b1"] / speed["teacher"]["b1"])
            ys.append(mean(ppl))
            lo.append(mean(ppl) - min(ppl))
            hi.append(max(ppl) - mean(ppl))
        label = f"{layers} layers, {'KD + LM' if mode == 'kd' else 'LM only'}"
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker + "-", color=color, label=label, capsize=3, alpha=0.85)
    ax.scatter([1.0], [t_ppl], marker="*", s=160, color="black", label="teacher", zorder=5)
    ax.axhline(1.5 * t_ppl, color="grey", ls=":", lw=1)
    ax.axvline(1.5, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("generation speed, x the teacher's (batch 1, greedy, KV cache)")
    ax.set_ylabel("validation perplexity after 40 steps (log)")
    ax.set_title(
        "Students cut from the teacher: quality against speed\n(dotted: 1.5x the teacher's perplexity / speed)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)
    print(f"figure: {FIGURE.relative_to(ROOT)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train every arm not yet recorded")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--force", action="store_true", help="rerun arms already recorded")
    r.add_argument("--decide", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=(15,),
                   help="depths whose importance arms get three seeds (default: 15)")  # fmt: skip
    r.add_argument("extra", nargs="*", help="more `kdlab train` flags for every arm (after --)")
    r.set_defaults(func=cmd_run)
    sub.add_parser("step0").set_defaults(func=cmd_step0)
    s = sub.add_parser("speed")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--repeats", type=int, default=3)
    s.set_defaults(func=cmd_speed)
    sub.add_parser("report").set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
