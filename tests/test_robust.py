"""Robust runs: SIGKILL and Ctrl-C, a kill during a checkpoint write, exact resumption, and a
2-process torchrun run that matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import kdlab
from kdlab.training.checkpoint import latest_checkpoint, load_checkpoint

# Runs kdlab.train in a child process and kills it with SIGKILL (no handler, no cleanup can run):
#   mid-run:      after `at` steps, between two checkpoints and inside a log interval
#   during-save:  inside the checkpoint write of step `at`, after its files are written to the
#                 temporary folder and before the rename that publishes them
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import kdlab, kdlab.training.checkpoint as ck
    over, at, mode = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    real_fsync = ck._fsync_tree
    def fsync(path):
        if mode == "during-save" and path.name == f".tmp-step-{at:06d}":
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(path)
    ck._fsync_tree = fsync
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    real_step = trainer.train_step
    def step(batches):
        if mode == "mid-run" and trainer.state.step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(batches)
    trainer.train_step = step
    trainer.fit()
""")


def _killed_child(over: dict, at: int, mode: str, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(over), str(at), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _finals(state):
    return {r["split"]: r for r in state.history if r["kind"] == "eval" and r["step"] == state.step}


def _assert_same_run(a, b):
    fa, fb = _finals(a), _finals(b)
    for split in ("validation", "test"):
        for key in ("student_ce", "kl", "top1_agree"):
            assert fb[split][key] == pytest.approx(fa[split][key], rel=1e-6, abs=1e-9), (split, key)
    ta = [r for r in a.history if r["kind"] == "train"]
    tb = [r for r in b.history if r["kind"] == "train"]
    assert [(r["step"], r["steps"]) for r in ta] == [(r["step"], r["steps"]) for r in tb]
    for ra, rb in zip(ta, tb):
        for key in ("loss", "lm", "kd", "feature", "attention", "layerwise", "contrastive"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6), (ra["step"], key)
        assert rb["weights"] == ra["weights"]


@pytest.fixture
def robust_overrides(tiny_overrides):
    # all six terms under the original curriculum with adaptive balancing and early stopping: every piece
    # of state a resume must restore (weights, heads, optimizer, schedule, curriculum, balancer,
    # early stopping, the unfinished log interval, data position, RNG)
    return {
        **tiny_overrides,
        "max_steps": 9,
        "save_every": 3,
        "eval_every": 2,
        "log_every": 4,
        "log_first": 1,
        "w_feature": 0.5,
        "w_attention": 0.5,
        "w_layerwise": 0.5,
        "w_contrastive": 0.1,
        "adaptive_balance": True,
        "es_warmup_steps": 0,
    }


@pytest.mark.process
def test_sigkill_mid_run_resumes_to_the_uninterrupted_result(robust_overrides, tmp_path):
    straight = kdlab.train(kdlab.load_config(overrides={**robust_overrides, "out_dir": str(tmp_path / "a")}))
    over = {**robust_overrides, "out_dir": str(tmp_path / "b")}
    _killed_child(over, at=5, mode="mid-run", tmp_path=tmp_path)  # killed 2 steps after the step-3 checkpoint
    assert latest_checkpoint(tmp_path / "b").name == "step-000003"
    resumed = kdlab.train(kdlab.load_config(overrides={**over, "resume": True}))
    assert resumed.step == 9
    _assert_same_run(straight, resumed)
    # the metrics file holds each record once, as the uninterrupted run's
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [(r["kind"], r["step"]) for r in straight.history]


@pytest.mark.process
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(robust_overrides, tmp_path):
    over = {**robust_overrides, "out_dir": str(tmp_path / "b")}
    _killed_child(over, at=6, mode="during-save", tmp_path=tmp_path)
    root = tmp_path / "b" / "checkpoints"
    assert (root / ".tmp-step-000006").is_dir()  # the half-written one never got published
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step-000003"
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    state = load_checkpoint(ckpt, trainer.student, trainer.objective.heads)
    assert state["step"] == 3
    resumed = kdlab.train(kdlab.load_config(overrides={**over, "resume": True}))
    straight = kdlab.train(kdlab.load_config(overrides={**robust_overrides, "out_dir": str(tmp_path / "a")}))
    _assert_same_run(straight, resumed)
    assert not (root / ".tmp-step-000006").exists()  # cleaned up by the next save


def test_keyboard_interrupt_returns_the_history_so_far(tiny_overrides):
    over = {**tiny_overrides, "max_steps": 20, "log_every": 100, "log_first": 2, "eval_every": 3, "save_every": 0}
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    real, calls = trainer.train_step, {"n": 0}

    def step(batches):  # Ctrl-C while step 8 runs, as a notebook's "interrupt kernel" does
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(batches)

    trainer.train_step = step
    state = trainer.fit()
    assert state.interrupted and state.step == 7
    train = [r for r in state.history if r["kind"] == "train"]
    # steps 3-7 had no log line yet: the interrupt logs them, so nothing trained goes unrecorded
    assert [(r["step"], r["steps"]) for r in train] == [(1, 1), (2, 1), (7, 5)]
    assert state.tokens == 7 * 2 * 31
    assert [r["step"] for r in state.evals()] == [0, 3, 6]
    assert latest_checkpoint(over["out_dir"]).name == "step-000007"


def test_no_host_sync_inside_a_training_step(tiny_overrides, monkeypatch):
    """Every way a tensor reaches Python (.item(), .tolist(), bool(), float(), int()) is counted
    while train_step runs with all terms on: on CUDA each would stall the GPU every step."""
    over = {
        **tiny_overrides,
        "w_feature": 1.0,
        "w_attention": 1.0,
        "w_layerwise": 1.0,
        "w_contrastive": 1.0,
        "adaptive_balance": True,
        "grad_accum": 2,
        "curriculum": "constant",
    }
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
    batches = [trainer.batches.next_step() for _ in range(3)]
    trainer.train_step(batches[0])  # first call: lazy initialisations
    seen = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: seen.append(_n) or _r(self, *a, **k)
        )
    for b in batches[1:]:
        trainer.train_step(b)
    monkeypatch.undo()
    assert seen == []


@pytest.mark.process
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tiny_overrides, tmp_path):
    """gloo on CPU: 2 processes x batch 2 against 1 process x batch 4, same seed and data order."""
    over = {**tiny_overrides, "max_steps": 4, "log_every": 1, "eval_every": 2, "save_every": 2, "grad_accum": 2}
    one = kdlab.train(kdlab.load_config(overrides={**over, "batch_size": 4, "out_dir": str(tmp_path / "one")}))
    flags = []
    for k, v in {**over, "batch_size": 2, "out_dir": str(tmp_path / "two")}.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kdlab",
            "train",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 4 steps") == 1  # only rank 0 reports
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    a = [r for r in one.history if r["kind"] == "train"]
    b = [r for r in two if r["kind"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "kd", "lm", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    ea = [r for r in one.history if r["kind"] == "eval"]
    eb = [r for r in two if r["kind"] == "eval"]
    assert [(r["split"], r["step"], r["tokens"]) for r in ea] == [(r["split"], r["step"], r["tokens"]) for r in eb]
    for ra, rb in zip(ea, eb):
        assert rb["kl"] == pytest.approx(ra["kl"], rel=1e-5)
    assert latest_checkpoint(tmp_path / "two").name == "step-000004"
    assert one.tokens == sum(1 for _ in range(4)) * 2 * 4 * 31  # 4 steps x 2 micro-batches x 4 blocks x 31
