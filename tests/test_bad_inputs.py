"""Every bad input a user is likely to hit gets one `kdlab: error: ...` line naming the bad value
(and the allowed ones), exit code 2, and no traceback. The table in docs/bad-inputs.md is this
test's output: the test fails if the doc and the real messages drift apart.

    KDLAB_UPDATE_DOCS=1 pytest tests/test_bad_inputs.py     # rewrite docs/bad-inputs.md
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from kdlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-inputs.md"


def _tiny(env) -> list[str]:
    flags = "--student tiny --student-init random --seq-len 32 --batch-size 2 --eval-batches 1 --device cpu"
    return ["--teacher", str(env["teacher"]), *flags.split()]


# (kind, what the user did, argv builder); the message is whatever kdlab prints
CASES = [
    ("config", "negative temperature: `--temperature -1`", lambda e: ["train", "--temperature", "-1"]),
    ("config", "weight out of range: `--alpha-kd 1.5`", lambda e: ["train", "--alpha-kd", "1.5"]),
    ("config", "unknown choice: `--kd-divergence tvd`", lambda e: ["train", "--kd-divergence", "tvd"]),
    ("config", "unknown curriculum preset: `--curriculum linear`", lambda e: ["train", "--curriculum", "linear"]),
    (
        "config",
        "ramp that ends before it starts: `--ramps '{feature: {start: 0.5, end: 0.2}}'`",
        lambda e: ["train", "--ramps", "{feature: {start: 0.5, end: 0.2}}"],
    ),
    (
        "config",
        "early stopping on the weighted total: `--es-monitor val_loss`",
        lambda e: ["train", "--es-monitor", "val_loss"],
    ),
    ("config", "patience 0: `--es-patience 0`", lambda e: ["train", "--es-patience", "0"]),
    ("config", "wrong type: `--batch-size two`", lambda e: ["train", "--batch-size", "two"]),
    ("config", "unknown distribution engine: `--distributed fsdp`", lambda e: ["train", "--distributed", "fsdp"]),
    ("config", "typo in a YAML key: `alpha_dk: 0`", lambda e: ["train", "--config", str(e["typo.yaml"])]),
    ("config", "YAML file that does not exist", lambda e: ["train", "--config", str(e["tmp"] / "nope.yaml")]),
    ("config", "YAML that is a list, not a mapping", lambda e: ["train", "--config", str(e["list.yaml"])]),
    ("cli", "misspelt flag: `--lerning-rate 1`", lambda e: ["train", "--lerning-rate", "1"]),
    ("cli", "misspelt command: `kdlab trian`", lambda e: ["trian"]),
    (
        "cli",
        "unknown profile to time: `kdlab preflight --profiles huge`",
        lambda e: ["preflight", "--profiles", "huge"],
    ),
    ("model", "teacher folder that does not exist", lambda e: ["train", "--teacher", str(e["tmp"] / "no-teacher")]),
    ("model", "folder that is not a model (no config.json)", lambda e: ["train", "--teacher", str(e["tmp"])]),
    ("model", "`--device cuda` on a machine without CUDA", lambda e: ["train", "--device", "cuda"]),
    ("data", "data file that does not exist", lambda e: ["train", *_tiny(e), "--data", str(e["tmp"] / "nope.txt")]),
    (
        "data",
        "empty corpus",
        lambda e: ["train", *_tiny(e), "--data", str(e["empty.txt"]), "--data-dir", str(e["tmp"] / "d1")],
    ),
    (
        "data",
        "corpus too small for the batch: `--batch-size 100000`",
        lambda e: ["train", *_tiny(e), "--batch-size", "100000"],
    ),
    ("config", "cached teacher without top-k KD: `--teacher-cache c`", lambda e: ["train", "--teacher-cache", "c"]),
    (
        "config",
        "cached teacher with an intermediate term: `--teacher-cache c --kd-top-k 256 --w-feature 0.5`",
        lambda e: ["train", "--teacher-cache", "c", "--kd-top-k", "256", "--w-feature", "0.5"],
    ),
    (
        "model",
        "top-k above the teacher's vocabulary: `--kd-top-k 100000000`",
        lambda e: ["train", *_tiny(e), "--kd-top-k", "100000000"],
    ),
    (
        "model",
        "a student deeper than the teacher: `--student-init teacher-layers --student-depth 3`",
        lambda e: ["train", *_tiny(e), "--student-init", "teacher-layers", "--student-depth", "3"],
    ),
    (
        "config",
        "a layer list that is not one: `--student-layers 0,x`",
        lambda e: ["train", "--student-layers", "0,x"],
    ),
    ("cache", "`kdlab cache-teacher` without `--teacher-cache`", lambda e: ["cache-teacher"]),
    (
        "cache",
        "`--teacher-cache` folder that holds no cache",
        lambda e: ["train", *_tiny(e), "--kd-top-k", "16", "--teacher-cache", str(e["tmp"] / "no-cache")],
    ),
    (
        "checkpoint",
        "`--resume` with nothing to resume",
        lambda e: ["train", *_tiny(e), "--resume", "--out-dir", str(e["tmp"] / "fresh")],
    ),
    (
        "checkpoint",
        "`--resume` with other settings (`--lr 0.1`)",
        lambda e: ["train", *_tiny(e), "--max-steps", "2", "--lr", "0.1", "--resume", "--out-dir", str(e["run"])],
    ),
    (
        "checkpoint",
        "`--resume` from a corrupt checkpoint (truncated model.safetensors)",
        lambda e: ["train", *_tiny(e), "--max-steps", "2", "--resume", "--out-dir", str(e["corrupt"])],
    ),
    (
        "checkpoint",
        "`--resume` where `latest` names a folder that is gone",
        lambda e: ["train", *_tiny(e), "--max-steps", "2", "--resume", "--out-dir", str(e["dangling"])],
    ),
    (
        "checkpoint",
        "`--resume` with another student (`--student small`)",
        lambda e: [
            "train",
            *_tiny(e),
            "--max-steps",
            "2",
            "--student",
            "small",
            "--resume",
            "--out-dir",
            str(e["run"]),
        ],
    ),
    (
        "run folder",
        "a new run into a folder that holds a run (no `--resume`)",
        lambda e: ["train", *_tiny(e), "--max-steps", "3", "--out-dir", str(e["run"])],
    ),
    ("config", "`--resume --overwrite`", lambda e: ["train", "--resume", "--overwrite"]),
    (
        "model",
        "sequence longer than the models' positions: `--seq-len 100000`",
        lambda e: ["train", *_tiny(e), "--seq-len", "100000"],
    ),
    (
        "config",
        "weight for a term that is not registered: `--term-weights '{kl_rev: 1}'`",
        lambda e: ["train", "--term-weights", "{kl_rev: 1}"],
    ),
    ("on-policy", "mixing probability out of range: `--on-policy 1.5`", lambda e: ["train", "--on-policy", "1.5"]),
    (
        "on-policy",
        "a prompt as long as the block: `--on-policy 1 --prompt-tokens 256`",
        lambda e: ["train", "--on-policy", "1", "--prompt-tokens", "256"],
    ),
    (
        "on-policy",
        "a continuation longer than the models' positions: `--on-policy 1 --gen-tokens 5000`",
        lambda e: ["train", *_tiny(e), "--on-policy", "1", "--prompt-tokens", "16", "--gen-tokens", "5000"],
    ),
    (
        "on-policy",
        "on-policy with a teacher cache: `--on-policy 0.5 --teacher-cache c --kd-top-k 256`",
        lambda e: ["train", "--on-policy", "0.5", "--teacher-cache", "c", "--kd-top-k", "256"],
    ),
    (
        "cross-tokenizer",
        "a student tokenizer that does not exist: `--student-tokenizer bpe-8k`",
        lambda e: ["train", "--student-tokenizer", "bpe-8k"],
    ),
    (
        "cross-tokenizer",
        "a student whose embedding is smaller than its own tokenizer (100 rows, 8,192 tokens)",
        lambda e: ["train", *_tiny(e), "--student", str(e["small-vocab"]), "--student-tokenizer", "austen-bpe-8k"],
    ),
    (
        "cross-tokenizer",
        "a position-by-position term across tokenizers: `--student-tokenizer austen-bpe-8k --w-feature 0.5`",
        lambda e: ["train", "--student-tokenizer", "austen-bpe-8k", "--w-feature", "0.5"],
    ),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_teacher, austen_ready):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    e = {"tmp": tmp, "teacher": tiny_teacher}
    (tmp / "typo.yaml").write_text("batch_size: 2\nalpha_dk: 0\n")
    (tmp / "list.yaml").write_text("- batch_size: 2\n")
    (tmp / "empty.txt").write_text("\n\n")
    e.update({k: tmp / k for k in ("typo.yaml", "list.yaml", "empty.txt")})
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=32)  # fmt: skip
    LlamaForCausalLM(small).save_pretrained(tmp / "small-vocab")
    e["small-vocab"] = tmp / "small-vocab"
    # a real run with checkpoints, then damaged copies of it
    run = tmp / "run"
    tiny = _tiny(e)
    assert main(["-q", "train", *tiny, "--max-steps", "2", "--out-dir", str(run)]) == 0
    e["run"] = run
    shutil.copytree(run, tmp / "corrupt")
    f = tmp / "corrupt" / "checkpoints" / "step-000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    e["corrupt"] = tmp / "corrupt"
    shutil.copytree(run, tmp / "dangling")
    shutil.rmtree(tmp / "dangling" / "checkpoints" / "step-000002")
    e["dangling"] = tmp / "dangling"
    return e


def _run_case(env, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


def test_bad_inputs_get_one_line_and_exit_2_and_the_doc_says_so(env, capsys):
    rows = []
    for kind, what, argv in CASES:
        if "cuda" in what and torch.cuda.is_available():
            continue
        code, err = _run_case(env, argv(env), capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2, (what, code, err)
        assert len(lines) == 1 and lines[0].startswith("kdlab"), (what, err)
        assert "Traceback" not in err
        message = lines[0].replace(str(env["tmp"]), "<tmp>").replace(str(env["teacher"]), "<teacher>")
        if len(message) > 230:
            message = message[:227] + "..."
        rows.append(f"| {len(rows) + 1} | {kind} | {what} | {code} | `{message}` |")
    table = "\n".join(
        ["| # | kind | input | exit | what kdlab prints (stderr, one line) |", "|---|---|---|---|---|", *rows]
    )
    doc = DOC.read_text() if DOC.exists() else ""
    begin, end = "<!-- table: generated by tests/test_bad_inputs.py -->", "<!-- end of table -->"
    if os.environ.get("KDLAB_UPDATE_DOCS"):
        head, _, rest = doc.partition(begin)
        _, _, tail = rest.partition(end)
        DOC.write_text(f"{head}{begin}\n{table}\n{end}{tail}")
        doc = DOC.read_text()
    assert f"{begin}\n{table}\n{end}" in doc, "docs/bad-inputs.md is out of date: rerun with KDLAB_UPDATE_DOCS=1"
    assert len(rows) >= 12
