"""The cached teacher: built once, equal to the live teacher's top-k KD, refused when it does not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kdlab
from kdlab.cli import main
from kdlab.data.teacher_cache import FILES


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, austen_ready):
    """~25 documents of real text (the first Austen training chapters): a train split of a few hundred
    32-token blocks, so a cache builds in seconds with the tiny teacher."""
    lines = (austen_ready / "austen" / "train.jsonl").read_text().splitlines()
    text = "\n\n".join(json.loads(line)["text"] for line in lines[:30])[:110_000]
    path = tmp_path_factory.mktemp("corpus") / "austen-part.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def built(tiny_teacher, small_corpus, tmp_path_factory, cli_flags):
    """Overrides of a tiny top-16 KD run and the cache built for them once with `kdlab cache-teacher`
    (tests read it; one that changes it works on a copy)."""
    root = tmp_path_factory.mktemp("cached-run")
    overrides = {
        "teacher": str(tiny_teacher),
        "student": "tiny",
        "student_init": "random",
        "data": str(small_corpus),
        "data_dir": str(root / "data"),
        "seq_len": 32,
        "batch_size": 2,
        "kd_top_k": 16,
        "teacher_cache": str(root / "teacher-cache"),
        "max_steps": 3,
        "warmup_steps": 1,
        "lr": 1e-3,
        "eval_every": 0,
        "eval_batches": 2,
        "log_every": 1,
        "save_every": 0,
        "device": "cpu",
        "out_dir": str(root / "run"),
    }
    assert main(["-q", "cache-teacher", *cli_flags(overrides)]) == 0
    return overrides, root / "teacher-cache"


def test_cli_builds_the_cache_once_and_verifies_it(built, capsys, cli_flags):
    overrides, folder = built
    assert all((folder / f).is_file() for f in (*FILES["top-k"], "meta.json"))
    assert not folder.with_name(folder.name + ".tmp").exists()
    meta = json.loads((folder / "meta.json").read_text())
    key = meta["key"]
    assert key["top_k"] == 16 and key["seq_len"] == 32 and key["temperature"] == 1.0
    top = np.load(folder / "top_logp.npy", mmap_mode="r")
    ids = np.load(folder / "top_ids.npy", mmap_mode="r")
    assert top.shape == ids.shape == (key["blocks"], 32, 16) and top.dtype == np.float16 and ids.dtype == np.uint16
    mtime = (folder / "meta.json").stat().st_mtime_ns
    assert main(["-q", "cache-teacher", *cli_flags(overrides)]) == 0  # the same settings: verified, not rebuilt
    assert f"{key['blocks']} blocks, top-16" in capsys.readouterr().out
    assert (folder / "meta.json").stat().st_mtime_ns == mtime


def test_cached_run_equals_the_live_top_k_run_and_skips_the_teacher(built, monkeypatch, tmp_path):
    cache_overrides = {**built[0], "out_dir": str(tmp_path / "cached")}
    live = kdlab.train(
        kdlab.load_config(overrides={**cache_overrides, "teacher_cache": "", "out_dir": str(tmp_path / "live")})
    )
    trainer = kdlab.build_trainer(kdlab.load_config(overrides=cache_overrides))
    calls = []
    real_forward = trainer.teacher.forward
    monkeypatch.setattr(trainer.teacher, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    cached = trainer.fit()
    # evaluations only: validation before and after (its logits kept between them), test
    assert len(calls) == 2 * cache_overrides["eval_batches"]
    pairs = [(a, b) for a, b in zip(live.history, cached.history) if a["kind"] == "train"]
    assert len(pairs) == 3
    for a, b in pairs:
        # the stored log-probabilities are fp16: equal up to their rounding
        assert b["kd"] == pytest.approx(a["kd"], rel=2e-3)
        assert b["lm"] == pytest.approx(a["lm"], rel=1e-4)
    assert _final(cached)["kl"] == pytest.approx(_final(live)["kl"], rel=1e-2)


def _final(state):
    return [r for r in state.history if r["kind"] == "eval" and r["split"] == "validation"][-1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kd_top_k": 8}, r"top_k: cache 16, run 8"),
        ({"temperature": 2.0}, r"temperature: cache 1.0, run 2.0"),
        ({"seq_len": 16}, r"data hash: cache .*seq_len: cache 32, run 16"),
    ],
)
def test_a_cache_built_for_other_settings_is_refused(built, change, message):
    cache_overrides = built[0]
    with pytest.raises(kdlab.KDLabError, match=rf"was built for another run \(.*{message}.*refusing to train on it"):
        kdlab.build_trainer(kdlab.load_config(overrides={**cache_overrides, **change}))


def test_a_cache_of_another_teacher_is_refused(built, tmp_path):
    cache_overrides = built[0]
    other = tmp_path / "other-teacher"
    model = kdlab.load_teacher(cache_overrides["teacher"], "data", kdlab.resolve_precision("cpu"))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.01)  # one weight tensor differs
    model.save_pretrained(other)
    kdlab.load_tokenizer(cache_overrides["teacher"], "data").save_pretrained(other)
    with pytest.raises(kdlab.KDLabError, match=r"teacher hash: cache [0-9a-f]{12}\.\.\., run [0-9a-f]{12}\.\.\."):
        kdlab.build_trainer(kdlab.load_config(overrides={**cache_overrides, "teacher": str(other)}))


def test_a_corrupt_or_missing_cache_is_refused_by_the_cli(built, capsys, tmp_path, cli_flags):
    copy = tmp_path / "teacher-cache"
    args = ["train", *cli_flags({**built[0], "teacher_cache": str(copy), "out_dir": str(tmp_path / "run")})]
    assert main(args) == 2
    assert "holds no teacher cache (no meta.json)" in capsys.readouterr().err
    shutil.copytree(built[1], copy)
    arr = np.load(copy / "top_logp.npy", mmap_mode="r+")
    arr[0, 0, 0] += 1  # one stored number changed
    arr.flush()
    del arr
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "top_logp.npy is missing or corrupt" in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kd_top_k": 0}, r"teacher_cache='c' needs kd_top_k > 0"),
        ({"w_feature": 0.5}, r"holds the teacher's logits only, but w_feature=0.5 needs its hidden states"),
    ],
)
def test_config_refuses_a_cache_it_cannot_use(change, message):
    with pytest.raises(kdlab.KDLabError, match=message):
        kdlab.load_config(overrides={"teacher_cache": "c", "kd_top_k": 16, **change})


# ------------------------------------------------------------------ the hidden-state cache


@pytest.fixture(scope="module")
def hidden_built(built, tmp_path_factory, cli_flags):
    """The same run's teacher as final hidden states, in float32 and in bfloat16, built by the CLI."""
    root = tmp_path_factory.mktemp("hidden")
    base = {k: v for k, v in built[0].items() if k != "kd_top_k"}  # the full-vocabulary KD
    out = {}
    for dtype in ("float32", "bfloat16"):
        over = {
            **base,
            "teacher_cache": str(root / dtype),
            "teacher_cache_kind": "hidden",
            "teacher_cache_dtype": dtype,
        }
        assert main(["-q", "cache-teacher", *cli_flags(over)]) == 0
        out[dtype] = over
    return out


def test_the_hidden_cache_holds_the_final_hidden_states(hidden_built):
    over = hidden_built["float32"]
    folder = Path(over["teacher_cache"])
    key = json.loads((folder / "meta.json").read_text())["key"]
    assert key["kind"] == "hidden" and key["hidden_size"] == 64 and "top_k" not in key
    states = np.load(folder / "hidden.npy", mmap_mode="r")
    assert states.shape == (key["blocks"], 32, 64) and states.dtype == np.float32
    # against the live teacher's last norm output on the first blocks
    cfg = kdlab.load_config(overrides=over)
    p = kdlab.resolve_precision("cpu")
    teacher = kdlab.load_teacher(cfg.teacher, cfg.data_dir, p)
    tok = kdlab.load_tokenizer(cfg.teacher, cfg.data_dir)
    split = kdlab.prepare_data(cfg.data, cfg.data_dir, tok, cfg.seq_len)["train"]
    with torch.no_grad():
        h = teacher.model(**split.batch([0, 1])).last_hidden_state  # after model.norm
    torch.testing.assert_close(torch.from_numpy(np.array(states[:2])), h, rtol=1e-6, atol=1e-6)
    bf16 = np.load(Path(hidden_built["bfloat16"]["teacher_cache"]) / "hidden.npy")
    assert bf16.dtype == np.uint16 and bf16.nbytes * 2 == states.nbytes  # bfloat16's bits, half the bytes


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_hidden_cache_runs_equal_the_live_teacher_and_never_run_it(hidden_built, divergence, monkeypatch, tmp_path):
    """Exact full-vocabulary KD from the stored states: the float32 cache gives the live teacher's
    losses and gradient norms to 1e-5, and the teacher's forward runs only for evaluations."""
    results = {}
    for name in ("live", "float32", "bfloat16"):
        over = {**hidden_built["float32" if name == "live" else name], "kd_divergence": divergence}
        over |= {"out_dir": str(tmp_path / name)} | ({"teacher_cache": ""} if name == "live" else {})
        trainer = kdlab.build_trainer(kdlab.load_config(overrides=over))
        assert trainer.objective.fused  # KD + LM from the hidden states, both ways
        calls = []
        real_forward = trainer.teacher.forward
        monkeypatch.setattr(
            trainer.teacher, "forward", lambda *a, _f=real_forward, _c=calls, **k: _c.append(1) or _f(*a, **k)
        )
        results[name] = [r for r in trainer.fit().history if r["kind"] == "train"]
        monkeypatch.undo()
        evaluations = 2 * over["eval_batches"]  # validation before and after, then test (logits kept)
        assert len(calls) == (evaluations + 3 if name == "live" else evaluations)
    live = results["live"]
    assert len(live) == 3
    for a, b in zip(live, results["float32"]):
        for key in ("kd", "lm", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for a, b in zip(live, results["bfloat16"]):  # the states rounded to bfloat16: ~0.1% on KD here
        assert b["kd"] == pytest.approx(a["kd"], rel=2e-2)
        assert b["lm"] == pytest.approx(a["lm"], rel=1e-5)  # the student's side is untouched


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher_cache_dtype": "bfloat16"}, r"dtype: cache 'float32', run 'bfloat16'"),
        ({"teacher_cache_kind": "top-k", "kd_top_k": 16}, r"kind: cache 'hidden', run 'top-k'"),
        ({"seq_len": 16}, r"seq_len: cache 32, run 16"),
    ],
)
def test_a_hidden_cache_built_for_other_settings_is_refused(hidden_built, change, message):
    with pytest.raises(kdlab.KDLabError, match=rf"was built for another run \(.*{message}.*refusing to train on it"):
        kdlab.build_trainer(kdlab.load_config(overrides={**hidden_built["float32"], **change}))


def test_a_corrupt_hidden_cache_is_refused_by_the_cli(hidden_built, capsys, tmp_path, cli_flags):
    copy = tmp_path / "hidden"
    shutil.copytree(hidden_built["float32"]["teacher_cache"], copy)
    arr = np.load(copy / "hidden.npy", mmap_mode="r+")
    arr[0, 0, 0] += 1
    arr.flush()
    del arr
    over = {**hidden_built["float32"], "teacher_cache": str(copy), "out_dir": str(tmp_path / "run")}
    assert main(["train", *cli_flags(over)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hidden.npy is missing or corrupt" in err
    assert "--teacher-cache-kind hidden" in err  # the rebuild command names the kind


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fused_loss": False}, r"holds the teacher's hidden states, which KD reads through the fused loss"),
        ({"w_attention": 0.5}, r"holds the teacher's final hidden states only, but w_attention=0.5"),
        ({"teacher_cache_kind": "logits"}, r"teacher_cache_kind='logits' is not allowed; choose one of top-k, hidden"),
    ],
)
def test_config_refuses_a_hidden_cache_it_cannot_use(change, message):
    with pytest.raises(kdlab.KDLabError, match=message):
        kdlab.load_config(overrides={"teacher_cache": "c", "teacher_cache_kind": "hidden", **change})
