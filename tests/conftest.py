"""Shared fixtures: a tiny random teacher with the real tokenizer, so end-to-end runs take seconds.

Tests that need the prepared corpus or teacher (built by `make setup`) skip with a clear reason
when they are missing, so `pytest` still runs the pure unit tests on a bare checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
TEACHER_DIR = DATA_DIR / "teacher" / "smollm2-135m"

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def cli_flags(overrides: dict) -> list[str]:
    """Config overrides as `kdlab train` flags (`alpha_kd` -> `--alpha-kd 0.5`; booleans as
    `--early-stopping` / `--no-early-stopping`)."""
    flags = []
    for k, v in overrides.items():
        name = k.replace("_", "-")
        flags += [f"--{name}" if v else f"--no-{name}"] if isinstance(v, bool) else [f"--{name}", str(v)]
    return flags


@pytest.fixture(scope="session", name="cli_flags")
def cli_flags_fixture():
    """`cli_flags` for tests (a fixture, since test modules do not import conftest)."""
    return cli_flags


def _need(path: Path):
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is missing: run `make setup` first")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    _need(TEACHER_DIR / "tokenizer.json")
    return TEACHER_DIR


@pytest.fixture(scope="session")
def austen_ready() -> Path:
    _need(DATA_DIR / "austen" / "train.jsonl")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's 49,152-token vocabulary and tokenizer, saved to disk."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-teacher")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_overrides(tiny_teacher, austen_ready, tmp_path) -> dict:
    """Config overrides for a few-second CPU run: tiny teacher and student, short blocks."""
    return {
        "teacher": str(tiny_teacher),
        "student": "tiny",
        "student_init": "random",
        "data": "austen",
        "data_dir": str(austen_ready),
        "seq_len": 32,
        "batch_size": 2,
        "max_steps": 6,
        "warmup_steps": 1,
        "lr": 1e-3,
        "eval_every": 3,
        "eval_batches": 2,
        "log_every": 2,
        "save_every": 3,
        "out_dir": str(tmp_path / "run"),
        "device": "cpu",
    }


@pytest.fixture
def add_preset():
    """`add_preset(name, layers)`: a student preset of the tiny teachers' width (64, 4 heads, 2 KV heads,
    MLP 128) with `layers` layers, registered for one test and removed after it."""
    from kdlab.models import STUDENT_PRESETS

    added = []

    def add(name: str, layers: int) -> str:
        STUDENT_PRESETS[name] = dict(
            hidden_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
        )
        added.append(name)
        return name

    yield add
    for name in added:
        STUDENT_PRESETS.pop(name, None)
