"""Links and paths in the repository's own text: every relative link resolves, nothing points outside.

Checked, over the files git knows (tracked, plus new files that are not ignored, so a page is checked
before it is committed):

* every relative link in every markdown file and in every notebook's markdown cells: `[text](target)`,
  `![alt](target)`, reference definitions `[name]: target` and HTML `src=` / `href=` attributes, outside
  code blocks and code spans. Links with a scheme (http:, https:, mailto:, ...) and pure `#anchors` are
  skipped, a `#fragment` is dropped, and the target must be a file git knows, or a folder holding one,
  relative to the file that contains the link;
* every path named in a Python docstring or comment that starts with one of the repository's
  top-level folders (resolved from the repository root) or with `../` (resolved from the file's own
  folder). Paths that `.gitignore` covers are build outputs made by `make setup` or a run, not links,
  and are skipped; so are patterns (a path followed by `*`, `<` or `{`);
* no file mentions the sibling `shared` folder of the machine the project was written on, or an
  absolute path under its work folder: neither exists in a clone.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import tokenize
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Spelled in pieces so that this file does not match its own check.
FORBIDDEN = ("../" + "shared", "/" + "work" + "/")
# Lines allowed to mention a forbidden string: a test whose pattern *detects* machine paths.
ALLOWED = {"tests/test_course.py": "MACHINE_PATHS = re.compile("}

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>\n]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
REF_DEF = re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*(<[^>\n]*>|\S+)", re.M)
HTML_ATTR = re.compile(r"<(?:img|a|source|video|audio|iframe)\b[^>]*?\b(?:src|href)\s*=\s*([\"'])(.*?)\1", re.I | re.S)


# ------------------------------------------------------------------------------------------- the files


@pytest.fixture(scope="module")
def files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"git is not available here: {e}")
    names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
    return [n for n in names if (ROOT / n).is_file()]  # a tracked file deleted in the work tree is skipped


@pytest.fixture(scope="module")
def known(files) -> set[str]:
    """Every file git knows and every folder that holds one, as repository-relative POSIX paths."""
    out = set(files)
    for f in files:
        parts = f.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _resolve(base_dir: str, target: str) -> str | None:
    """Repository-relative path of `target` seen from `base_dir`; None when it leaves the repository."""
    path = target[1:] if target.startswith("/") else os.path.join(base_dir, target)
    norm = os.path.normpath(path).replace(os.sep, "/")
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../") or os.path.isabs(norm):
        return None
    return norm


def _problem(base_dir: str, target: str, known: set[str]) -> str | None:
    rel = _resolve(base_dir, target)
    if rel is None:
        return "points outside the repository"
    if rel != "" and rel not in known:
        return f"{rel} is not a file or folder in the repository"
    return None


# ---------------------------------------------------------------------------------------- markdown


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every relative link in markdown `text` (code blocks and code spans ignored)."""
    lines, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            lines.append("")
        elif fence is not None:
            if m and m.group(1).startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            lines.append("")
        else:
            lines.append(CODE_SPAN.sub(lambda c: "x" * len(c.group(0)), line))
    body = "\n".join(lines)
    found = [(m.start(1), m.group(1)) for m in INLINE_LINK.finditer(body)]
    found += [(m.start(1), m.group(1)) for m in REF_DEF.finditer(body)]
    found += [(m.start(2), m.group(2)) for m in HTML_ATTR.finditer(body)]
    out = []
    for pos, target in sorted(found):
        target = target.strip()
        if target.startswith("<") and target.endswith(">"):
            target = target[1:-1].strip()
        if not target or target.startswith("#") or target.startswith("//") or SCHEME.match(target):
            continue
        target = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if target:
            out.append((body.count("\n", 0, pos) + 1, target))
    return out


def _markdown_sources(files) -> list[tuple[str, str, str]]:
    """(where, folder of the file, markdown text) for every markdown file and notebook markdown cell."""
    out = []
    for f in files:
        folder = os.path.dirname(f)
        if f.endswith(".md"):
            out.append((f, folder, (ROOT / f).read_text(encoding="utf-8", errors="replace")))
        elif f.endswith(".ipynb"):
            try:
                nb = json.loads((ROOT / f).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # a notebook being written right now: its own tests report it
                out.append((f, folder, f"[unreadable notebook: {e}](.)"))
                continue
            for i, cell in enumerate(nb.get("cells", [])):
                if cell.get("cell_type") == "markdown":
                    src = cell.get("source", "")
                    out.append((f"{f} (cell {i})", folder, "".join(src) if isinstance(src, list) else src))
    return out


def test_markdown_links_resolve(files, known):
    sources = _markdown_sources(files)
    assert any(w.endswith(".md") for w, _, _ in sources), "no markdown file found"
    bad = []
    for where, folder, text in sources:
        for line, target in markdown_links(text):
            why = _problem(folder, target, known)
            if why:
                bad.append(f"{where}, line {line}: link ({target}): {why}")
    assert not bad, "broken relative links:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------ python


def _python_text(source: str) -> list[tuple[int, str]]:
    """(first line, text) of every comment and every string statement (docstrings) of a module."""
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out.append((tok.start[0], tok.string))
    except (tokenize.TokenError, SyntaxError):
        pass
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return out
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.append((node.lineno, node.value.value))
    return out


def python_paths(text: str, top_level: list[str]) -> list[tuple[int, str]]:
    """(line offset, path) of the repository paths named in `text`: `<top-level folder>/...` or `../...`."""
    tops = "|".join(re.escape(t) for t in sorted(top_level, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./~-])((?:\.\./)+[\w.-]+(?:/[\w.-]+)*/?|(?:{tops})/(?:[\w.-]+(?:/[\w.-]+)*/?)?)")
    out = []
    for m in pattern.finditer(text):
        nxt = text[m.end() : m.end() + 1]
        if nxt and nxt in "*<{[$%":
            continue  # a pattern, not a path
        path = m.group(1).rstrip(".,:;")
        if path and path.strip("./"):
            out.append((text.count("\n", 0, m.start()), path))
    return out


def _ignored(paths: set[str]) -> set[str]:
    if not paths:
        return set()
    res = subprocess.run(
        ["git", "check-ignore", "--stdin"],
        cwd=ROOT,
        input="\n".join(sorted(paths)) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {p.strip() for p in res.stdout.splitlines() if p.strip()}


def test_python_paths_resolve(files, known):
    top_level = sorted({f.split("/")[0] for f in files if "/" in f})
    candidates = []  # (file, line, path, repository-relative path or None)
    for f in files:
        if not f.endswith(".py"):
            continue
        source = (ROOT / f).read_text(encoding="utf-8", errors="replace")
        for start, text in _python_text(source):
            for offset, path in python_paths(text, top_level):
                base = os.path.dirname(f) if path.startswith("../") else ""
                rel = _resolve(base, path)
                if rel is None or (rel != "" and rel.rstrip("/") not in known):
                    candidates.append((f, start + offset, path, rel))
    ignored = _ignored({rel.rstrip("/") for *_, rel in candidates if rel})
    bad = [
        f"{f}, line {line}: path {path}: "
        + ("points outside the repository" if rel is None else f"{rel} is not a file or folder in the repository")
        for f, line, path, rel in candidates
        if rel is None or rel.rstrip("/") not in ignored
    ]
    assert not bad, "paths in docstrings or comments that do not exist:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------- machine-only paths


def test_no_file_points_at_machine_only_paths(files):
    bad = []
    for f in files:
        data = (ROOT / f).read_bytes()
        for needle in FORBIDDEN:
            raw = needle.encode()
            start = data.find(raw)
            while start != -1:
                line_start = data.rfind(b"\n", 0, start) + 1
                line_end = data.find(b"\n", start)
                line = data[line_start : line_end if line_end != -1 else len(data)].decode("utf-8", "replace")
                if not (f in ALLOWED and ALLOWED[f] in line):
                    lineno = data.count(b"\n", 0, start) + 1
                    bad.append(f"{f}, line {lineno}: mentions {needle!r}: {line.strip()[:120]}")
                start = data.find(raw, start + 1)
    assert not bad, "files that name paths which exist only on the authoring machine:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------- the checkers' rules


def test_markdown_link_extraction_rules():
    text = "\n".join(
        [
            'See [the guide](docs/guide.md#part) and ![a figure](images/a%20b.png "title").',
            "[external](https://example.org) [mail](mailto:a@b.c) [anchor](#results) [wrapped",
            "text](../up.md)",
            '`[in code](no.md)` and <img alt="x" src="pic.png"> and <a href=\'dir/\'>x</a>',
            "```python",
            "x = f[0](y)  # [not a link](nope.md)",
            "```",
            "[ref]: other.md",
        ]
    )
    assert markdown_links(text) == [
        (1, "docs/guide.md"),
        (1, "images/a b.png"),
        (3, "../up.md"),
        (4, "pic.png"),
        (4, "dir/"),
        (8, "other.md"),
    ]


def test_python_path_extraction_rules():
    text = "see docs/guide.md, kdlab/ and ../notes/a.md.\nnot mydocs/x.md, runs/docs/y, docs/*.md or docs/<name>"
    assert python_paths(text, ["docs", "kdlab"]) == [(0, "docs/guide.md"), (0, "kdlab/"), (0, "../notes/a.md")]
    assert _resolve("kdlab", "../docs/a.md") == "docs/a.md"
    assert _resolve("", "../elsewhere/a.md") is None
