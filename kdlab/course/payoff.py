"""The payoff as a notebook shows it: teachers side by side, the payoff table, a decoding lesson.

    rows = kdlab.payoff.payoff_rows(teacher, {"KD student": s, "LM-only student": lm}, data, prec, tok)
    payoff_table(rows)                              # Markdown: size, speed, perplexity, bits per byte, retention
    model_quality({"original": t0, "corrected": t1}, batches, prec, tok)   # perplexity and bits per byte
    decoding_lesson({"teacher": t1, "student": s}, tok, prompts, prec, teacher=t1)
    grid = load_grid(); grid_table(grid)           # the committed depth x KD/LM-only grid (scripts/prune_grid.py)

Retention is the share of the teacher's quality a student keeps, measured in bits per byte (a
tokenizer-free code length): teacher bpb / student bpb, 1.0 when the student compresses held-out text
as well as the teacher does. kdlab.payoff measures; this module only arranges what it measured.
"""

from __future__ import annotations

from typing import Any

DECODINGS: dict[str, dict[str, Any]] = {
    # what each decoding does, in the order the lesson shows them
    "greedy": dict(sample=False),
    "greedy, repetition penalty 1.3": dict(sample=False, repetition_penalty=1.3),
    "sampled, T 0.8, top-p 0.9": dict(sample=True, temperature=0.8, top_p=0.9, seed=0),
    "sampled, T 0.8, top-p 0.9, penalty 1.1": dict(
        sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=0
    ),
}


def retention(row: dict[str, Any], teacher_row: dict[str, Any], key: str = "val") -> float:
    """teacher bits per byte / the model's: the share of the teacher's quality kept (1.0 = all of it)."""
    return teacher_row[f"{key}_bpb"] / row[f"{key}_bpb"]


def payoff_table(rows: list[dict[str, Any]]) -> Any:
    """kdlab.payoff.payoff_rows as Markdown: parameters, generation speed (x teacher), validation
    perplexity (x teacher), bits per byte and retention; the teacher first."""
    t = rows[0]
    speeds = sorted(int(k.rsplit("b", 1)[1]) for k in t if k.startswith("tokens_per_s_b"))
    head = ["model", "parameters"] + [f"tokens/s, batch {b}" for b in speeds]
    head += ["val ppl", "val bpb", "retention (bpb)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['parameters'] / 1e6:.1f}M ({r['parameters'] / t['parameters']:.2f}×)"]
        cells += [f"{r[f'tokens_per_s_b{b}']:.1f} ({r[f'speed_x_teacher_b{b}']:.2f}×)" for b in speeds]
        cells += [f"{r['val_ppl']:.1f} ({r['ppl_x_teacher']:.2f}×)", f"{r['val_bpb']:.3f}", f"{retention(r, t):.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return _markdown("\n".join(lines))


def payoff_from_runs(
    teacher,
    runs: dict[str, tuple[Any, Any]],
    prompts,
    speed_batches: tuple[int, ...] = (1, 8),
    new_tokens: int = 32,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """The rows of kdlab.payoff.payoff_rows for students just trained: {name: (model, TrainState)}.
    Quality comes from each run's last validation and test evaluation (the blocks every evaluation of
    the run used, the teacher's figures recorded beside them), so nothing is evaluated twice; only the
    generation speed is measured here, on `prompts` ((N, P) token ids)."""
    from kdlab.course.verdicts import evals
    from kdlab.models import count_parameters
    from kdlab.payoff import generation_speed

    def speeds(model) -> dict[str, float]:
        return {f"tokens_per_s_b{b}": generation_speed(model, prompts, b, new_tokens, repeats) for b in speed_batches}

    first = next(iter(runs.values()))[1]
    last = {split: evals(first.history, split)[max(evals(first.history, split))] for split in ("validation", "test")}
    rows = [{"model": "teacher", "parameters": count_parameters(teacher), **speeds(teacher)}]
    for split, key in (("validation", "val"), ("test", "test")):
        rows[0] |= {f"{key}_ppl": last[split]["teacher_ppl"], f"{key}_bpb": last[split]["teacher_bpb"]}
    for name, (model, state) in runs.items():
        row = {"model": name, "parameters": count_parameters(model), **speeds(model)}
        for split, key in (("validation", "val"), ("test", "test")):
            r = evals(state.history, split)
            r = r[max(r)]
            row |= {f"{key}_ppl": r["student_ppl"], f"{key}_bpb": r["student_bpb"], f"{key}_kl": r["kl"]}
        rows.append(row)
    for row in rows:
        row["ppl_x_teacher"] = row["val_ppl"] / rows[0]["val_ppl"]
        for b in speed_batches:
            row[f"speed_x_teacher_b{b}"] = row[f"tokens_per_s_b{b}"] / rows[0][f"tokens_per_s_b{b}"]
    return rows


def model_quality(models: dict[str, Any], batches: list[dict], precision, tokenizer) -> dict[str, dict[str, float]]:
    """{name: {"ppl", "bpb", "tokens", "bytes"}} of each model on the same held-out `batches`."""
    from kdlab.payoff import token_bytes
    from kdlab.training.evaluation import evaluate

    tb = token_bytes(tokenizer)
    out = {}
    for name, model in models.items():
        m = evaluate(model, None, batches, precision, token_bytes=tb)
        out[name] = {"ppl": m["student_ppl"], "bpb": m["student_bpb"], "tokens": m["tokens"], "bytes": m["bytes"]}
    return out


def decoding_lesson(
    models: dict[str, Any],
    tokenizer,
    prompts: list[str],
    precision,
    teacher,
    decodings: dict[str, dict[str, Any]] | None = None,
    new_tokens: int = 32,
) -> tuple[dict[str, list], list[tuple[str, str, float, float]]]:
    """Every model continues `prompts` under every decoding: ({"model · decoding": continuations},
    [(model, decoding, distinct-2, teacher NLL)]). Distinct-2 (unique token pairs / all pairs) falls
    when text loops; the teacher's NLL (nats per token) rises when text wanders off what it finds
    likely: a decoding is judged on both at once, never on one."""
    from kdlab.generation import distinct_n, generate, teacher_nll

    texts, measures = {}, []
    for model_name, model in models.items():
        for name, options in (decodings or DECODINGS).items():
            out = generate(model, tokenizer, prompts, new_tokens, precision=precision, **options)
            texts[f"{model_name} · {name}"] = out
            measures.append((model_name, name, distinct_n(out, 2), teacher_nll(teacher, tokenizer, out, precision)))
    return texts, measures


def measures_table(measures: list[tuple[str, str, float, float]]) -> Any:
    """The decoding lesson's measures as Markdown."""
    lines = ["| model | decoding | distinct-2 | teacher NLL (nats/token) |", "|---|---|---|---|"]
    lines += [f"| {m} | {d} | {d2:.2f} | {nll:.2f} |" for m, d, d2, nll in measures]
    return _markdown("\n".join(lines))


GRID_FILE = "benchmarks/prune_grid.json"  # under the repository root: scripts/prune_grid.py writes it


def load_grid() -> dict[str, Any]:
    """The committed pruning grid: every arm's final figures, the speed pass, the settings."""
    import json

    from kdlab.course.references import repo_root

    return json.loads((repo_root() / GRID_FILE).read_text())


def grid_arms(grid: dict[str, Any], layers: str = "importance") -> dict[tuple[int, str], Any]:
    """{(depth, "kd" | "lm"): kdlab.course.verdicts.Arm} of the grid's runs with `layers`, one run per
    seed, each as its final validation and test evaluation (the only records the grid keeps)."""
    from kdlab.course.verdicts import Arm

    runs: dict[tuple[int, str], list] = {}
    for name, a in sorted(grid["arms"].items()):
        if a["layers"] != layers:
            continue
        records = [
            {"kind": "eval", "split": split, "step": a["steps"], "student_ppl": a[f"{k}_ppl"],
             "student_bpb": a[f"{k}_bpb"], "kl": a[f"{k}_kl"]}
            for split, k in (("validation", "val"), ("test", "test"))
        ]  # fmt: skip
        runs.setdefault((a["depth"], a["mode"]), []).append((name, records))
    return {
        key: Arm.of(f"{key[0]} layers, {'KD + LM' if key[1] == 'kd' else 'LM only'}", *[r for _, r in v],
                    labels=[n for n, _ in v])
        for key, v in sorted(runs.items())
    }  # fmt: skip


def grid_table(grid: dict[str, Any], layers: str = "importance") -> Any:
    """The trade-off as Markdown: per depth, parameters, speed x teacher, KD and LM-only validation
    perplexity (mean and range of the seeds) and the verdict of KD against LM-only."""
    from kdlab.course.verdicts import compare

    arms, speed = grid_arms(grid, layers), grid["speed"]["models"]
    t = speed["teacher"]
    lines = [
        "| student | parameters | speed × teacher, batch 1 / 8 | val ppl, KD + LM | val ppl, LM only | KD − LM "
        "| noise | KD below LM-only |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher (30 layers) | {t['parameters'] / 1e6:.1f}M | 1.00 / 1.00 "
        f"| {_first(grid, 'teacher_val_ppl'):.1f} | | | | |",
    ]
    for depth in sorted({d for d, _ in arms}):
        s = speed[f"d{depth}"]
        c = compare(arms[depth, "kd"], arms[depth, "lm"])
        lines.append(
            f"| {depth} layers | {s['parameters'] / 1e6:.1f}M | {s['b1'] / t['b1']:.2f} / {s['b8'] / t['b8']:.2f} "
            f"| {c.a.format()} | {c.b.format()} | {c.diff:+.1f} | {c.noise:.1f} | {c.holds('lower')} |"
        )
    return _markdown("\n".join(lines))


def _first(grid: dict[str, Any], key: str) -> float:
    return next(iter(grid["arms"].values()))[key]


def _markdown(text: str) -> Any:
    try:
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover - IPython is a course dependency
        return text
    return Markdown(text)


__all__ = [
    "DECODINGS",
    "GRID_FILE",
    "decoding_lesson",
    "grid_arms",
    "grid_table",
    "load_grid",
    "measures_table",
    "model_quality",
    "payoff_from_runs",
    "payoff_table",
    "retention",
]
