"""The course's reference runs: each notebook's arms trained much longer than the `ci` profile does,
their records and text samples written to notebooks/reference/<arm>/ (committed; small files).

    python scripts/reference_runs.py                 # every arm not yet written, one process
    python scripts/reference_runs.py --arms default lm-only --force
    python scripts/reference_runs.py --jobs 2 --force # every arm again, two one-thread processes: 58.6 min (2-core CPU)
    python scripts/reference_runs.py --steps 1500 --batch-size 16 --seq-len 256   # the gpu profile's sizes
    python scripts/reference_runs.py --size ci --jobs 2 --arms default default-seed1 default-seed2

An arm named `<arm>-seed<N>` is that arm with run seed N (another data order and, for the student's
new parts, another initialisation): the seed-to-seed spread every verdict is judged against comes from
three seeds of each arm it compares, at the same size and step. `--size cpu` (the default) writes the
reference runs at the `cpu` profile's sizes to notebooks/reference/<arm>/; `--size ci` writes runs of
exactly a notebook's live `ci` run to notebooks/reference/ci/<arm>/ (records only, no samples): the noise a
`ci` run is judged against, measured once and committed.

Each arm folder holds `metrics.jsonl` (the run's records), `samples.json` (greedy and sampled
continuations of held-out prompts by the final student, with distinct-2 and the teacher's per-token
NLL of them) and `meta.json` (device, sizes, commit, seconds, settings). `_before/samples.json` holds
the teacher's and the untrained student's continuations of the same prompts. The notebooks overlay
these runs on the learner's short ones and `KDLAB_PROFILE=reference` replays them without training.
An arm whose meta.json already records the same settings and sizes is skipped, so an interrupted
session continues where it stopped. `--jobs N` runs the arms in N processes (one thread each unless
--threads says otherwise), longest first onto the least loaded by each arm's last recorded seconds,
and writes the whole run's wall time with every arm's seconds to `_timing.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import kdlab  # noqa: E402
import kdlab.course  # noqa: E402
from kdlab.generation import distinct_n, generate, held_out_prompts, teacher_nll  # noqa: E402

ALL_TERMS = dict(w_feature=0.5, w_attention=0.5, w_layerwise=0.5, w_contrastive=0.1)
# arm -> (settings beyond the default run, the notebooks that use it)
ARMS: dict[str, tuple[dict, str]] = {
    "default": (
        dict(early_stopping=False),
        "00 quickstart, 02 dtype (policy run), 07 capstone (T=1 baseline), 08 on-policy (off-policy, lambda 0)",
    ),
    "lm-only": (dict(early_stopping=False, alpha_kd=0.0), "00 quickstart (LM-only text), 07 capstone"),
    "temperature-2": (dict(early_stopping=False, temperature=2.0), "07 capstone"),
    "temperature-3": (dict(early_stopping=False, temperature=3.0), "07 capstone"),
    "adaptive-balance": (dict(early_stopping=False, adaptive_balance=True), "07 capstone"),
    "all-terms": (
        dict(early_stopping=False, log_every=1, **ALL_TERMS),
        "04 curriculum (seed), 06 early stopping (the original framework's monitor), 07 capstone (all fixes)",
    ),
    "all-terms-phases": (dict(early_stopping=False, curriculum="original-phases", **ALL_TERMS), "04 curriculum"),
    "feature-attention": (
        dict(early_stopping=False, w_feature=0.5, w_attention=0.5, curriculum="constant", grad_share_every=10),
        "03 loss normalisation (gradient shares)",
    ),
    # kdlab's stopper where stopping matters: the all-terms run on a corpus of 8 blocks (train_blocks=8,
    # two steps per epoch) at lr 1e-3, so the student memorises them and validation KL reaches a best
    # and then rises (overfitting). At lr 1e-2 on the whole corpus validation KL still improved at step
    # 120 (measured at 4 x 128: 2.482), so nothing longer than the ci run had a best to find; checks
    # every 2 steps, patience 3, the default warmup
    "early-stopping": (
        # 4 evaluation blocks, not 16: it evaluates every 2 steps, so evaluation would be most of its time
        dict(
            early_stopping=True,
            lr=1e-3,
            train_blocks=8,
            es_patience=3,
            eval_every=2,
            eval_batches=4,
            log_every=1,
            **ALL_TERMS,
        ),
        "06 early stopping (kdlab's rule)",
    ),
    # on-policy distillation (GKD's lambda): the default run, with this share of its steps on the student's
    # own continuations (prompt: the first 32 tokens of each block; the other 32 generated at T = 1)
    "on-policy-mixed": (dict(early_stopping=False, on_policy=0.5), "08 on-policy (mixed, lambda 0.5)"),
    "on-policy": (dict(early_stopping=False, on_policy=1.0), "08 on-policy (on-policy, lambda 1)"),
}
SEEDED = re.compile(r"(.+)-seed(\d+)$")


def arm_settings(arm: str) -> tuple[dict, str]:
    """ARMS[arm], or for `<arm>-seed<N>` that arm's settings with seed N."""
    if arm in ARMS:
        return ARMS[arm]
    m = SEEDED.match(arm)
    if not m or m.group(1) not in ARMS:
        raise KeyError(arm)
    settings, used_by = ARMS[m.group(1)]
    return {**settings, "seed": int(m.group(2))}, f"{used_by} (seed {m.group(2)}: the seed-to-seed spread)"


ROOT_OUT = ROOT / kdlab.course.REFERENCE_DIR
OUT = ROOT_OUT  # --size ci: ROOT_OUT / "ci"
N_PROMPTS, NEW_TOKENS = 4, 32


def commit() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(
            ["git", "diff", "--name-only", "HEAD", "--", "kdlab"], cwd=ROOT, text=True
        ).split()
        return head + (f" (+ uncommitted: {', '.join(dirty)})" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def samples_of(model, trainer, prompts) -> dict:
    greedy = generate(model, trainer.tokenizer, prompts, NEW_TOKENS, precision=trainer.precision)
    sampled = generate(model, trainer.tokenizer, prompts, NEW_TOKENS, sample=True, seed=0, precision=trainer.precision)
    return {
        "greedy": [c.text for c in greedy],
        "sampled": [c.text for c in sampled],
        "distinct_2": distinct_n(greedy, 2),
        "distinct_2_sampled": distinct_n(sampled, 2),
        "teacher_nll": teacher_nll(trainer.teacher, trainer.tokenizer, greedy, trainer.precision),
        "teacher_nll_sampled": teacher_nll(trainer.teacher, trainer.tokenizer, sampled, trainer.precision),
    }


def write(folder: Path, files: dict[str, str]) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, text in files.items():
        (tmp / name).write_text(text)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def run_jobs(args) -> int:
    """The arms split over args.jobs processes of this script; the wall time of all of them recorded."""

    def cost(arm: str) -> float:  # the arm's last recorded seconds, else a typical arm's
        meta = OUT / arm / "meta.json"
        return json.loads(meta.read_text())["seconds"] if meta.is_file() else 1500.0

    lanes: list[list[str]] = [[] for _ in range(args.jobs)]
    load = [0.0] * args.jobs
    for arm in sorted(args.arms, key=cost, reverse=True):
        i = load.index(min(load))
        lanes[i].append(arm)
        load[i] += cost(arm)
    sizes = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}"]
    sizes += [f"--eval-every={args.eval_every}", f"--eval-batches={args.eval_batches}"]
    sizes += [f"--threads={args.threads or 1}", f"--size={args.size}"] + (["--force"] if args.force else [])
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, __file__, *sizes, *([] if i == 0 else ["--no-before"]), "--arms", *lane])
        for i, lane in enumerate(lanes)
        if lane
    ]
    rcs = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    metas = {a: json.loads((OUT / a / "meta.json").read_text()) for a in args.arms if (OUT / a / "meta.json").is_file()}
    timing = {
        "device": kdlab.course.describe_machine().rsplit(",", 1)[0],
        "processes": len(procs),
        "threads_per_process": args.threads or 1,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(wall, 1),
        "lanes": [lane for lane in lanes if lane],
        "arms_s": {a: m["seconds"] for a, m in metas.items()},
        "exit_codes": rcs,
    }
    # every --jobs run's wall time, its arms side by side; a later batch is appended, not written over
    timing_file = OUT / "_timing.json"
    batches = json.loads(timing_file.read_text()) if timing_file.is_file() else []
    batches = batches if isinstance(batches, list) else [batches]
    timing_file.write_text(json.dumps([*batches, timing], indent=1) + "\n")
    print(f"{len(args.arms)} arms in {len(procs)} processes: {wall / 60:.1f} min wall; {timing_file}", flush=True)
    return max(rcs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--arms", nargs="*", default=list(ARMS), help=f"arms, each optionally -seedN (default: {', '.join(ARMS)})"
    )
    ap.add_argument(
        "--size",
        choices=("cpu", "ci"),
        default="cpu",
        help="the profile whose sizes the arms take: cpu = the reference runs, ci = a notebook's live run (noise)",
    )
    ap.add_argument("--steps", type=int, help="optimizer steps per arm (default: the profile's)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-batches", type=int)
    ap.add_argument("--force", action="store_true", help="rerun arms already written")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default); 1 lets two processes share a 2-core machine",
    )
    ap.add_argument("--jobs", type=int, default=1, help="processes to split the arms over (see above)")
    ap.add_argument("--no-before", action="store_true", help=argparse.SUPPRESS)  # a --jobs lane other than the first
    args = ap.parse_args()
    size = kdlab.course.PROFILES[args.size]  # one place for each size: the course's profiles
    for field in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(size, field))
    for arm in args.arms:
        try:
            arm_settings(arm)
        except KeyError:
            sys.exit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}, each optionally with -seed<N>")
    global OUT
    OUT = ROOT_OUT / "ci" if args.size == "ci" else ROOT_OUT
    if args.jobs > 1:
        sys.exit(run_jobs(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    kdlab.course.quiet()
    code = commit()  # the code this process imported, not what the tree holds when an arm ends
    P = kdlab.course.profile("ci")  # paths only: every size comes from the flags
    sizes = dict(
        max_steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        log_every=5 if args.size == "cpu" else max(1, args.steps // 20),  # as Profile.config logs
        warmup_steps=max(1, args.steps // 10),
    )
    samples_wanted = args.size == "cpu"  # ci runs are the noise yardstick: records only
    prompts = None
    for arm in args.arms:
        settings, used_by = arm_settings(arm)
        overrides = {**sizes, **settings}
        folder = OUT / arm
        meta_file = folder / "meta.json"
        cfg = P.config(f"reference/{arm}" if args.size == "cpu" else f"reference/ci/{arm}", **overrides)
        settled = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "data_dir")}
        if meta_file.is_file() and not args.force:
            old = json.loads(meta_file.read_text())
            if old.get("config") == settled:  # the same pair, settings and sizes
                print(f"{arm}: already written ({old['commit']}); --force to rerun", flush=True)
                continue
        trainer = kdlab.build_trainer(cfg)
        first = prompts is None
        if first:
            prompts = held_out_prompts(cfg.data, cfg.data_dir, N_PROMPTS)
        before_missing = args.force or not (OUT / "_before" / "samples.json").is_file()
        if first and samples_wanted and not args.no_before and before_missing:
            before = {
                "prompts": prompts,
                "teacher": samples_of(trainer.teacher, trainer, prompts),
                "student": samples_of(trainer.student, trainer, prompts),
            }
            write(OUT / "_before", {"samples.json": json.dumps(before, indent=1) + "\n"})
        t0 = time.perf_counter()
        state = trainer.fit()
        seconds = time.perf_counter() - t0
        samples = {"prompts": prompts, **samples_of(trainer.student, trainer, prompts)} if samples_wanted else {}
        meta = {
            "arm": arm,
            "used_by": used_by,
            "device": kdlab.course.describe_machine(),
            "commit": code,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(seconds, 1),
            "steps": state.step,
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
            "tokens": state.tokens,
            "stop_reason": state.stop_reason,
            "skipped_steps": state.skipped_steps,
            "overrides": overrides,
            "config": settled,
        }
        records = (Path(cfg.out_dir) / "metrics.jsonl").read_text()
        files = {"metrics.jsonl": records, "meta.json": json.dumps(meta, indent=1) + "\n"}
        if samples:
            files["samples.json"] = json.dumps(samples, indent=1) + "\n"
        write(folder, files)
        val = state.evals("validation")[-1]
        print(
            f"{arm}: {state.step} steps in {seconds:.0f} s; val KL {val['kl']:.4f}, ppl {val['student_ppl']:.1f}"
            + (f"; distinct-2 {samples['distinct_2']:.3f}, teacher NLL {samples['teacher_nll']:.3f}" if samples else "")
            + (f"; {state.stop_reason}" if state.stop_reason else ""),
            flush=True,
        )
        # the weights stay out of the repository; the default student stays in runs/ (ignored)
        if arm != "default" or args.size != "cpu":
            shutil.rmtree(cfg.out_dir, ignore_errors=True)  # for `on_policy_compare.py --student` (GKD's start)


if __name__ == "__main__":
    main()
