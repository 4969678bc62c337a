"""The student-aware router, the intermediate terms in training, adaptive balancing, grad shares."""

from __future__ import annotations

import math

import pytest
import torch

import kdlab
from kdlab.loss.balance import AdaptiveBalancer
from kdlab.loss.features import ln_mse
from kdlab.loss.router import StudentAwareRouter

B, T, DS, DT, E = 2, 7, 12, 20, 4


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, DS, generator=g)
    experts = [torch.randn(B, T, DT, generator=g) * (10**e) for e in range(E)]  # very different scales
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    return h_s, experts, mask


def test_router_target_is_the_gate_weighted_mix_of_layer_normed_experts():
    torch.manual_seed(0)
    router = StudentAwareRouter(DS, DT, E, top_k=2)
    h_s, experts, mask = _data()
    out = router(h_s, experts, mask)
    # reference in float64, written out directly
    x = h_s.double()
    probs = (x @ router.gate.weight.double().T + router.gate.bias.double()).softmax(-1)
    top_p, top_i = probs.topk(2, -1)
    w = top_p / top_p.sum(-1, keepdim=True)
    ln = [torch.nn.functional.layer_norm(e.double(), (DT,)) for e in experts]
    target = torch.zeros(B, T, DT, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for j in range(2):
                target[b, t] += w[b, t, j] * ln[top_i[b, t, j]][b, t]
    ref = ln_mse(x @ router.proj.weight.double().T, target, mask)
    torch.testing.assert_close(out.loss.double(), ref.double(), rtol=1e-5, atol=1e-6)
    assert out.utilisation.sum().item() == pytest.approx(1.0)
    assert 0 <= out.entropy <= math.log(E) + 1e-6


def test_router_gradients_reach_the_gate_and_stay_off_masked_tokens():
    torch.manual_seed(0)
    router = StudentAwareRouter(DS, DT, E, top_k=2)
    h_s, experts, mask = _data()
    h_s.requires_grad_(True)
    out = router(h_s, [e.half() for e in experts], mask)  # an fp16 teacher
    (out.loss + 0.01 * out.balance).backward()
    assert torch.isfinite(out.loss) and router.gate.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(h_s.grad[1, 5:]) == 0
    assert all(p.dtype == torch.float32 for p in router.parameters())


def test_router_balance_is_one_when_routing_is_uniform():
    router = StudentAwareRouter(DS, DT, E, top_k=1)
    torch.nn.init.zeros_(router.gate.weight)
    h_s, experts, mask = _data()
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    out = router(h_s, experts, mask)
    # all probabilities 1/E and a tie sends every token to one expert: f = one-hot, P = 1/E -> E * 1/E = 1;
    # the balance term only sees collapse through the gate's probabilities, utilisation shows it directly
    assert out.balance.item() == pytest.approx(1.0)
    assert sorted(out.utilisation.tolist()) == [0.0, 0.0, 0.0, 1.0] and out.entropy.item() == 0.0


def test_adaptive_balancer_makes_terms_order_one_and_round_trips():
    bal = AdaptiveBalancer(momentum=0.5)
    out = bal({"a": torch.tensor(200.0), "b": torch.tensor(0.002)})
    assert out["a"].item() == pytest.approx(1.0) and out["b"].item() == pytest.approx(1.0)
    out = bal({"a": torch.tensor(100.0), "b": torch.tensor(0.002)})
    assert out["a"].item() == pytest.approx(100 / 150)
    again = AdaptiveBalancer()
    again.load_state_dict(bal.state_dict())
    assert again.momentum == 0.5 and again.ema["a"].item() == pytest.approx(150.0)


ALL_TERMS = {"w_feature": 1.0, "w_attention": 1.0, "w_layerwise": 1.0, "w_contrastive": 0.5, "curriculum": "constant"}


def test_all_terms_train_route_and_log(tiny_overrides):
    cfg = kdlab.load_config(
        overrides={
            **tiny_overrides,
            **ALL_TERMS,
            "max_steps": 4,
            "grad_share_every": 2,
            "eval_every": 0,
            "save_every": 0,
            "router_top_k": 1,
        }
    )
    trainer = kdlab.build_trainer(cfg)
    assert trainer.student.config._attn_implementation == "eager"
    state = trainer.fit()
    assert state.skipped_steps == 0
    train = [r for r in state.history if r["kind"] == "train"]
    for r in train:
        for term in ("kd", "lm", "feature", "attention", "layerwise", "contrastive"):
            assert 0.0 <= r[term] < 20 and math.isfinite(r[term]), (term, r[term])
        assert len(r["router"]) == 2 and all(len(x["utilisation"]) == 2 for x in r["router"])  # 2 teacher blocks
        assert r["weights"]["attention"] == 1.0
    shares = next(r["grad_share"] for r in train if "grad_share" in r)
    assert set(shares) == {"kd", "lm", "feature", "attention", "layerwise", "contrastive"}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_only_needed_outputs_are_requested(tiny_overrides, monkeypatch):
    cfg = kdlab.load_config(overrides={**tiny_overrides, "max_steps": 1, "eval_every": 0, "save_every": 0})
    trainer = kdlab.build_trainer(cfg)
    assert trainer.student.config._attn_implementation != "eager"
    seen = []
    real = trainer.teacher.forward
    monkeypatch.setattr(
        trainer.teacher,
        "forward",
        lambda *a, **k: seen.append((k.get("output_hidden_states"), k.get("output_attentions"))) or real(*a, **k),
    )
    trainer.fit()
    assert set(seen) == {(False, False)}


def test_all_terms_with_adaptive_balance_resume_exactly(tiny_overrides, tmp_path):
    over = {**tiny_overrides, **ALL_TERMS, "adaptive_balance": True, "max_steps": 4, "eval_every": 2, "save_every": 2}
    straight = kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "a")}))

    class Stop:
        def on_log(self, trainer, record):
            if trainer.state.step == 2:
                raise KeyboardInterrupt

    kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "b")}), callbacks=[Stop()])
    resumed = kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "b"), "resume": True}))
    a = [r for r in straight.history if r["kind"] == "train"][-1]
    b = [r for r in resumed.history if r["kind"] == "train"][-1]
    for term in ("loss", "kd", "feature", "attention", "layerwise", "contrastive"):
        assert b[term] == pytest.approx(a[term], rel=1e-5), term
