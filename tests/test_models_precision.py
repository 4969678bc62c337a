"""Precision policy and model construction."""

from __future__ import annotations

import pytest
import torch

import kdlab
from kdlab.pruning import even_layers


def test_cpu_policy_defaults():
    p = kdlab.resolve_precision("cpu")
    assert p.device.type == "cpu" and p.teacher_dtype == torch.float32 and p.autocast_dtype is None
    assert not p.needs_grad_scaler


def test_float32_autocast_means_off_not_a_silent_noop():
    # torch's CPU autocast warns and disables itself for float32 (the original framework's eval "fix"); kdlab
    # states the intent instead: no autocast at all
    assert kdlab.resolve_precision("cpu", autocast_dtype="float32").autocast_dtype is None
    assert kdlab.resolve_precision("cpu", autocast_dtype="bfloat16").autocast_dtype == torch.bfloat16
    with pytest.raises(kdlab.KDLabError, match="float16' is not supported on CPU"):
        kdlab.resolve_precision("cpu", autocast_dtype="float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(kdlab.KDLabError, match="no CUDA device is available"):
        kdlab.resolve_precision("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_policy_defaults():
    p = kdlab.resolve_precision("auto")
    assert p.device.type == "cuda" and p.teacher_dtype == torch.float16
    assert p.autocast_dtype in (torch.bfloat16, torch.float16)
    assert p.needs_grad_scaler == (p.autocast_dtype == torch.float16)


def test_layer_map_spreads_evenly_and_keeps_first_and_last():
    assert even_layers(4, 30) == [0, 10, 19, 29]
    assert even_layers(1, 30) == [29]
    assert even_layers(30, 30) == list(range(30))


def test_teacher_layer_init_copies_weights(tiny_teacher, add_preset):
    p = kdlab.resolve_precision("cpu")
    teacher = kdlab.load_teacher(str(tiny_teacher), "data", p)
    # a 1-layer student of the tiny teacher's width takes its last layer
    student = kdlab.build_student(add_preset("_test_1layer", 1), teacher, "teacher-layers", "data", p)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    for (name, s), (_, t) in zip(
        student.model.layers[0].state_dict().items(), teacher.model.layers[1].state_dict().items()
    ):
        assert torch.equal(s, t), name


def test_teacher_layer_init_needs_the_teachers_width(tiny_teacher):
    p = kdlab.resolve_precision("cpu")
    teacher = kdlab.load_teacher(str(tiny_teacher), "data", p)
    with pytest.raises(kdlab.KDLabError, match="needs the teacher's width.*hidden_size=576"):
        kdlab.build_student("small", teacher, "teacher-layers", "data", p)


def test_student_with_another_vocabulary_is_refused(tiny_teacher, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path / "s")
    p = kdlab.resolve_precision("cpu")
    teacher = kdlab.load_teacher(str(tiny_teacher), "data", p)
    with pytest.raises(kdlab.KDLabError, match=r"student vocabulary \(1000\) is smaller than the teacher tokenizer's"):
        kdlab.build_student(str(tmp_path / "s"), teacher, "random", "data", p, tokenizer_size=49152)


def test_unprepared_builtin_teacher_says_run_prepare(tmp_path):
    with pytest.raises(kdlab.KDLabError, match="not prepared yet.*run `kdlab prepare`"):
        kdlab.load_teacher("smollm2-135m", tmp_path, kdlab.resolve_precision("cpu"))
