"""A cached teacher: what KD reads of the teacher for every training block, computed once, on disk.

    kdlab cache-teacher --teacher-cache data/cache/teacher-top256 --kd-top-k 256
    kdlab train         --teacher-cache data/cache/teacher-top256 --kd-top-k 256

    kdlab cache-teacher --teacher-cache data/cache/teacher-hidden --teacher-cache-kind hidden
    kdlab train         --teacher-cache data/cache/teacher-hidden --teacher-cache-kind hidden

A KD+LM training step then reads the teacher from the cache instead of running the teacher's forward
(evaluation still runs the live teacher: it measures against the real thing). Two kinds:

top-k   exactly what top-k KD reads (`kdlab.loss.divergences.teacher_top_k`): for each position the
        teacher's k largest log-probabilities at temperature T, their vocabulary ids, and the log of
        the probability mass outside them; `kd_loss_topk` on it equals `kd_loss(..., top_k=k)` on the
        live teacher up to the fp16 rounding of the stored log-probabilities. k x 4 + 4 bytes a token.
hidden  the teacher's final hidden states (after its last norm), D numbers a token (SmolLM2: 576, so
        1,152 bytes in bfloat16, 2,304 in float32). The fused loss (kdlab.loss.fused) forms the
        teacher's logits from them and its output weight chunk by chunk, so KD is the full-vocabulary
        one, any divergence, any kd_top_k, at any temperature: exactly the live teacher's with a
        float32 cache (the teacher's own dtype on CPU), to bfloat16 rounding of the states otherwise.

The cache is keyed by sha256 hashes of the training blocks (token ids and padding masks), of the
tokenizer and of the teacher's weights (their dtype included: an fp16 teacher computes other
numbers than an fp32 one), and by k, the temperature and the block length. Opening it recomputes
the key from the run and the checksum of every array file, and refuses a cache that differs,
naming what differs.

The folder (written under a temporary name and renamed when complete, so an interrupted build
leaves no half cache behind):
    meta.json        the key, the shapes and dtypes, the sha256 of each array file
    top_logp.npy     (blocks, seq_len, k) float16   top-k: teacher log-probabilities at temperature T
    top_ids.npy      (blocks, seq_len, k) uint16    top-k: their ids (int32 for vocabularies over 65,536)
    tail_logp.npy    (blocks, seq_len)    float32   top-k: log of the mass outside the top-k
    hidden.npy       (blocks, seq_len, D) float32, or bfloat16's bits as uint16 (numpy has no bfloat16)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdlab.data.corpus import PackedSplit, tokenizer_fingerprint
from kdlab.errors import KDLabError
from kdlab.loss.divergences import teacher_top_k
from kdlab.manifest import sha256_file
from kdlab.precision import teacher_outputs

log = logging.getLogger("kdlab")

FORMAT = 2  # 2: the kind is part of the key
KINDS = ("top-k", "hidden")
HIDDEN_DTYPES = ("bfloat16", "float32")
FILES = {"top-k": ("top_logp.npy", "top_ids.npy", "tail_logp.npy"), "hidden": ("hidden.npy",)}


def _sha256_tensors(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().data)  # the raw bytes, whatever the dtype (bf16 included)
    return h.hexdigest()


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 over the teacher's named weights and buffers (names, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(_sha256_tensors([t]).encode())
    return h.hexdigest()


def cache_key(
    split: PackedSplit,
    tokenizer,
    teacher: torch.nn.Module,
    top_k: int = 0,
    temperature: float = 1.0,
    kind: str = "top-k",
    dtype: str = "bfloat16",
) -> dict:
    """What the cached numbers depend on; two runs with the same key read the same teacher. A hidden
    cache holds no k and no temperature: every KD is computed from it."""
    common = {
        "format": FORMAT,
        "kind": kind,
        "data_sha256": _sha256_tensors([split.input_ids, split.attention_mask]),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "teacher_sha256": teacher_fingerprint(teacher),
        "blocks": len(split),
        "seq_len": int(split.input_ids.shape[1]),
        "vocab_size": int(teacher.get_output_embeddings().weight.shape[0]),
    }
    if kind == "hidden":
        return {**common, "dtype": dtype, "hidden_size": int(teacher.config.hidden_size)}
    return {**common, "top_k": int(top_k), "temperature": float(temperature)}


@dataclass
class TeacherCache:
    """An opened cache: `batch(block_indices)` gives what it holds of the teacher for those training blocks."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]  # file stem -> memory-mapped array (FILES of the cache's kind)

    @property
    def kind(self) -> str:
        return self.meta["key"]["kind"]

    def batch(self, blocks: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """On the CPU: top-k, {"t_top": (B, T, k) fp16, "t_ids": (B, T, k) int64, "t_tail": (B, T) fp32};
        hidden, {"t_hidden": (B, T, D) in the cache's dtype}."""
        idx = np.asarray(blocks, dtype=np.int64)
        a = self.arrays
        if self.kind == "hidden":
            states = torch.from_numpy(a["hidden"][idx])
            return {"t_hidden": states.view(torch.bfloat16) if self.meta["key"]["dtype"] == "bfloat16" else states}
        return {
            "t_top": torch.from_numpy(a["top_logp"][idx]),
            "t_ids": torch.from_numpy(a["top_ids"][idx].astype(np.int64)),
            "t_tail": torch.from_numpy(a["tail_logp"][idx]),
        }

    @property
    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in FILES[self.kind])

    @property
    def bytes_per_token(self) -> float:
        key = self.meta["key"]
        return self.nbytes / (key["blocks"] * key["seq_len"])


def _differences(stored: dict, wanted: dict) -> list[str]:
    out = []
    for k, v in wanted.items():
        old = stored.get(k)
        if old == v:
            continue
        if k.endswith("_sha256"):
            out.append(
                f"{k.removesuffix('_sha256')} hash: cache {old[:12] + '...' if old else 'none'}, run {v[:12]}..."
            )
        else:
            out.append(f"{k}: cache {'none' if old is None else repr(old)}, run {v!r}")
    return out


def open_teacher_cache(path: str | Path, key: dict, verify_files: bool = True) -> TeacherCache:
    """Open the cache at `path` for a run whose key is `key`; a clear KDLabError if it does not fit."""
    path = Path(path)
    kind = f" --teacher-cache-kind {key['kind']}" if key["kind"] != "top-k" else ""
    how = f"with `kdlab cache-teacher --teacher-cache {path}{kind}` and this run's other settings"
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise KDLabError(f"teacher_cache={str(path)!r} holds no teacher cache (no meta.json); build it {how}")
    meta = json.loads(meta_file.read_text())
    diff = _differences(meta.get("key", {}), key)
    if diff:
        raise KDLabError(
            f"teacher_cache={str(path)!r} was built for another run ({'; '.join(diff)}); "
            f"refusing to train on it; rebuild it {how}"
        )
    files = FILES[key["kind"]]
    if verify_files:
        for name in files:
            f = path / name
            if not f.is_file() or sha256_file(f) != meta["files"][name]:
                raise KDLabError(
                    f"teacher cache file {f} is missing or corrupt (sha256 differs from meta.json); rebuild it {how}"
                )
    return TeacherCache(path, meta, {name.removesuffix(".npy"): np.load(path / name, mmap_mode="r") for name in files})


@torch.no_grad()
def build_teacher_cache(
    path: str | Path,
    teacher: torch.nn.Module,
    split: PackedSplit,
    key: dict,
    *,
    device: torch.device,
    batch_size: int = 8,
    chunk_tokens: int = 128,
) -> TeacherCache:
    """Run the teacher once over every block of `split` and store what the key's kind holds (see the
    module doc): a top-k cache from its logits, a hidden cache from its last norm's output (the
    forward then skips the output head: logits of the last position only)."""
    from tqdm.auto import tqdm

    from kdlab.loss.fused import final_hidden_states

    path = Path(path)
    n, seq_len, kind = len(split), key["seq_len"], key["kind"]
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    open_mm = np.lib.format.open_memmap
    if kind == "hidden":
        np_dtype = np.uint16 if key["dtype"] == "bfloat16" else np.float32
        shapes = {"hidden.npy": (np_dtype, (n, seq_len, key["hidden_size"]))}
    else:
        k, ids_dtype = key["top_k"], np.uint16 if key["vocab_size"] <= 2**16 else np.int32
        shapes = {
            "top_logp.npy": (np.float16, (n, seq_len, k)),
            "top_ids.npy": (ids_dtype, (n, seq_len, k)),
            "tail_logp.npy": (np.float32, (n, seq_len)),
        }
    out = {name: open_mm(tmp / name, mode="w+", dtype=dt, shape=shape) for name, (dt, shape) in shapes.items()}
    t0 = time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc="caching the teacher", unit="batch", disable=None):
        rows = list(range(start, min(start + batch_size, n)))
        batch = {k_: v.to(device) for k_, v in split.batch(rows).items()}
        batch["no_padding"] = bool(split.attention_mask[rows].all())
        if kind == "hidden":
            with final_hidden_states(teacher) as box:
                teacher_outputs(teacher, batch, logits_to_keep=1)
            h = box["h"].to(getattr(torch, key["dtype"])).cpu()
            out["hidden.npy"][rows] = (h.view(torch.uint16) if key["dtype"] == "bfloat16" else h).numpy()
            continue
        logits = teacher_outputs(teacher, batch).logits  # (B, T, V) in the teacher's dtype
        top, ids, tail = teacher_top_k(logits, k, temperature=key["temperature"], chunk_tokens=chunk_tokens)
        out["top_logp.npy"][rows] = top.to(torch.float16).cpu().numpy()
        out["top_ids.npy"][rows] = ids.cpu().numpy().astype(ids_dtype)
        out["tail_logp.npy"][rows] = tail.cpu().numpy()
    for a in out.values():
        a.flush()
    dtypes = {name.removesuffix(".npy"): a.dtype.name for name, a in out.items()}
    del out
    meta = {
        "key": key,
        "files": {f: sha256_file(tmp / f) for f in FILES[kind]},
        "dtypes": dtypes,
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    cache = open_teacher_cache(path, key, verify_files=False)
    log.info(
        "teacher cache %s (%s): %d blocks x %d positions, %.0f MiB (%.0f bytes a token), built in %.0f s",
        path,
        kind,
        n,
        seq_len,
        cache.nbytes / 2**20,
        cache.bytes_per_token,
        meta["build_seconds"],
    )
    return cache


def key_for_run(cfg, split: PackedSplit, tokenizer, teacher: torch.nn.Module) -> dict:
    """The cache key of a run of `cfg` on `split` (what `kdlab cache-teacher` builds and training opens)."""
    return cache_key(
        split, tokenizer, teacher, cfg.kd_top_k, cfg.temperature, cfg.teacher_cache_kind, cfg.teacher_cache_dtype
    )


def open_for_run(
    cfg, split: PackedSplit, tokenizer, student: torch.nn.Module, teacher: torch.nn.Module
) -> TeacherCache | None:
    """The cache `cfg.teacher_cache` for a run training on `split`, checked against the run's key
    (None when the run reads no cache: teacher_cache='' or no KD term)."""
    if not (cfg.teacher_cache and cfg.alpha_kd > 0):
        return None
    if tokenizer is None:
        raise KDLabError(
            "teacher_cache needs the tokenizer (part of the cache's key): pass it to PackedBatches.for_run "
            "(kdlab.build_trainer does)"
        )
    s_vocab = student.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise KDLabError(
            f"teacher_cache needs the student's vocabulary to be the teacher's ({s_vocab} vs "
            f"{t_vocab}); train with teacher_cache=''"
        )
    key = key_for_run(cfg, split, tokenizer, teacher)
    cache = open_teacher_cache(cfg.teacher_cache, key)
    what = f"top-{key['top_k']}" if key["kind"] == "top-k" else f"final hidden states ({key['dtype']})"
    log.info(
        "teacher cache %s: %s of %d blocks; training steps skip the teacher's forward",
        cfg.teacher_cache,
        what,
        key["blocks"],
    )
    return cache


__all__ = [
    "KINDS",
    "HIDDEN_DTYPES",
    "key_for_run",
    "open_for_run",
    "TeacherCache",
    "cache_key",
    "open_teacher_cache",
    "build_teacher_cache",
    "teacher_fingerprint",
]
