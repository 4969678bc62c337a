"""Corpus splits, checksums, packing and the deterministic batch order."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab.data.batches import PackedBatches
from kdlab.data.corpus import PackedSplit, load_documents, prepare_austen, split_of, tokenize_and_pack
from kdlab.errors import KDLabError
from kdlab.loss.divergences import IGNORE_INDEX
from kdlab.manifest import load_manifest, sha256_file


def test_split_rule_holds_out_one_in_twenty_each():
    splits = [split_of(i) for i in range(200)]
    assert splits.count("validation") == 10 and splits.count("test") == 10


def test_austen_splits_are_whole_disjoint_chapters_and_match_the_manifest(austen_ready):
    files = prepare_austen(austen_ready)  # verifies the checksums, rebuilds nothing
    manifest = load_manifest()["austen"]["splits"]
    chapters = {}
    for split, path in files.items():
        assert sha256_file(path) == manifest[path.name]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        chapters[split] = {(r["book"], r["chapter"]) for r in rows}
        assert all(r["text"].split("\n", 1)[0].lower().startswith("chapter") for r in rows)
    assert len(chapters["train"]) == 243 and len(chapters["validation"]) == 13 and len(chapters["test"]) == 13
    assert not (chapters["train"] & chapters["validation"]) and not (chapters["train"] & chapters["test"])
    assert not (chapters["validation"] & chapters["test"])
    assert {b for b, _ in chapters["train"]} == {
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    }


def test_corrupt_split_file_is_rebuilt_or_refused(austen_ready, tmp_path):
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(austen_ready / "austen", data_dir / "austen")
    (data_dir / "austen" / "test.jsonl").write_text('{"text": "tampered"}\n')
    deb = austen_ready / "downloads" / load_manifest()["austen"]["deb"]["name"]
    if not deb.is_file():
        pytest.skip("the downloaded .deb is not cached")
    (data_dir / "downloads").mkdir()
    shutil.copy(deb, data_dir / "downloads")
    files = prepare_austen(data_dir)  # notices the mismatch and rebuilds from the verified package
    assert sha256_file(files["test"]) == load_manifest()["austen"]["splits"]["test.jsonl"]
    (data_dir / "downloads" / deb.name).write_bytes(b"!<arch>\nnot the real package")
    (data_dir / "austen" / "test.jsonl").write_text("tampered again\n")
    with pytest.raises(KDLabError, match="checksum mismatch for the r-cran-janeaustenr package"):
        prepare_austen(data_dir)


def test_packing_pads_the_tail_and_masks_it(tokenizer_dir, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "It is a truth universally acknowledged. " * 3
    docs = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"text": [text, "Short one."]}) for s in ("train", "validation", "test")}
    )
    packed = tokenize_and_pack(docs, tok, seq_len=16)["train"]
    n_tokens = (
        len(tok(text, add_special_tokens=False)["input_ids"])
        + len(tok("Short one.", add_special_tokens=False)["input_ids"])
        + 2
    )  # two EOS
    assert packed.num_tokens == n_tokens
    assert len(packed) == -(-n_tokens // 16)
    last = packed.batch([len(packed) - 1])
    pad = last["attention_mask"][0] == 0
    assert pad.any() and (last["labels"][0][pad] == IGNORE_INDEX).all()
    assert (last["labels"][0][~pad] == last["input_ids"][0][~pad]).all()


def test_local_text_files_become_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i}. " + "word " * 200 for i in range(100)))
    docs = load_documents(str(tmp_path / "a.txt"), tmp_path)
    sizes = {s: len(docs[s]) for s in ("train", "validation", "test")}
    assert sizes["validation"] >= 1 and sizes["test"] >= 1 and sizes["train"] > 10 * sizes["test"]


def test_packed_batches_are_deterministic_resumable_and_split_over_processes():
    data = PackedSplit(torch.arange(40).reshape(20, 2), torch.ones(20, 2, dtype=torch.long))
    src = PackedBatches(data, batch_size=3, seed=7)
    assert src.steps_per_epoch == 6  # 20 // 3, the incomplete batch is dropped
    full = [src.next_step()[0]["input_ids"] for _ in range(12)]  # two epochs
    assert src.state_dict() == {"epoch": 2, "batch_in_epoch": 0}
    again = PackedBatches(data, batch_size=3, seed=7)
    again.load_state_dict({"epoch": 0, "batch_in_epoch": 4})
    assert all(torch.equal(a, again.next_step()[0]["input_ids"]) for a in full[4:8])
    assert not all(torch.equal(a, b) for a, b in zip(full[:6], full[6:]))  # a new order each epoch
    # two processes with batch 3 see, together, what one process with batch 6 sees
    one = PackedBatches(data, batch_size=6, seed=7).next_step()[0]["input_ids"]
    two = [PackedBatches(data, batch_size=3, seed=7, rank=r, world=2).next_step()[0]["input_ids"] for r in (0, 1)]
    assert torch.equal(torch.cat(two), one)
