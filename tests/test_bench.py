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


def test_the_flops_section_counts_a_known_workload_from_the_profiler(bench):
    """The profiler's shapes give 2 M K N per product: a Linear forward+backward and a bmm, counted by hand."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    lin = torch.nn.Linear(48, 80)
    x = torch.randn(6, 48, requires_grad=True)
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        lin(x).sum().backward()  # forward addmm; backward: dx = g W (mm), dW = g^T x (mm)
        torch.bmm(a, b)
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in bench.GEMM_OPS:
            got = bench._gemm_flops(e.key, e.input_shapes)
            assert got is not None, (e.key, e.input_shapes)
            total += got[0] * e.count
    assert total == 3 * 2 * 6 * 48 * 80 + 2 * 3 * 5 * 7 * 2
    assert bench._standalone_seconds(("mm", 64, 32, 16), torch.float32) > 0
    assert bench._standalone_seconds(("bmm", 2, 8, 4, 3), torch.float32) > 0
