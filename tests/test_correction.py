"""Teacher correction (kdlab.correction, `kdlab correct-teacher`) and the corrected built-in teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdlab
from kdlab import correction
from kdlab.correction import ADAPTER_FILE, correct_teacher, merge_adapter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cfg_over(tiny_overrides, tmp_path) -> dict:
    return {
        **tiny_overrides,
        "correct_steps": 4,
        "correct_rank": 2,
        "correct_lr": 1e-2,
        "warmup_steps": 1,
        "eval_batches": 1,
        "save_every": 2,
        "correct_out": str(tmp_path / "correct"),
    }


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / ADAPTER_FILE)


def test_correction_reports_before_and_after_and_ships_an_fp16_adapter(cfg_over):
    report = correct_teacher(kdlab.load_config(overrides=cfg_over), progress=False)
    out = Path(cfg_over["correct_out"])
    weights = _adapter(out)
    assert weights and all(w.dtype == torch.float16 for w in weights.values())
    assert report["after"]["perplexity"]["validation"] < report["before"]["perplexity"]["validation"]
    assert len(report["before"]["samples"]) == 4 and report["sample_settings"]["repetition_penalty"] == 1.1
    meta = json.loads((out / "adapter" / "meta.json").read_text())
    assert meta["steps"] == 4 and meta["tokens"] == 4 * 2 * 32 and meta["adapter_sha256"] == report["adapter_sha256"]
    assert not (out / "checkpoint").exists()  # a finished correction keeps the adapter, not its checkpoint


def test_the_merged_teacher_is_base_plus_scaled_low_rank_product(cfg_over):
    cfg = kdlab.load_config(overrides=cfg_over)
    correct_teacher(cfg, progress=False)
    p = kdlab.resolve_precision("cpu")
    base = kdlab.load_teacher(cfg.teacher, cfg.data_dir, p)
    merged = merge_adapter(kdlab.load_teacher(cfg.teacher, cfg.data_dir, p), Path(cfg.correct_out) / "adapter")
    weights = _adapter(Path(cfg.correct_out))
    scale = cfg.correct_alpha / cfg.correct_rank
    a = next(v for k, v in weights.items() if "layers.0.self_attn.q_proj.lora_A" in k).double()
    b = next(v for k, v in weights.items() if "layers.0.self_attn.q_proj.lora_B" in k).double()
    expected = base.model.layers[0].self_attn.q_proj.weight.double() + scale * (b @ a)  # W + (alpha / r) B A
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight.double(), expected, rtol=0, atol=1e-6)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_an_interrupted_correction_resumes_exactly(cfg_over, monkeypatch, tmp_path):
    straight = {**cfg_over, "correct_out": str(tmp_path / "straight")}
    correct_teacher(kdlab.load_config(overrides=straight), progress=False)

    save = correction._save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(correction, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        correct_teacher(kdlab.load_config(overrides=cfg_over), progress=False)
    monkeypatch.setattr(correction, "_save_checkpoint", save)
    correct_teacher(kdlab.load_config(overrides={**cfg_over, "resume": True}), progress=False)
    a, b = _adapter(tmp_path / "straight"), _adapter(Path(cfg_over["correct_out"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_corrections_are_one_line_errors(cfg_over):
    out = Path(cfg_over["correct_out"])
    with pytest.raises(kdlab.KDLabError, match="has no checkpoint to continue from"):
        correct_teacher(kdlab.load_config(overrides={**cfg_over, "resume": True}), progress=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "something").write_text("x")
    with pytest.raises(kdlab.KDLabError, match="already holds a correction; continue it with --resume"):
        correct_teacher(kdlab.load_config(overrides=cfg_over), progress=False)
    bad = {**cfg_over, "correct_targets": "qq_proj", "overwrite": True}
    with pytest.raises(kdlab.KDLabError, match="correct_targets='qq_proj'"):
        correct_teacher(kdlab.load_config(overrides=bad), progress=False)
    with pytest.raises(kdlab.KDLabError, match="correct_targets=' , ' names no layer"):
        kdlab.load_config(overrides={"correct_targets": " , "})


@pytest.mark.slow
def test_the_builtin_corrected_teacher_is_the_committed_adapter_merged(austen_ready):
    from kdlab.manifest import load_manifest, sha256_file
    from kdlab.models import ADAPTERS, BUILTIN_TEACHERS

    folder = ROOT / "data" / BUILTIN_TEACHERS["smollm2-135m-austen"]
    if not (folder / "kdlab-conversion.json").is_file():
        pytest.skip(f"{folder} is missing: run `make setup` first")
    expected = load_manifest()["teacher"]["adapters"]["smollm2-135m-austen"]["sha256"]
    adapter = ROOT / "data" / ADAPTERS["smollm2-135m-austen"][1]
    assert sha256_file(adapter / ADAPTER_FILE) == expected  # the committed file is the one the manifest pins
    stamp = json.loads((folder / "kdlab-conversion.json").read_text())
    assert stamp["adapter"] == expected and stamp["base"] == "smollm2-135m"
    assert sha256_file(folder / "model.safetensors") == stamp["model.safetensors"]
    assert (adapter / ADAPTER_FILE).stat().st_size <= 8 * 2**20
