"""On-policy distillation (kdlab.training.on_policy): the sampled-token estimator against exact float64 formulas
(Monte Carlo), divergences on generated positions against float64 references, the generated batches,
mixed-policy runs end to end, sequence-level KD, exact resume after SIGKILL and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kdlab
from kdlab.data.batches import PackedBatches
from kdlab.generation import RowSeededSampler, generate_ids, top_p_filter
from kdlab.loss.divergences import IGNORE_INDEX, next_token_labels, sampled_reverse_kl
from kdlab.loss.objective import StepCounts
from kdlab.training.on_policy import GeneratedBatches, OnPolicyObjective


# ------------------------------------------------------------------ the sampled-token estimator
def test_sampled_reverse_kl_is_an_unbiased_estimate_of_the_reverse_kl_and_its_gradient():
    """Monte Carlo on a small categorical model q = softmax(theta) against a fixed teacher p: the
    estimator's value and gradient over n samples of q agree with the exact float64 KL(q || p) and its
    gradient within 4 standard errors, and those errors are small next to the quantities."""
    V, n = 6, 200_000
    g = torch.Generator().manual_seed(0)
    theta64 = torch.randn(V, generator=g, dtype=torch.float64)
    phi64 = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    # exact, float64: KL(q || p) = sum_x q(x) (log q(x) - log p(x)) and its gradient by autograd
    t = theta64.clone().requires_grad_(True)
    log_q64, log_p64 = t.log_softmax(-1), phi64.log_softmax(-1)
    exact = (log_q64.exp() * (log_q64 - log_p64)).sum()
    (exact_grad,) = torch.autograd.grad(exact, t)

    q64 = theta64.softmax(-1)
    tokens = torch.multinomial(q64, n, replacement=True, generator=g)
    theta = theta64.float().requires_grad_(True)
    s_logits = theta.expand(1, n, V)  # every position shares theta: its gradient is the estimator's mean
    t_logits = phi64.float().expand(1, n, V)
    value = sampled_reverse_kl(s_logits, t_logits, tokens[None], torch.ones(1, n, dtype=torch.bool))
    value.backward()

    # per-sample terms (float64): r_i and r_i * grad log q(x_i) = r_i (onehot(x_i) - q)
    r = (log_q64.detach() - log_p64)[tokens]
    per_sample_grad = r[:, None] * (torch.nn.functional.one_hot(tokens, V).double() - q64)
    se_value = r.std() / n**0.5
    se_grad = per_sample_grad.std(0) / n**0.5
    assert abs(value.item() - exact.item()) < 4 * se_value
    assert torch.all((theta.grad.double() - exact_grad).abs() < 4 * se_grad), (theta.grad, exact_grad, se_grad)
    assert exact.item() > 20 * se_value and exact_grad.norm() > 20 * se_grad.norm()  # the test can fail


def test_sampled_reverse_kl_discounted_advantage_matches_a_float64_loop():
    """With discount gamma, A_t = sum_{k >= t} gamma^(k-t) r_k over a row's scored positions: value
    and gradient against a float64 loop; the prompt positions (mask False) add nothing."""
    g = torch.Generator().manual_seed(1)
    B, T, V, gamma = 2, 7, 9, 0.8
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :3] = False  # the prompt
    mask[1, -1] = False  # a row that ends one position early
    s32 = s.float().requires_grad_(True)
    value = sampled_reverse_kl(s32, t.float(), tokens, mask, discount=gamma)
    value.backward()

    s64 = s.clone().requires_grad_(True)
    log_q = s64.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    log_p = t.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    r = (log_q - log_p).detach() * mask
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            adv[b, i] = sum(gamma ** (k - i) * r[b, k] for k in range(i, T)) if mask[b, i] else 0.0
    n = mask.sum()
    expected_value = r.sum() / n
    (adv * log_q * mask).sum().div(n).backward()
    assert value.item() == pytest.approx(expected_value.item(), rel=1e-5)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    assert s32.grad[:, :3].abs().max() == 0  # no gradient at the prompt


# ------------------------------------------------------------------ sampling
def test_row_seeded_sampling_is_exact_and_independent_of_the_batch():
    """Gumbel-max with one stream per row: the sample frequencies of a row match softmax(logits / T)
    (chi-square), and a row's draw does not depend on the other rows of its batch."""
    V, n, temp = 5, 40_000, 0.7
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    sampler = RowSeededSampler(list(range(n)), temperature=temp)
    draws = sampler(None, logits.expand(n, V)).argmax(-1)
    expected = (logits / temp).softmax(-1) * n
    chi2 = ((torch.bincount(draws, minlength=V) - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # p = 0.0004 at 4 degrees of freedom
    alone = RowSeededSampler([7], temperature=temp)(None, logits[None]).argmax(-1)
    assert alone.item() == draws[7].item()


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(top_p_filter(logits, 0.81)).sum() == 3
    assert torch.isfinite(top_p_filter(logits, 0.1)).sum() == 1


# ------------------------------------------------------------------ generated batches
@pytest.fixture
def on_policy_overrides(tiny_overrides):
    return {**tiny_overrides, "on_policy": 1.0, "prompt_tokens": 12, "gen_tokens": 0, "early_stopping": False}


def test_a_generated_batch_is_the_block_prefix_continued_by_the_student(on_policy_overrides):
    cfg = kdlab.load_config(overrides=on_policy_overrides)
    trainer = kdlab.build_trainer(cfg)
    assert isinstance(trainer.batches, GeneratedBatches) and isinstance(trainer.objective, OnPolicyObjective)
    corpus = PackedBatches(trainer.data["train"], cfg.batch_size, seed=cfg.seed).next_step()[0]
    (batch,) = trainer.batches.next_step()
    P, G = 12, 32 - 12
    assert batch["input_ids"].shape == (cfg.batch_size, P + G) and batch["policy"] == "student"
    assert torch.equal(batch["input_ids"][:, :P], corpus["input_ids"][:, :P])
    assert (batch["labels"][:, :P] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][:, P:], batch["input_ids"][:, P:])
    # the continuation is the student's: the same rows sampled one at a time give the same tokens
    for row in range(cfg.batch_size):
        seed = kdlab.training.on_policy._row_seed(cfg.seed, 0, batch["input_ids"][row, :P].tolist())
        alone = generate_ids(trainer.student, batch["input_ids"][row : row + 1, :P], G, seeds=[seed])
        assert torch.equal(alone[0], batch["input_ids"][row, P:])
    # only the generated tokens are scored: the step counts G next-token targets per row
    counts = StepCounts.of([batch])
    assert counts.num_valid.item() == cfg.batch_size * G


def _kl64(p_logits, q_logits):  # KL(softmax p || softmax q) per position, float64
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _scored_generated_batch(cfg):
    """A generated batch of `cfg`'s trainer, the objective's loss on it, both models' logits and the scored mask."""
    trainer = kdlab.build_trainer(cfg)
    (batch,) = trainer.batches.next_step()
    with torch.no_grad():
        loss = trainer.objective.loss(trainer.student, trainer.teacher, batch, trainer.precision)
        s = trainer.student(input_ids=batch["input_ids"]).logits
        t = trainer.teacher(input_ids=batch["input_ids"]).logits
    return loss, s, t, next_token_labels(batch["labels"]) != IGNORE_INDEX


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_divergences_on_generated_positions_match_float64(on_policy_overrides, divergence):
    """The KD term of a generated batch is the chosen divergence averaged over the generated
    positions only (the prompt's are not scored), against a float64 formula."""
    cfg = kdlab.load_config(overrides={**on_policy_overrides, "kd_divergence": divergence, "jsd_beta": 0.3})
    loss, s, t, mask = _scored_generated_batch(cfg)
    assert mask[:, :11].sum() == 0 and mask[:, 11:-1].all()  # position P-1 predicts the first generated token
    if divergence == "forward_kl":
        per = _kl64(t, s)
    elif divergence == "reverse_kl":
        per = _kl64(s, t)
    else:  # GKD's generalised JSD(beta): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        b = 0.3
        p, q = t.double().softmax(-1), s.double().softmax(-1)
        m = b * p + (1 - b) * q
        per = b * (p * (p.log() - m.log())).sum(-1) + (1 - b) * (q * (q.log() - m.log())).sum(-1)
    assert loss.terms["gen/kd"].item() == pytest.approx(per[mask].mean().item(), rel=1e-5, abs=1e-6)
    assert "kd" not in loss.terms and "w/lm" not in loss.weighted and "lm" not in loss.weighted  # no LM weight
    assert loss.total.item() == pytest.approx(cfg.alpha_kd * loss.terms["gen/kd"].item(), rel=1e-6)


def test_top_k_divergence_on_generated_positions_is_the_top_k_loss_of_those_positions(on_policy_overrides):
    cfg = kdlab.load_config(overrides={**on_policy_overrides, "kd_top_k": 8})
    loss, s, t, mask = _scored_generated_batch(cfg)
    # the same loss over the generated positions alone, gathered into one row
    only = kdlab.kd_loss(s[mask][None], t[mask][None], torch.ones(1, int(mask.sum()), dtype=torch.bool), top_k=8)
    assert loss.terms["gen/kd"].item() == pytest.approx(only.item(), rel=1e-5)


def test_the_on_policy_share_follows_lambda_and_lambda_zero_is_todays_training(on_policy_overrides):
    src = GeneratedBatches.__new__(GeneratedBatches)
    src.seed, src.on_policy = 0, 0.3
    share = sum(src.generates(s) for s in range(4000)) / 4000
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5
    cfg = kdlab.load_config(overrides={**on_policy_overrides, "on_policy": 0.0})
    trainer = kdlab.build_trainer(cfg)
    assert type(trainer.batches) is PackedBatches and type(trainer.objective) is kdlab.Objective


def test_a_mixed_run_logs_both_kinds_of_step_the_shares_and_samples(on_policy_overrides):
    from kdlab.course.widgets import LivePlot

    over = {**on_policy_overrides, "on_policy": 0.5, "max_steps": 8, "log_every": 1, "log_first": 0}
    lp = LivePlot(widgets=True, min_interval_s=0.0, max_overhead=1.0)
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over), callbacks=[lp])
    plan = [trainer.batches.generates(s) for s in range(8)]
    assert 0 < sum(plan) < 8  # this seed mixes both kinds
    state = trainer.fit()
    train = [r for r in state.history if r["kind"] == "train"]
    assert [r["on_policy_share"] for r in train] == [float(p) for p in plan]
    for r, generated in zip(train, plan):
        assert ("gen/kd" in r) == generated and ("kd" in r) == (not generated)
        assert ("samples" in r) == generated and 0 <= r["generate_share"] < 1
        assert (r["generate_s"] > 0) == generated
        if generated:
            assert r["samples"][0]["continuation"] and "gen/lm" in r and "gen/lm" not in r["weighted"]
    on_disk = [json.loads(x) for x in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("samples") for r in on_disk if r["kind"] == "train"] == [r.get("samples") for r in train]
    # the live plot: the corpus and the generated curves, and a panel of the two shares
    points = lp.points()
    assert points["kd"] == 8 - sum(plan) and points["gen/kd"] == sum(plan) and points["total"] == 8
    titles = [ax.get_title() for ax in lp.draw().axes]
    assert "on-policy: share per log interval" in titles


def test_sampled_reverse_kl_runs_as_the_on_policy_objective(on_policy_overrides):
    """On a batch the student generated, the KD term is the mean sampled log-ratio, which estimates
    the exact reverse KL on those positions (within 4 standard errors); a run trains on it."""
    over = {**on_policy_overrides, "on_policy_loss": "sampled_reverse_kl", "max_steps": 3, "log_every": 1}
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    (batch,) = trainer.batches.next_step()
    with torch.no_grad():
        loss = trainer.objective.loss(trainer.student, trainer.teacher, batch, trainer.precision)
        s = trainer.student(input_ids=batch["input_ids"]).logits.double().log_softmax(-1)
        t = trainer.teacher(input_ids=batch["input_ids"]).logits.double().log_softmax(-1)
    targets = next_token_labels(batch["labels"])
    mask = targets != IGNORE_INDEX
    idx = targets.clamp_min(0)[..., None]
    r = (s.gather(-1, idx) - t.gather(-1, idx))[..., 0][mask]
    exact = (s.exp() * (s - t)).sum(-1)[mask]
    assert loss.terms["gen/kd"].item() == pytest.approx(r.mean().item(), rel=1e-5, abs=1e-6)
    assert abs(r.mean() - exact.mean()) < 4 * r.std() / len(r) ** 0.5
    state = trainer.fit()
    train = [r for r in state.history if r["kind"] == "train"]
    assert len(train) == 3 and all(torch.isfinite(torch.tensor(r["gen/kd"])) and r["grad_norm"] > 0 for r in train)


def test_sequence_level_kd_trains_the_lm_term_on_the_teachers_text(on_policy_overrides):
    cfg = kdlab.load_config(overrides={**on_policy_overrides, "generator": "teacher"})
    trainer = kdlab.build_trainer(cfg)
    (batch,) = trainer.batches.next_step()
    assert batch["policy"] == "teacher"
    seed = kdlab.training.on_policy._row_seed(cfg.seed, 0, batch["input_ids"][0, :12].tolist())
    alone = generate_ids(trainer.teacher, batch["input_ids"][:1, :12], 20, seeds=[seed])
    assert torch.equal(alone[0], batch["input_ids"][0, 12:])
    loss = trainer.objective.loss(trainer.student, trainer.teacher, batch, trainer.precision)
    assert loss.weighted["gen/lm"].item() == pytest.approx((1 - cfg.alpha_kd) * loss.terms["gen/lm"].item())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "over, message",
    [
        ({"on_policy": 1.5}, "on_policy=1.5 must be in [0, 1]"),
        ({"on_policy": 0.5, "prompt_tokens": 32}, "prompt_tokens=32 must be in [1, seq_len=32)"),
        ({"on_policy": 0.5, "teacher_cache": "data/cache/x", "kd_top_k": 8}, "which no teacher cache holds"),
        ({"on_policy": 1.0, "on_policy_loss": "sampled_reverse_kl", "gen_top_p": 0.9}, "needs gen_temperature=1"),
        ({"on_policy": 1.0, "generator": "nobody"}, "generator='nobody' is not allowed; choose one of student"),
    ],
)
def test_bad_on_policy_settings_are_refused_in_one_line(tiny_overrides, over, message):
    with pytest.raises(kdlab.KDLabError, match=None) as err:
        kdlab.load_config(overrides={**tiny_overrides, **over})
    assert message in str(err.value)


def test_a_continuation_longer_than_the_positions_is_refused(on_policy_overrides):
    cfg = kdlab.load_config(overrides={**on_policy_overrides, "gen_tokens": 5000})
    with pytest.raises(kdlab.KDLabError) as err:
        kdlab.build_trainer(cfg)
    assert "prompt_tokens + gen_tokens=5012 is longer than the models' maximum positions (2,048)" in str(err.value)


# ------------------------------------------------------------------ resume and torchrun
@pytest.mark.process
def test_on_policy_run_resumes_exactly_after_sigkill(on_policy_overrides, tmp_path):
    from test_robust import _killed_child  # the same SIGKILL harness as the off-policy runs

    over = {**on_policy_overrides, "on_policy": 0.5, "max_steps": 8, "save_every": 3, "log_every": 2}
    straight = kdlab.train(kdlab.load_config(overrides={**over, "out_dir": str(tmp_path / "a")}))
    killed = {**over, "out_dir": str(tmp_path / "b")}
    _killed_child(killed, at=5, mode="mid-run", tmp_path=tmp_path)
    resumed = kdlab.train(kdlab.load_config(overrides={**killed, "resume": True}))
    ta = [r for r in straight.history if r["kind"] == "train"]
    tb = [r for r in resumed.history if r["kind"] == "train"]
    assert [r["step"] for r in ta] == [r["step"] for r in tb] and any(r["on_policy_share"] for r in ta)
    for ra, rb in zip(ta, tb):
        assert rb["on_policy_share"] == ra["on_policy_share"] and rb.get("samples") == ra.get("samples")
        for key in ("loss", "kd", "gen/kd", "lm", "gen/lm", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6), (ra["step"], key)
    final = [r for r in resumed.history if r["kind"] == "eval"][-1]
    assert final["kl"] == pytest.approx([r for r in straight.history if r["kind"] == "eval"][-1]["kl"], rel=1e-6)


@pytest.mark.process
def test_on_policy_torchrun_two_processes_match_one_process(on_policy_overrides, tmp_path, cli_flags):
    over = {**on_policy_overrides, "on_policy": 0.5, "max_steps": 4, "log_every": 1, "eval_every": 2}
    over |= {"grad_accum": 2, "save_every": 0}
    one = kdlab.train(kdlab.load_config(overrides={**over, "batch_size": 4, "out_dir": str(tmp_path / "one")}))
    flags = cli_flags({**over, "batch_size": 2, "out_dir": str(tmp_path / "two")})
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdlab"]
    proc = subprocess.run([*cmd, "train", *flags], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    a = [r for r in one.history if r["kind"] == "train"]
    b = [r for r in two if r["kind"] == "train"]
    assert [r["on_policy_share"] for r in a] == [r["on_policy_share"] for r in b]
    assert 0 < sum(r["on_policy_share"] for r in a) < 4
    for ra, rb in zip(a, b):
        for key in ("loss", "kd", "gen/kd", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    ea = [r for r in one.history if r["kind"] == "eval"]
    eb = [r for r in two if r["kind"] == "eval"]
    for ra, rb in zip(ea, eb, strict=True):
        assert rb["kl"] == pytest.approx(ra["kl"], rel=1e-5)
