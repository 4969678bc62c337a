"""A cached teacher: its top-k log-probabilities for every training block, computed once, on disk.

    kdlab cache-teacher --teacher-cache data/cache/teacher-top256 --kd-top-k 256
    kdlab train         --teacher-cache data/cache/teacher-top256 --kd-top-k 256

A KD+LM training step then reads the teacher's distribution from the cache instead of running the
teacher's forward (evaluation still runs the live teacher: it measures against the real thing).
What is stored is exactly what top-k KD reads (`kdlab.losses.teacher_top_k`): for each position
the teacher's k largest log-probabilities at temperature T, their vocabulary ids, and the log of
the probability mass outside them; `kd_loss_topk` on it equals `kd_loss(..., top_k=k)` on the live
teacher up to the fp16 rounding of the stored log-probabilities.

The cache is keyed by sha256 hashes of the training blocks (token ids and padding masks), of the
tokenizer and of the teacher's weights (their dtype included: an fp16 teacher computes other
numbers than an fp32 one), and by k, the temperature and the block length. Opening it recomputes
the key from the run and the checksum of every array file, and refuses a cache that differs,
naming what differs.

The folder (written under a temporary name and renamed when complete, so an interrupted build
leaves no half cache behind):
    meta.json        the key, the shapes and dtypes, the sha256 of each array file
    top_logp.npy     (blocks, seq_len, k) float16   teacher log-probabilities at temperature T
    top_ids.npy      (blocks, seq_len, k) uint16    their ids (int32 for vocabularies over 65,536)
    tail_logp.npy    (blocks, seq_len)    float32   log of the mass outside the top-k
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

from .data import PackedSplit, tokenizer_fingerprint
from .errors import KDLabError
from .losses import teacher_top_k
from .manifest import sha256_file
from .precision import teacher_outputs

log = logging.getLogger("kdlab")

FORMAT = 1
FILES = ("top_logp.npy", "top_ids.npy", "tail_logp.npy")


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


def cache_key(split: PackedSplit, tokenizer, teacher: torch.nn.Module, top_k: int, temperature: float) -> dict:
    """What the cached numbers depend on; two runs with the same key read the same teacher."""
    return {
        "format": FORMAT,
        "data_sha256": _sha256_tensors([split.input_ids, split.attention_mask]),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "teacher_sha256": teacher_fingerprint(teacher),
        "top_k": int(top_k),
        "temperature": float(temperature),
        "blocks": len(split),
        "seq_len": int(split.input_ids.shape[1]),
        "vocab_size": int(teacher.get_output_embeddings().weight.shape[0]),
    }


@dataclass
class TeacherCache:
    """An opened cache: `batch(block_indices)` gives the teacher's top-k for those training blocks."""

    path: Path
    meta: dict
    top_logp: np.ndarray  # (blocks, seq_len, k) float16, memory-mapped
    top_ids: np.ndarray  # (blocks, seq_len, k) uint16 or int32
    tail_logp: np.ndarray  # (blocks, seq_len) float32

    def batch(self, blocks: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """{"t_top": (B, T, k) fp16, "t_ids": (B, T, k) int64, "t_tail": (B, T) fp32} on the CPU."""
        idx = np.asarray(blocks, dtype=np.int64)
        return {
            "t_top": torch.from_numpy(self.top_logp[idx]),
            "t_ids": torch.from_numpy(self.top_ids[idx].astype(np.int64)),
            "t_tail": torch.from_numpy(self.tail_logp[idx]),
        }

    @property
    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in FILES)


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
    how = f"with `kdlab cache-teacher --teacher-cache {path}` and this run's other settings"
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
    if verify_files:
        for name in FILES:
            f = path / name
            if not f.is_file() or sha256_file(f) != meta["files"][name]:
                raise KDLabError(
                    f"teacher cache file {f} is missing or corrupt (sha256 differs from meta.json); rebuild it {how}"
                )
    arrays = [np.load(path / name, mmap_mode="r") for name in FILES]
    return TeacherCache(path, meta, *arrays)


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
    """Run the teacher once over every block of `split` and store its top-k (see the module doc)."""
    from tqdm.auto import tqdm

    path = Path(path)
    n, seq_len, k = len(split), key["seq_len"], key["top_k"]
    ids_dtype = np.uint16 if key["vocab_size"] <= 2**16 else np.int32
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    open_mm = np.lib.format.open_memmap
    top_logp = open_mm(tmp / FILES[0], mode="w+", dtype=np.float16, shape=(n, seq_len, k))
    top_ids = open_mm(tmp / FILES[1], mode="w+", dtype=ids_dtype, shape=(n, seq_len, k))
    tail_logp = open_mm(tmp / FILES[2], mode="w+", dtype=np.float32, shape=(n, seq_len))
    t0 = time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc="caching the teacher", unit="batch", disable=None):
        rows = list(range(start, min(start + batch_size, n)))
        batch = {k_: v.to(device) for k_, v in split.batch(rows).items()}
        batch["no_padding"] = bool(split.attention_mask[rows].all())
        logits = teacher_outputs(teacher, batch).logits  # (B, T, V) in the teacher's dtype
        top, ids, tail = teacher_top_k(logits, k, temperature=key["temperature"], chunk_tokens=chunk_tokens)
        top_logp[rows] = top.to(torch.float16).cpu().numpy()
        top_ids[rows] = ids.cpu().numpy().astype(ids_dtype)
        tail_logp[rows] = tail.cpu().numpy()
    for a in (top_logp, top_ids, tail_logp):
        a.flush()
    del top_logp, top_ids, tail_logp
    meta = {
        "key": key,
        "files": {f: sha256_file(tmp / f) for f in FILES},
        "dtypes": {"top_logp": "float16", "top_ids": np.dtype(ids_dtype).name, "tail_logp": "float32"},
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    cache = open_teacher_cache(path, key, verify_files=False)
    log.info(
        "teacher cache %s: %d blocks x %d positions x top-%d, %.0f MiB, built in %.0f s",
        path,
        n,
        seq_len,
        k,
        cache.nbytes / 2**20,
        meta["build_seconds"],
    )
    return cache


def open_for_run(
    cfg, split: PackedSplit, tokenizer, student: torch.nn.Module, teacher: torch.nn.Module
) -> TeacherCache | None:
    """The cache `cfg.teacher_cache` for a run training on `split`, checked against the run's key
    (None when the run reads no cache: teacher_cache='' or no KD term)."""
    if not (cfg.teacher_cache and cfg.alpha_kd > 0):
        return None
    if tokenizer is None:
        raise KDLabError("teacher_cache needs the tokenizer (part of the cache's key): pass Trainer(..., tokenizer=)")
    s_vocab = student.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise KDLabError(
            f"teacher_cache needs the student's vocabulary to be the teacher's ({s_vocab} vs "
            f"{t_vocab}); train with teacher_cache=''"
        )
    key = cache_key(split, tokenizer, teacher, cfg.kd_top_k, cfg.temperature)
    cache = open_teacher_cache(cfg.teacher_cache, key)
    log.info(
        "teacher cache %s: top-%d of %d blocks; training steps skip the teacher's forward",
        cfg.teacher_cache,
        key["top_k"],
        key["blocks"],
    )
    return cache


__all__ = [
    "open_for_run",
    "TeacherCache",
    "cache_key",
    "open_teacher_cache",
    "build_teacher_cache",
    "teacher_fingerprint",
]
