"""The cached teacher: built once, equal to the live teacher's top-k KD, refused when it does not fit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import kdlab
from kdlab.cli import main
from kdlab.teacher_cache import FILES


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
def built(tiny_teacher, small_corpus, tmp_path_factory):
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
    assert main(["-q", "cache-teacher", *_cli_args(overrides)]) == 0
    return overrides, root / "teacher-cache"


def _cli_args(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_cli_builds_the_cache_once_and_verifies_it(built, capsys):
    overrides, folder = built
    assert all((folder / f).is_file() for f in (*FILES, "meta.json"))
    assert not folder.with_name(folder.name + ".tmp").exists()
    meta = json.loads((folder / "meta.json").read_text())
    key = meta["key"]
    assert key["top_k"] == 16 and key["seq_len"] == 32 and key["temperature"] == 1.0
    top = np.load(folder / "top_logp.npy", mmap_mode="r")
    ids = np.load(folder / "top_ids.npy", mmap_mode="r")
    assert top.shape == ids.shape == (key["blocks"], 32, 16) and top.dtype == np.float16 and ids.dtype == np.uint16
    mtime = (folder / "meta.json").stat().st_mtime_ns
    assert main(["-q", "cache-teacher", *_cli_args(overrides)]) == 0  # the same settings: verified, not rebuilt
    assert f"{key['blocks']} blocks, top-16" in capsys.readouterr().out
    assert (folder / "meta.json").stat().st_mtime_ns == mtime


def test_cached_run_equals_the_live_top_k_run_and_skips_the_teacher(built, monkeypatch, tmp_path):
    cache_overrides = {**built[0], "out_dir": str(tmp_path / "cached")}
    live = kdlab.train(
        kdlab.load_config(overrides={**cache_overrides, "teacher_cache": "", "out_dir": str(tmp_path / "live")})
    )
    trainer = kdlab.Trainer.from_config(kdlab.load_config(overrides=cache_overrides))
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
        kdlab.Trainer.from_config(kdlab.load_config(overrides={**cache_overrides, **change}))


def test_a_cache_of_another_teacher_is_refused(built, tmp_path):
    cache_overrides = built[0]
    other = tmp_path / "other-teacher"
    model = kdlab.load_teacher(cache_overrides["teacher"], "data", kdlab.resolve_precision("cpu"))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.01)  # one weight tensor differs
    model.save_pretrained(other)
    kdlab.load_tokenizer(cache_overrides["teacher"], "data").save_pretrained(other)
    with pytest.raises(kdlab.KDLabError, match=r"teacher hash: cache [0-9a-f]{12}\.\.\., run [0-9a-f]{12}\.\.\."):
        kdlab.Trainer.from_config(kdlab.load_config(overrides={**cache_overrides, "teacher": str(other)}))


def test_a_corrupt_or_missing_cache_is_refused_by_the_cli(built, capsys, tmp_path):
    copy = tmp_path / "teacher-cache"
    args = ["train", *_cli_args({**built[0], "teacher_cache": str(copy), "out_dir": str(tmp_path / "run")})]
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
