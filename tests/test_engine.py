"""The engine (kdlab/training/engine.py): FSDP2 on 2 gloo processes against 1 process with the same global
batch, its checkpoints resumed under FSDP2 and in one process, and evaluation; plus the single-process
engine's own arithmetic."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdlab
from kdlab.training.engine import Engine
from kdlab.training.trainer import refuse_unsupported

TOL = 1e-5


def test_single_process_engine_is_the_identity():
    e = Engine()
    assert (e.kind, e.world, e.is_main, e.launched, e.loss_scale) == ("single", 1, True, False, 1.0)
    t = torch.tensor([1.0, 2.0])
    assert e.all_reduce_sum(t) is t and e.broadcast_object({"a": 1}) == {"a": 1}
    assert e.full_state_dict(torch.nn.Linear(2, 2)) is None  # the module holds its weights: saved as it is


def test_grad_norm_is_the_float64_norm_and_clips_as_torch_does():
    """The global norm against a float64 textbook sum of squares (torch's float32 norm of a large
    gradient is 1e-5 off it), and the clipped gradients against torch's own clip_grads_with_norm_."""
    torch.manual_seed(0)
    student, heads = torch.nn.Embedding(49152, 64), torch.nn.Linear(64, 2)
    params = [*student.parameters(), *heads.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    exact = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in params))
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    got = Engine().clip_grad_norm(list(student.parameters()), list(heads.parameters()), 1.0)
    assert got.item() == pytest.approx(exact, rel=1e-7)
    torch.nn.utils.clip_grads_with_norm_(copies, 1.0, got)
    for p, c in zip(params, copies):
        assert torch.equal(p.grad, c.grad)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"on_policy": 0.5}, "on-policy distillation"),
        ({"teacher_cache": "c", "teacher_cache_kind": "hidden"}, "a hidden-state teacher cache"),
        ({"grad_share_every": 10}, "gradient shares"),
        ({"scaler": True}, "float16 autocast with trainable heads"),
    ],
)
def test_fsdp2_refuses_what_it_does_not_run_in_one_line(setting, message):
    from types import SimpleNamespace

    cfg = SimpleNamespace(on_policy=0, teacher_cache="", teacher_cache_kind="top-k", grad_share_every=0)
    cfg.__dict__.update({k: v for k, v in setting.items() if k != "scaler"})
    objective = SimpleNamespace(heads=torch.nn.ModuleDict({"feature": torch.nn.Linear(2, 2)}))
    precision = SimpleNamespace(needs_grad_scaler=setting.get("scaler", False))
    refuse_unsupported(cfg, Engine("ddp", 0, 2), objective, precision)  # DDP runs them all
    with pytest.raises(kdlab.KDLabError, match=rf"^distributed='fsdp2' does not run {message}.*use distributed='ddp'$"):
        refuse_unsupported(cfg, Engine("fsdp2", 0, 2), objective, precision)


# ------------------------------------------------------------------ FSDP2 on 2 gloo processes


def _torchrun(cli_flags, over: dict, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdlab"]
    proc = subprocess.run(
        [*cmd, "train", *cli_flags(over), *extra], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(folder: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "final" / "model.safetensors")


def _max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _from_step(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose latest checkpoint is `step`: what a run killed after that save leaves."""
    shutil.copytree(src, dst)
    (dst / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")
    for later in ("final", "best"):
        shutil.rmtree(dst / later, ignore_errors=True)
    return dst


@pytest.mark.process
@pytest.mark.parametrize(
    "kind, terms",
    [("fsdp2", "kd+lm"), ("fsdp2", "kd+lm+feature"), ("ddp", "kd+lm+feature")],
)
def test_two_processes_match_one_process_and_resume(kind, terms, tiny_overrides, tmp_path, cli_flags):
    """Losses, gradient norms, evaluations and final weights of 2 processes x batch 2 (FSDP2, and DDP
    with heads outside it) equal one process's (batch 4) to 1e-5; a checkpoint FSDP2 wrote resumes
    exactly under FSDP2 and in one process. (DDP without heads: tests/test_robust.py.)"""
    over = {
        **tiny_overrides,
        "max_steps": 4,
        "log_every": 1,
        "eval_every": 2,
        "save_every": 2,
        "keep_checkpoints": 3,
        "grad_accum": 2,
        "early_stopping": False,
    }
    if terms == "kd+lm+feature":
        # an intermediate term: routers outside FSDP, their gradients averaged by hand. Without the
        # routers' load-balancing term: like Switch Transformer's it is a statistic of each micro-batch
        # (a product of two batch means), so it changes when the global batch is split otherwise
        over |= {"w_feature": 0.5, "curriculum": "constant", "router_balance": 0.0}
    if (kind, terms) == ("fsdp2", "kd+lm+feature"):
        # records at steps 3 and 4: the step-2 checkpoint falls inside a log interval, whose sums a
        # resumed run carries on with (whatever its number of processes)
        over |= {"log_first": 0, "log_every": 3}
    steps = [3, 4] if over["log_every"] == 3 else [1, 2, 3, 4]
    one = kdlab.train(kdlab.load_config(overrides={**over, "batch_size": 4, "out_dir": str(tmp_path / "one")}))
    two_dir = tmp_path / "two"
    proc = _torchrun(cli_flags, {**over, "batch_size": 2, "out_dir": str(two_dir), "distributed": kind})
    assert proc.stdout.count("done: 4 steps") == 1  # only rank 0 reports

    a, b = [r for r in one.history if r["kind"] == "train"], _records(two_dir, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == steps
    keys = ["loss", "kd", "lm", "grad_norm"] + (["feature"] if "feature" in terms else [])
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=TOL), (key, ra["step"])
    ea, eb = [r for r in one.history if r["kind"] == "eval"], _records(two_dir, "eval")
    assert [(r["split"], r["step"]) for r in ea] == [(r["split"], r["step"]) for r in eb]
    for ra, rb in zip(ea, eb):
        for key in ("kl", "student_ce"):
            assert rb[key] == pytest.approx(ra[key], rel=TOL), (key, ra["split"], ra["step"])
    assert _max_weight_difference(_weights(tmp_path / "one"), _weights(two_dir)) < TOL

    if (kind, terms) != ("fsdp2", "kd+lm+feature"):
        return
    # resume the FSDP2 run from its step-2 checkpoint: under FSDP2 again, and in one process
    again = _from_step(two_dir, tmp_path / "again", 2)
    _torchrun(cli_flags, {**over, "batch_size": 2, "out_dir": str(again), "distributed": "fsdp2"}, "--resume")
    single = _from_step(two_dir, tmp_path / "single", 2)
    kdlab.train(kdlab.load_config(overrides={**over, "batch_size": 4, "out_dir": str(single), "resume": True}))
    for resumed in (again, single):
        c = _records(resumed, "train")
        assert [r["step"] for r in c] == steps  # the records after step 2 were rewritten, not doubled
        for ra, rc in zip(a, c):  # step 3's record: the interval begun before the checkpoint
            for key in keys:
                assert rc[key] == pytest.approx(ra[key], rel=TOL), (resumed.name, key, ra["step"])
        assert _max_weight_difference(_weights(tmp_path / "one"), _weights(resumed)) < TOL


@pytest.mark.process
def test_fsdp2_refuses_on_policy(tiny_overrides, tmp_path, cli_flags):
    over = {**tiny_overrides, "on_policy": 1.0, "gen_tokens": 4, "prompt_tokens": 8, "distributed": "fsdp2"}
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdlab"]
    proc = subprocess.run([*cmd, "train", *cli_flags(over)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "distributed='fsdp2' does not run on-policy distillation" in proc.stderr
