"""Checksums of everything built at set-up, kept in the committed data/MANIFEST.json.

Large artifacts (the corpus text, the teacher's weights) stay out of git; the manifest pins what
set-up must produce, so a changed upstream package or a corrupt download is caught, not trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kdlab.errors import KDLabError

MANIFEST = Path(__file__).resolve().parent.parent / "data" / "MANIFEST.json"


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_manifest() -> dict:
    if not MANIFEST.is_file():
        raise KDLabError(f"{MANIFEST} is missing; it is part of the repository (git checkout data/MANIFEST.json)")
    return json.loads(MANIFEST.read_text())


def verify(path: str | Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise KDLabError(
            f"checksum mismatch for {what} ({path}): sha256 {actual[:16]}... but data/MANIFEST.json "
            f"expects {expected[:16]}...; delete the file and run `kdlab prepare` again"
        )
