"""Layer choice for students cut from the teacher (kdlab.pruning): importance, drop-one, recorded, exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdlab
from kdlab.pruning import (
    block_influence,
    choose_layers,
    drop_one_loss,
    even_layers,
    layer_scores,
    parse_layer_list,
    skipped,
)


def _toy(n_layers: int = 6, seed: int = 0):
    """A random 64-wide Llama, with layer 2 made the identity (its output projections zeroed: both
    residual branches then add nothing, so h_out == h_in exactly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return model


def _batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 24), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def test_importance_drops_the_identity_layer_first():
    model = _toy()
    bi = block_influence(model, _batches())
    assert bi[2] == pytest.approx(0.0, abs=1e-12)  # cos(h, h) = 1
    assert min(range(6), key=lambda i: bi[i]) == 2
    assert 2 not in choose_layers(bi, 5)
    drop = drop_one_loss(model, _batches())
    assert drop[2] == pytest.approx(0.0, abs=1e-9)  # skipping the identity changes nothing
    assert 2 not in choose_layers([abs(x) for x in drop], 5)


@torch.no_grad()
def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output():
    model, batch = _toy(), _batches()[0]
    out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    # HF's hidden_states[l] is layer l's input for l < L; the last entry is after the final norm, so
    # the reference for the last layer runs it by hand from its input
    h = out.hidden_states
    expected = [float((1 - F.cosine_similarity(h[i].double(), h[i + 1].double(), dim=-1)).mean()) for i in range(5)]
    assert block_influence(model, [batch])[:5] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_scores_are_deterministic_and_ties_go_to_the_earlier_layer():
    model = _toy()
    assert layer_scores(model, _batches(), "importance") == layer_scores(model, _batches(), "importance")
    assert choose_layers([1.0, 2.0, 2.0, 0.5], 2) == [1, 2]
    assert choose_layers([3.0, 1.0, 1.0, 1.0], 2) == [0, 1]
    assert even_layers(4, 30) == [0, 10, 19, 29]


@torch.no_grad()
def test_skipped_layer_passes_its_input_through_and_is_restored():
    model, batch = _toy(), _batches()[0]
    before = model(input_ids=batch["input_ids"], use_cache=False).logits
    layer = model.model.layers[1]
    with skipped(layer):
        reduced = copy.deepcopy(model)
        reduced.model.layers = torch.nn.ModuleList([m for i, m in enumerate(model.model.layers) if i != 1])
        reduced.config.num_hidden_layers = 5
        assert torch.allclose(
            model(input_ids=batch["input_ids"], use_cache=False).logits,
            reduced(input_ids=batch["input_ids"], use_cache=False).logits,
        )
    assert torch.equal(model(input_ids=batch["input_ids"], use_cache=False).logits, before)


def test_layer_lists_parse_or_fail_in_one_line():
    assert parse_layer_list("importance") is None
    assert parse_layer_list("29, 0,5") == [0, 5, 29]
    with pytest.raises(ValueError, match="student_layers='0,x'.*even, importance, drop-one"):
        parse_layer_list("0,x")
    with pytest.raises(ValueError, match="distinct"):
        parse_layer_list("1,1")


@pytest.mark.parametrize("choice", ["importance", "drop-one", "0,3,5"])
def test_a_pruned_student_before_training_is_exactly_the_teacher_with_those_layers(choice, add_preset):
    teacher = _toy(seed=3)
    p = kdlab.resolve_precision("cpu")
    preset = add_preset("_toy3", 3)
    student = kdlab.build_student(preset, teacher, "teacher-layers", "data", p, layers=choice, calibration=_batches())
    student.eval()
    kept = student.config.kdlab_teacher_layers
    assert len(kept) == 3 and kept == sorted(kept) and 2 not in kept
    if choice == "0,3,5":
        assert kept == [0, 3, 5] and student.config.kdlab_layer_choice == "list"
    else:
        assert len(student.config.kdlab_layer_scores) == 6 and student.config.kdlab_layer_choice == choice
    # the reference: the teacher itself with the other layers removed
    reference = copy.deepcopy(teacher)
    reference.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in kept])
    reference.config.num_hidden_layers = 3
    ids = _batches(seed=7)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(
            student(input_ids=ids, use_cache=False).logits, reference(input_ids=ids, use_cache=False).logits
        )


def test_depth_overrides_the_preset_and_is_checked_against_the_teacher(tiny_teacher, add_preset):
    p = kdlab.resolve_precision("cpu")
    teacher = kdlab.load_teacher(str(tiny_teacher), "data", p)
    preset = add_preset("_w64", 1)
    assert kdlab.build_student(preset, teacher, "teacher-layers", "data", p, depth=2).config.num_hidden_layers == 2
    with pytest.raises(kdlab.KDLabError, match="student_depth=3 is deeper than the teacher \\(2 layers\\)"):
        kdlab.build_student(preset, teacher, "teacher-layers", "data", p, depth=3)
    with pytest.raises(kdlab.KDLabError, match="names layer 7; the teacher has 0 to 1"):
        kdlab.build_student(preset, teacher, "teacher-layers", "data", p, layers="0,7")


def test_a_run_records_and_prints_the_kept_layers(tiny_overrides, caplog):
    # the tiny preset has the tiny teacher's width, so it can be cut from it: 1 of its 2 layers
    overrides = {"student_init": "teacher-layers", "student_layers": "importance", "student_depth": 1}
    cfg = kdlab.load_config(overrides={**tiny_overrides, **overrides, "max_steps": 1, "eval_every": 0})
    with caplog.at_level("INFO", logger="kdlab"):
        kdlab.train(cfg)
    record = json.loads((Path(cfg.out_dir) / "student.json").read_text())
    assert record["layers"] == 1 and record["layer_choice"] == "importance" and len(record["layer_scores"]) == 2
    kept = record["teacher_layers"]
    assert kept == choose_layers(record["layer_scores"], 1)
    assert f"teacher layers {kept[0]} (importance)" in caplog.text
    saved = json.loads((Path(cfg.out_dir) / "final" / "config.json").read_text())
    assert saved["kdlab_teacher_layers"] == kept and saved["num_hidden_layers"] == 1
