"""scripts/gpu_ship.py, the GPU machine's transfer of the teacher's GGUF and the corpus, on the CPU:
packed into parts, each part received by its own command, joined and checked against data/MANIFEST.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kdlab.models
from kdlab.errors import KDLabError
from kdlab.manifest import load_manifest, sha256_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_ship.py"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_ship  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (ROOT / "data" / "austen" / "train.jsonl").is_file(), reason="needs `make setup` (the Austen splits)"
)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("ship") / ".gpu"
    meta = gpu_ship.pack(out, part_mib=40, wheels=[], data_dir=ROOT / "data")
    return out, meta


def test_the_round_trip_gives_back_the_manifests_files(packed, tmp_path):
    out, meta = packed
    # 98 MB of GGUF + 4 MB of corpus in parts that each leave room for the working tree in a 64 MiB call
    assert len(meta["parts"]) == 3 and all(p["bytes"] <= 40 * 2**20 for p in meta["parts"])
    store = tmp_path / "store"
    for i, part in enumerate(meta["parts"]):  # one process per part, as one device command per part
        r = subprocess.run(
            [sys.executable, str(SCRIPT), "receive", str(out / part["name"]), "--store", str(store)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert ("all parts here" in r.stdout) == (i == len(meta["parts"]) - 1), r.stdout
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "assemble", "--store", str(store), "--to", str(tmp_path / "payload")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    manifest = load_manifest()
    gguf = tmp_path / "payload" / "gguf" / manifest["teacher"]["gguf"]["file"]
    assert sha256_file(gguf) == manifest["teacher"]["gguf"]["sha256"]  # an independent hash of the result
    for split, digest in manifest["austen"]["splits"].items():
        assert sha256_file(tmp_path / "payload" / "austen" / split) == digest


def test_a_corrupted_part_is_refused_by_name(packed, tmp_path):
    out, meta = packed
    bad = tmp_path / "carried"
    bad.mkdir()
    name = meta["parts"][1]["name"]
    data = bytearray((out / name).read_bytes())
    data[12345] ^= 0xFF  # one flipped byte
    (bad / name).write_bytes(bytes(data))
    (bad / "payload.json").write_text((out / "payload.json").read_text())
    with pytest.raises(
        gpu_ship.ShipError, match=rf"^{name}: sha256 [0-9a-f]{{16}}\.\.\. but payload.json expects .*send it again"
    ):
        gpu_ship.receive(bad / name, tmp_path / "store")
    assert not (tmp_path / "store" / name).exists()


def test_assembling_with_a_part_missing_names_it(packed, tmp_path):
    out, meta = packed
    store = tmp_path / "store"
    for part in meta["parts"][:-1]:
        gpu_ship.receive(out / part["name"], store)
    last = meta["parts"][-1]["name"]
    with pytest.raises(gpu_ship.ShipError, match=rf"missing {last} of 3 parts in .*: send them first"):
        gpu_ship.assemble(store, tmp_path / "payload")
    r = subprocess.run([sys.executable, str(SCRIPT), "assemble", "--store", str(store)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and last in r.stderr


def test_parts_of_an_older_payload_are_not_mixed_in(packed, tmp_path):
    out, meta = packed
    store = tmp_path / "store"
    store.mkdir()
    (store / "payload.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    (store / meta["parts"][2]["name"]).write_bytes(b"stale")
    gpu_ship.receive(out / meta["parts"][0]["name"], store)
    assert not (store / meta["parts"][2]["name"]).exists()


def test_the_teacher_gguf_can_be_named_by_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(kdlab.models.GGUF_VAR, str(tmp_path / "nothing.gguf"))
    with pytest.raises(KDLabError, match=r"KDLAB_TEACHER_GGUF='.*nothing.gguf' is not a file"):
        kdlab.models._gguf_path()
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGUF, but not the teacher")
    monkeypatch.setenv(kdlab.models.GGUF_VAR, str(wrong))
    with pytest.raises(KDLabError, match=r"checksum mismatch for the SmolLM2 GGUF file"):
        kdlab.models.prepare_teacher(tmp_path / "data")


def test_receive_and_assemble_import_neither_kdlab_nor_torch(packed, tmp_path):
    # on the device they run before the wheels (datasets, ...) are installed, so they must not need them
    out, meta = packed
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import gpu_ship; from pathlib import Path\n"
        f"for p in {[p['name'] for p in meta['parts']]!r}:\n"
        f"    gpu_ship.receive(Path({str(out)!r}) / p, Path({str(tmp_path)!r}))\n"
        f"gpu_ship.assemble(Path({str(tmp_path)!r}), Path({str(tmp_path / 'payload')!r}))\n"
        "assert not {'kdlab', 'torch', 'datasets'} & set(sys.modules), sorted({'kdlab', 'torch'} & set(sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
