"""Intermediate-representation losses against float64 textbook formulas, and their seed variants."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.course.original import original_attention_batchmean, original_feature_mse, original_feature_mse_per_dim
from kdlab.loss.features import attention_kl, cosine_distance, info_nce, ln_mse, masked_mean_pool, uniform_layer_map

B, T, D, H = 3, 9, 16, 4


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.fixture
def mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 6:] = False  # a padded sequence
    return m


def _attn(h, seed, mask):
    """Causal attention probabilities with padded keys zeroed, like HF eager attention."""
    scores = _randn(B, h, T, T, seed=seed, scale=2.0)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & mask[:, None, None, :]  # (B, 1, T, T)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)


def ref_ln_mse(p, t, mask):
    """2 (1 - Pearson correlation across channels), per valid token: an independent formula."""
    pc, tc = p - p.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    rho = (pc * tc).sum(-1) / (pc.norm(dim=-1) * tc.norm(dim=-1))
    return (2 * (1 - rho))[mask].mean()


def test_ln_mse_is_two_times_one_minus_correlation(mask):
    p, t = _randn(B, T, D, seed=1, scale=30), _randn(B, T, D, seed=2, scale=100)
    torch.testing.assert_close(ln_mse(p, t, mask).double(), ref_ln_mse(p, t, mask), rtol=1e-4, atol=1e-4)


def test_ln_mse_is_scale_free_while_the_seed_mse_is_not(mask):
    p, t = _randn(B, T, D, seed=1), _randn(B, T, D, seed=2)
    assert torch.isclose(ln_mse(p, t, mask), ln_mse(50 * p + 3, 50 * t - 7, mask), rtol=1e-4)
    assert torch.isclose(original_feature_mse(50 * p, 50 * t), 2500 * original_feature_mse(p, t), rtol=1e-5)
    # dividing by D is a change of weight, not a normalisation: still scale-dependent
    assert torch.isclose(original_feature_mse_per_dim(p, t), original_feature_mse(p, t) / D)


def test_cosine_distance_matches_the_formula(mask):
    p, t = _randn(B, T, D, seed=3), _randn(B, T, D, seed=4)
    ref = (1 - (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1)))[mask].mean()
    torch.testing.assert_close(cosine_distance(p, t, mask).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", [ln_mse, cosine_distance])
def test_feature_losses_zero_at_equality_masked_and_invariant(loss, mask):
    p, t = _randn(B, T, D, seed=5), _randn(B, T, D, seed=6)
    assert loss(t, t, mask) < 1e-5
    base = loss(p, t, mask)
    torch.testing.assert_close(loss(torch.cat([p, p]), torch.cat([t, t]), torch.cat([mask, mask])), base)
    torch.testing.assert_close(loss(torch.cat([p, p], 1), torch.cat([t, t], 1), torch.cat([mask, mask], 1)), base)
    pg = p.float().requires_grad_(True)
    loss(pg, t.half(), mask).backward()  # an fp16 teacher
    assert torch.isfinite(pg.grad).all() and torch.count_nonzero(pg.grad[~mask]) == 0


def ref_attention_kl(s, t, mask):
    rows = []
    for b in range(s.shape[0]):
        for i in range(s.shape[2]):
            if not mask[b, i]:
                continue
            for h in range(s.shape[1]):
                keep = t[b, h, i] > 0
                rows.append((t[b, h, i][keep] * (t[b, h, i][keep].log() - s[b, h, i][keep].log())).sum())
    return torch.stack(rows).mean()


def test_attention_kl_matches_per_row_reference_with_causal_and_padding_zeros(mask):
    s, t = _attn(H, 7, mask), _attn(H, 8, mask)
    value = attention_kl(s, t, mask)
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), ref_attention_kl(s, t, mask), rtol=1e-5, atol=1e-7)
    assert attention_kl(t, t, mask) == 0
    sg = s.float().requires_grad_(True)
    attention_kl(sg, t.half(), mask).backward()
    assert torch.isfinite(sg.grad).all()
    assert torch.count_nonzero(sg.grad[1, :, 6:]) == 0  # padded query rows


def test_attention_kl_averages_heads_when_counts_differ(mask):
    s, t = _attn(2, 9, mask), _attn(H, 10, mask)
    ref = ref_attention_kl(s.mean(1, keepdim=True), t.mean(1, keepdim=True), mask)
    torch.testing.assert_close(attention_kl(s, t, mask).double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("heads", [2, 4, 8])
def test_seed_attention_loss_is_heads_times_the_per_row_kl(heads):
    full = torch.ones(B, T, dtype=torch.bool)
    # no zeros in the maps (no causal mask): the original formula is finite and its scale can be read off
    s, t = _randn(B, heads, T, T, seed=11).softmax(-1), _randn(B, heads, T, T, seed=12).softmax(-1)
    ratio = original_attention_batchmean(s, t) / attention_kl(s, t, full)
    assert ratio.item() == pytest.approx(heads, rel=1e-5)


def test_seed_attention_loss_is_nan_on_causal_maps(mask):
    s, t = _attn(H, 7, mask), _attn(H, 8, mask)
    assert torch.isnan(original_attention_batchmean(s, t))


def test_info_nce_matches_the_formula_and_its_limits():
    s, t = _randn(5, D, seed=13), _randn(5, D, seed=14)
    sn, tn = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    ref = -(sn @ tn.T / 0.1).log_softmax(-1).diagonal().mean()
    torch.testing.assert_close(info_nce(s, t, 0.1).double(), ref, rtol=1e-5, atol=1e-6)
    assert info_nce(s[:1], t[:1]) == 0  # no negatives
    # perfectly matched, well separated pairs drive it towards 0; random pairs sit near log B
    eye = torch.eye(5, D, dtype=torch.float64)
    assert info_nce(eye, eye, 0.05) < 1e-6
    assert abs(info_nce(s, t, 10.0).item() - math.log(5)) < 0.05


def test_masked_mean_pool_ignores_padding(mask):
    h = _randn(B, T, D, seed=15)
    pooled = masked_mean_pool(h, mask)
    torch.testing.assert_close(pooled[1].double(), h[1, :6].mean(0))


def test_uniform_layer_map():
    assert uniform_layer_map(4, 30) == [7, 14, 22, 29]
    assert uniform_layer_map(2, 2) == [0, 1]
    assert uniform_layer_map(1, 30) == [29]


def test_attention_kl_invariant_to_batch_size_and_padding_length(mask):
    s, t = _attn(H, 7, mask), _attn(H, 8, mask)
    base = attention_kl(s, t, mask)
    torch.testing.assert_close(attention_kl(torch.cat([s, s]), torch.cat([t, t]), torch.cat([mask, mask])), base)
    # the same sequences padded to twice the length: padded keys hold 0, padded query rows are masked
    pad = T

    def grow(a):
        out = torch.zeros(B, a.shape[1], T + pad, T + pad, dtype=a.dtype)
        out[:, :, :T, :T] = a
        out[:, :, T:, 0] = 1.0  # padded query rows still hold some distribution
        return out

    longer_mask = torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], 1)
    torch.testing.assert_close(attention_kl(grow(s), grow(t), longer_mask), base)
