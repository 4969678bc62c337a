"""Bring what the GPU machine lacks (the teacher's GGUF, the Austen splits, Python wheels) across its
per-command upload limit: one payload, split into parts sent by back-to-back commands, joined there.

    python scripts/gpu_ship.py pack [--wheels] [--part-mib 40]    # here: .gpu/payload.json + .gpu/part-NN-of-MM
    python scripts/gpu_ship.py receive .gpu/part-01-of-03         # there, one command per part, back to back
    python scripts/gpu_ship.py assemble --to /tmp/kdlab-payload   # there, after the last part: join, check, unpack
    bash scripts/gpu_course.sh --dry-run                          # here: the whole round trip on the CPU

Why parts: a device command carries at most 64 MiB (the working tree included) and the GGUF alone is
98 MB. Files the machine keeps in /tmp survive between commands only while it stays warm (about 30 s
after a command), so the parts go in consecutive commands and each `receive` says which are still to
come. Every part carries its sha256 (payload.json), the joined payload its own, and after unpacking
the GGUF and the Austen splits are checked against data/MANIFEST.json, the same checks `kdlab prepare`
makes here: a truncated or corrupted transfer fails in one line naming the part, never as a teacher
with wrong weights. `KDLAB_TEACHER_GGUF=<payload>/gguf/<file>` then points `kdlab prepare` at it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "data" / "MANIFEST.json"

SHIP = ROOT / ".gpu"  # ignored (.gitignore): named in a device call's `carry`
STORE = Path("/tmp/kdlab-ship")  # where the device machine keeps the parts between commands
WHEELS = ROOT / "scripts" / "gpu_wheels.txt"  # the packages the device image lacks, pinned
SPLITS = ("train.jsonl", "validation.jsonl", "test.jsonl")


class ShipError(Exception):
    """A transfer that cannot go on: one line naming the part or file and what to do."""


# receive and assemble run on the device before the wheels are installed, so they import nothing of
# kdlab (its package imports datasets): the hashes and the manifest are read here directly
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def download_wheels(folder: Path) -> list[Path]:
    """The wheels of scripts/gpu_wheels.txt for the device's Python 3.12 on x86-64 (pip, from PyPI)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [ln.split("#")[0].strip() for ln in WHEELS.read_text().splitlines()]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34)] + ["--platform=manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version=3.12"]
    cmd += ["--implementation=cp", *platforms, "-d", str(folder), *(n for n in names if n)]
    subprocess.run(cmd, check=True)
    return sorted(folder.glob("*.whl"))


def pack(out: Path, part_mib: float, wheels: list[Path], data_dir: Path) -> dict:
    """Write out/payload.json and out/part-NN-of-MM: a tar of the GGUF, the Austen splits and `wheels`."""
    sys.path.insert(0, str(ROOT))
    from kdlab.models import _gguf_path

    gguf = _gguf_path()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(gguf, arcname=f"gguf/{gguf.name}")
        for name in SPLITS:
            tar.add(data_dir / "austen" / name, arcname=f"austen/{name}")
        for whl in wheels:
            tar.add(whl, arcname=f"whl/{whl.name}")
    data = buf.getvalue()
    size = int(part_mib * 2**20)
    n = -(-len(data) // size)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parts = []
    for i in range(n):
        chunk = data[i * size : (i + 1) * size]
        name = f"part-{i + 1:02d}-of-{n:02d}"
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": _sha256(chunk)})
    meta = {
        "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "bytes": len(data),
        "sha256": _sha256(data),
        "parts": parts,
        "gguf": gguf.name,
        "wheels": [w.name for w in wheels],
    }
    (out / "payload.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def receive(part: Path, store: Path) -> list[str]:
    """Check one part against payload.json beside it and keep it in `store`; the names still to come."""
    meta_file = part.parent / "payload.json"
    if not part.is_file() or not meta_file.is_file():
        raise ShipError(f"{part} (and payload.json beside it) must be carried to this command; got none")
    meta = json.loads(meta_file.read_text())
    entry = next((p for p in meta["parts"] if p["name"] == part.name), None)
    if entry is None:
        raise ShipError(
            f"{part.name} is not a part of this payload; its parts: {', '.join(p['name'] for p in meta['parts'])}"
        )
    got = sha256_file(part)
    if got != entry["sha256"]:
        raise ShipError(
            f"{part.name}: sha256 {got[:16]}... but payload.json expects {entry['sha256'][:16]}...; send it again"
        )
    store.mkdir(parents=True, exist_ok=True)
    old = store / "payload.json"
    if old.is_file() and json.loads(old.read_text())["sha256"] != meta["sha256"]:  # parts of an older payload
        for p in store.glob("part-*"):
            p.unlink()
    shutil.copyfile(meta_file, store / "payload.json")
    shutil.copyfile(part, store / (part.name + ".tmp"))
    (store / (part.name + ".tmp")).replace(store / part.name)
    return [p["name"] for p in meta["parts"] if not (store / p["name"]).is_file()]


def assemble(store: Path, to: Path) -> dict[str, Path]:
    """Join the parts in `store`, check the payload and its files (data/MANIFEST.json), unpack into `to`."""
    meta_file = store / "payload.json"
    if not meta_file.is_file():
        raise ShipError(f"no payload in {store}: send its parts with `gpu_ship.py receive` first")
    meta = json.loads(meta_file.read_text())
    missing = [p["name"] for p in meta["parts"] if not (store / p["name"]).is_file()]
    if missing:
        raise ShipError(f"missing {', '.join(missing)} of {len(meta['parts'])} parts in {store}: send them first")
    h, buf = hashlib.sha256(), io.BytesIO()
    for p in meta["parts"]:
        chunk = (store / p["name"]).read_bytes()
        h.update(chunk)
        buf.write(chunk)
    if h.hexdigest() != meta["sha256"]:
        raise ShipError(f"the joined payload's sha256 {h.hexdigest()[:16]}... is not {meta['sha256'][:16]}...")
    shutil.rmtree(to, ignore_errors=True)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r") as tar:
        tar.extractall(to, filter="data")
    manifest = load_manifest()
    gguf = to / "gguf" / manifest["teacher"]["gguf"]["file"]
    checks = [(gguf, manifest["teacher"]["gguf"]["sha256"], "the SmolLM2 GGUF")]
    checks += [(to / "austen" / s, manifest["austen"]["splits"][s], f"the Austen {s}") for s in SPLITS]
    for path, want, what in checks:
        got = sha256_file(path) if path.is_file() else "absent"
        if got != want:
            raise ShipError(f"{what} ({path}): sha256 {got[:16]}... but data/MANIFEST.json expects {want[:16]}...")
    return {"gguf": gguf, "austen": to / "austen", "wheels": to / "whl"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="here: the payload, split into parts")
    p.add_argument("--out", type=Path, default=SHIP)
    p.add_argument("--part-mib", type=float, default=40.0, help="MiB per part (a command carries <= 64 MiB in all)")
    p.add_argument("--wheels", action="store_true", help=f"include the wheels of {WHEELS.name} (pip download)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    r = sub.add_parser("receive", help="there: keep one part (checked) in the store")
    r.add_argument("part", type=Path)
    r.add_argument("--store", type=Path, default=STORE)
    a = sub.add_parser("assemble", help="there: join the parts, check them, unpack")
    a.add_argument("--store", type=Path, default=STORE)
    a.add_argument("--to", type=Path, default=Path("/tmp/kdlab-payload"))
    args = ap.parse_args(argv)
    try:
        if args.verb == "pack":
            wheels = download_wheels(ROOT / ".whl") if args.wheels else []
            meta = pack(args.out, args.part_mib, wheels, args.data_dir)
            print(
                f"payload {meta['bytes'] / 2**20:.1f} MiB ({meta['gguf']}, the Austen splits, {len(wheels)} wheels) "
                f"in {len(meta['parts'])} parts under {args.out}; send each with its own command, back to back: "
                + ", ".join(p["name"] for p in meta["parts"])
            )
        elif args.verb == "receive":
            left = receive(args.part, args.store)
            print(
                f"{args.part.name} received (sha256 ok); "
                + (f"still to come: {', '.join(left)}" if left else "all parts here")
            )
        else:
            paths = assemble(args.store, args.to)
            print(f"payload joined and checked against data/MANIFEST.json: {paths['gguf']} and the Austen splits")
    except ShipError as e:  # one line, exit 2, as kdlab's CLI does
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
