"""Execute the course notebooks once, top to bottom, and record how long each took.

    python scripts/run_notebooks.py --profile ci --inplace        # the stored outputs (a quiet machine!)
    python scripts/run_notebooks.py --profile reference --out /tmp/nb-reference
    python scripts/run_notebooks.py --profile cpu --only 00_quickstart --out /tmp/nb-cpu
    python scripts/run_notebooks.py --time-lines      # Time lines, time tables (timings.json), words of prose

Each notebook runs in a fresh kernel with the environment nbval gives it (notebooks/conftest.py: quiet
libraries, no progress bars) and the profile asked for, from the notebooks folder as working directory,
so stored outputs hold relative paths only. The wall time of each notebook (kernel start included) and
the step time of the course's default run at the profile's sizes (`kdlab.course.preflight.time_step`, timed
just before, on the same machine) go into notebooks/timings.json under the profile, with the machine
named: what each notebook's Time line and `kdlab preflight` read.
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
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT))

ENV = {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}  # as notebooks/conftest.py sets them for nbval


NOTES = {  # what each notebook's Time line adds to the measured figures
    "00_quickstart": "two training runs with the live plot (KD + LM, then LM only), the teachers' evaluation, "
    "the payoff table's speed timings and the decoding lesson.",
    "01_concepts": "nothing is trained (the same cells at every profile); the slider needs a running kernel.",
    "02_dtype_mismatch": "the training run at the end is the only part that grows with the profile.",
    "03_loss_normalization": "forward passes on a few validation batches, then one short training run.",
    "04_curriculum": "two short training runs with every term on.",
    "05_logging": "two short runs of the real pair (they train under every profile: printed lines cannot be replayed).",
    "06_early_stopping": "two short runs with every term on.",
    "07_capstone": "one run of the default arm, measured the grid's way; the grid and the write-up's questions "
    "are read from committed runs.",
    "08_on_policy": "three short arms (one generates every step) and the students' text; the equal-wall-time "
    "comparison is read from its committed results.",
    "09_cross_tokenizer": "two short live runs; the measured runs are read from their committed results.",
}
# the markdown files that show the per-notebook time table (between its header row and the "all" row)
TABLE_FILES = ("README.md", "notebooks/README.md", "notebooks/INSTRUCTOR.md")
TABLE_HEAD = "| notebook | `ci` | `reference` | `cpu` | `gpu` |"
PROFILES_SHOWN = ("ci", "reference", "cpu", "gpu")


def time_table(table: dict) -> str:
    """The per-notebook time table (markdown) of timings.json, with a total row per profile."""
    rows = [TABLE_HEAD, "|---|---|---|---|---|"]
    names = sorted(table["notebooks"])
    for name in names:
        row = table["notebooks"][name]
        rows.append(
            f"| {name} | " + " | ".join(f"{row[p]} s" if row.get(p) else "not measured" for p in PROFILES_SHOWN) + " |"
        )
    totals = []
    for p in PROFILES_SHOWN:
        vals = [table["notebooks"][n].get(p) for n in names]
        totals.append(f"{sum(vals)} s" if all(vals) else "not measured")
    rows.append(f"| all {len(names)} | " + " | ".join(totals) + " |")
    return "\n".join(rows)


WORDS_HEAD = "| notebook | words of prose | minutes to read (200 words/min) |"
WORDS_FILES = ("notebooks/INSTRUCTOR.md",)


def prose_words(name: str) -> int:
    """Words in the markdown cells of notebook `name` (what a participant reads; code and outputs not counted)."""
    import re

    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return sum(len(re.findall(r"\S+", "".join(c["source"]))) for c in nb["cells"] if c["cell_type"] == "markdown")


def words_table() -> str:
    names = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    counts = {n: prose_words(n) for n in names}
    rows = [WORDS_HEAD, "|---|---|---|"]
    rows += [f"| {n} | {w:,} | {w / 200:.0f} |" for n, w in counts.items()]
    total = sum(counts.values())
    rows.append(f"| all {len(names)} | {total:,} | {total / 200:.0f} |")
    return "\n".join(rows)


def write_tables(table: dict) -> None:
    """Replace the time table in each of TABLE_FILES by the one timings.json gives."""
    new = time_table(table)
    for rel in TABLE_FILES:
        path = ROOT / rel
        lines = path.read_text().split("\n")
        start = lines.index(TABLE_HEAD)
        end = next(i for i in range(start, len(lines)) if lines[i].startswith("| all "))
        path.write_text("\n".join(lines[:start] + new.split("\n") + lines[end + 1 :]))
        print(f"{rel}: time table rewritten")
    words = words_table()
    for rel in WORDS_FILES:
        path = ROOT / rel
        lines = path.read_text().split("\n")
        start = lines.index(WORDS_HEAD)
        end = next(i for i in range(start, len(lines)) if lines[i].startswith("| all "))
        path.write_text("\n".join(lines[:start] + words.split("\n") + lines[end + 1 :]))
        print(f"{rel}: words table rewritten")


def time_lines(table: dict) -> None:
    """Rewrite the **Time.** paragraph of each notebook's first cell from the measured table."""
    machine_ = table.get("machine", "an unnamed machine")
    for name, row in table["notebooks"].items():
        path = NOTEBOOKS / f"{name}.ipynb"
        if not path.is_file():
            continue
        nb = json.loads(path.read_text())
        cell = nb["cells"][0]
        text = "".join(cell["source"])
        start = text.index("**Time.**")
        end = text.find("\n\n", start)
        figures = " · ".join(f"`{p}` {row[p]} s" for p in ("ci", "reference", "cpu", "gpu") if row.get(p))
        missing = [f"`{p}`" for p in ("reference", "cpu", "gpu") if not row.get(p)]
        line = (
            f"**Time.** Measured with *Run All* in a fresh kernel on {machine_}: {figures}"
            + (f"; {', '.join(missing)} not measured yet" if missing else "")
            + f". {NOTES.get(name, '')[:1].upper()}{NOTES.get(name, '')[1:]}".rstrip()
        )
        text = text[:start] + line + (text[end:] if end >= 0 else "")
        lines = text.split("\n")
        cell["source"] = [ln + "\n" for ln in lines[:-1]] + [lines[-1]]
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: {line}")


def main() -> None:
    import nbformat
    from nbclient import NotebookClient

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-lines", action="store_true", help="only rewrite the Time lines from timings.json")
    ap.add_argument("--profile", help="KDLAB_PROFILE for every notebook: ci, cpu, gpu or reference")
    ap.add_argument("--only", nargs="*", help="notebook names (default: every NN_*.ipynb)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--inplace", action="store_true", help="store the outputs in the notebooks themselves")
    where.add_argument("--out", help="write the executed notebooks to this folder instead")
    ap.add_argument("--no-record", action="store_true", help="do not write notebooks/timings.json")
    args = ap.parse_args()
    if args.time_lines:
        table = json.loads((NOTEBOOKS / "timings.json").read_text())
        time_lines(table)  # first: the words table counts the Time lines' words too
        return write_tables(table)
    if not args.profile or not (args.inplace or args.out):
        ap.error("--profile and one of --inplace / --out are needed (or --time-lines)")
    from kdlab.course import PROFILES

    if args.profile not in PROFILES:
        sys.exit(f"--profile {args.profile!r} is not a profile; choose one of {', '.join(PROFILES)}")
    names = args.only or sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    os.environ.update(ENV | {"KDLAB_PROFILE": args.profile})
    step = None
    if args.profile != "reference":
        from kdlab.course.preflight import time_step

        step = round(time_step(args.profile), 3)
        print(f"step time at the {args.profile} profile's sizes: {step:.2f} s", flush=True)
    from nbclient.exceptions import CellExecutionError

    seconds, failed = {}, []
    for name in names:
        path = NOTEBOOKS / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        try:
            NotebookClient(
                nb,
                timeout=1800,
                kernel_name="python3",
                resources={"metadata": {"path": str(NOTEBOOKS)}},
                store_widget_state=False,
            ).execute()  # the figures are stored as images
        except CellExecutionError as e:
            failed.append(name)
            print(f"{name}: FAILED: {str(e).strip().splitlines()[-1]}", flush=True)
            if args.inplace:  # keep the notebook as it was; the failed run goes to /tmp for a look
                nbformat.write(nb, Path("/tmp") / f"failed-{path.name}")
                continue
        seconds[name] = round(time.perf_counter() - t0)
        out = path if args.inplace else Path(args.out) / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        print(f"{name}: {seconds[name]} s", flush=True)
    print(
        f"all {len(seconds)}: {sum(seconds.values())} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    if args.no_record:
        sys.exit(1 if failed else 0)
    table_path = NOTEBOOKS / "timings.json"
    table = json.loads(table_path.read_text())
    from kdlab.course import describe_machine

    table.setdefault("machines", {})[args.profile] = describe_machine()
    table["machine"] = describe_machine()
    if step is not None:
        table["step_seconds"][args.profile] = step
    for name, s in seconds.items():
        table["notebooks"].setdefault(name, {})[args.profile] = s
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    table.setdefault("measured_at", {})[args.profile] = (head.stdout.strip() or "unknown") + time.strftime(
        ", %Y-%m-%d", time.gmtime()
    )
    table_path.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    if failed:  # the notebooks that ran are recorded; the failed ones keep their earlier figures
        sys.exit(1)


if __name__ == "__main__":
    main()
