"""benchmarks/bench.py's own arithmetic, so the recorded figures rest on checked code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_flops_follow_the_textbook_count(bench):
    from transformers import LlamaConfig, LlamaForCausalLM

    V, d, L, ff, H, kv = 1000, 64, 3, 96, 4, 2
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=d,
            num_hidden_layers=L,
            intermediate_size=ff,
            num_attention_heads=H,
            num_key_value_heads=kv,
            tie_word_embeddings=True,
        )
    )
    head = d // H
    per_layer = d * H * head + 2 * d * kv * head + H * head * d + 3 * d * ff + 2 * d  # q, k+v, o, MLP, 2 norms
    n = L * per_layer + d + V * d  # + final norm + the (tied) output projection, counted once
    assert bench.matmul_params(model) == n
    T = 128
    assert bench.flops_per_token(model, T, training=True) == 6 * n + 12 * L * H * head * T
    assert bench.flops_per_token(model, T, training=False) == pytest.approx((6 * n + 12 * L * H * head * T) / 3)


def test_loss_section_measures_the_same_loss_both_ways(bench):
    """The child that measures one loss variant: naive and chunked agree, chunked allocates less."""
    naive = bench._loss_child("naive", 512, "cpu", 1, False, "mem")
    chunked = bench._loss_child("chunked", 512, "cpu", 1, False, "mem")
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-6)
    assert chunked["grad_norm"] == pytest.approx(naive["grad_norm"], rel=1e-5)
    one = 512 * bench.VOCAB * 4  # one [N, V] fp32 tensor
    assert naive["peak"] > 3 * one and chunked["peak"] < naive["peak"]
