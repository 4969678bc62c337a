"""How many of kdlab's source files a change touches, counted from the code of a revision.

    python scripts/change_cost.py                 # the working tree
    python scripts/change_cost.py f685c41 HEAD    # revisions side by side

For each change, the files under kdlab/ (the course excluded: it is not where a change is made) whose
code, with comments and docstrings stripped, names what the change has to edit:
    add a built-in term     an existing term's own name and weight setting (layerwise, w_layerwise):
                            every place that lists the terms by hand
    add a divergence        an existing divergence's name (reverse_kl): every place that lists or
                            special-cases the divergences
    switch DDP to FSDP2     torch.distributed itself (DistributedDataParallel, no_sync, dist.*, init,
                            fully_shard), the process bookkeeping (DistInfo) and free functions over
                            it (all_reduce_sum(t, info), barrier(info), ...), or a wrapper's insides
                            (model.module): every place that knows how the step is distributed
                            instead of asking one object (a method call, engine.barrier(), is not)
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANGES = {
    "add a built-in term": r"\blayerwise\b|\bw_layerwise\b",
    "add a divergence": r"\breverse_kl\b",
    "switch DDP to FSDP2": r"DistributedDataParallel|\bno_sync\b|\bdist\.|init_process_group|init_from_env"
    r"|fully_shard|ReduceOp|DistInfo|\"module\"|(?<![\w.])(all_reduce_sum|all_reduce_max|barrier|broadcast_object)\(",
}


def code_only(source: str) -> str:
    """The source with its comments and docstrings (strings that are statements of their own) blanked."""
    lines = source.splitlines(keepends=True)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return source
    prev = tokenize.INDENT
    for tok in tokens:
        docstring = tok.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE, tokenize.DEDENT)
        if tok.type == tokenize.COMMENT or docstring:
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                line = lines[r - 1]
                a, b = (c0 if r == r0 else 0), (c1 if r == r1 else len(line.rstrip("\n")))
                lines[r - 1] = line[:a] + " " * (b - a) + line[b:]
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok.type
    return "".join(lines)


def sources(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {
            str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "kdlab").rglob("*.py") if "course" not in p.parts
        }
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "kdlab"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for n in names
        if n.endswith(".py") and "/course/" not in n
    }


def touched(files: dict[str, str]) -> dict[str, list[str]]:
    code = {name: code_only(src) for name, src in files.items()}
    return {change: sorted(n for n, c in code.items() if re.search(rx, c)) for change, rx in CHANGES.items()}


def main(revs: list[str]) -> None:
    revs = revs or [None]
    results = {rev or "working tree": touched(sources(rev)) for rev in revs}
    for change in CHANGES:
        print(f"{change}:")
        for rev, found in results.items():
            files = found[change]
            print(f"  {rev:<14} {len(files):>2} files  {', '.join(Path(f).name for f in files)}")


if __name__ == "__main__":
    main(sys.argv[1:])
