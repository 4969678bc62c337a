"""Corpus, tokenization and batches.

The default corpus is Jane Austen's six novels, taken from Debian's `r-cran-janeaustenr` package
and decoded with the pure-Python `rdata` package (no R, no hub). Chapters are the documents;
validation and test are whole held-out chapters (global chapter index i: i % 20 == 9 -> validation,
i % 20 == 19 -> test), so no passage of a test chapter is ever seen in training.

Documents are tokenized and packed into fixed-length blocks with HF `datasets`; its cache makes
every run after the first start instantly. A block's tail that is not full is padded (attention
mask 0, label -100) rather than dropped, so validation and test cover every token.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kdlab.errors import KDLabError
from kdlab.loss.divergences import IGNORE_INDEX
from kdlab.manifest import load_manifest, sha256_file, verify

SPLITS = ("train", "validation", "test")
AUSTEN_DEB_PACKAGE = "r-cran-janeaustenr"
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?\s*$")


def split_of(doc_index: int) -> str:
    """Held-out rule shared by every corpus: 1 document in 20 to validation, 1 in 20 to test."""
    r = doc_index % 20
    return "validation" if r == 9 else "test" if r == 19 else "train"


# --------------------------------------------------------------------------------------------
# Austen: Debian package -> novels -> chapters -> splits
# --------------------------------------------------------------------------------------------


def _deb_member(deb: Path, prefix: str) -> bytes:
    """Return one member of a .deb (an `ar` archive) whose name starts with `prefix`."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise KDLabError(f"{deb} is not a Debian package")
    pos = 8
    while pos < len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    raise KDLabError(f"{deb} has no member {prefix}*")


def austen_deb_url(name: str) -> str:
    """Where Debian's archive keeps the package file data/MANIFEST.json names (its pool layout)."""
    return f"https://deb.debian.org/debian/pool/main/{AUSTEN_DEB_PACKAGE[0]}/{AUSTEN_DEB_PACKAGE}/{name}"


def no_apt_get_message(downloads: Path, expected_name: str) -> str:
    """The one line for a machine without apt-get (macOS, Windows, non-Debian Linux): how to go on."""
    return (
        f"the Austen corpus comes from Debian's {AUSTEN_DEB_PACKAGE} package and apt-get is not available here: "
        f"download {austen_deb_url(expected_name)} into {downloads}/ (its sha256 is in data/MANIFEST.json) "
        f"and run `kdlab prepare` again, or set KDLAB_CORPUS=<a text file or folder> to run "
        f"the course on your own text (`kdlab train --data PATH`)"
    )


def _download_austen_deb(downloads: Path, expected_name: str) -> Path:
    deb = downloads / expected_name
    if deb.is_file():
        return deb
    if shutil.which("apt-get") is None:
        raise KDLabError(no_apt_get_message(downloads, expected_name))
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "download", AUSTEN_DEB_PACKAGE]
    try:
        result = subprocess.run(cmd, cwd=downloads, capture_output=True, text=True)
        if result.returncode != 0:  # package lists may be missing on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            result = subprocess.run(cmd, cwd=downloads, capture_output=True, text=True)
    except FileNotFoundError:  # found by `which` but not runnable
        raise KDLabError(no_apt_get_message(downloads, expected_name)) from None
    if result.returncode != 0 or not deb.is_file():
        msg = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise KDLabError(f"`apt-get download {AUSTEN_DEB_PACKAGE}` failed: {msg[0]}")
    return deb


def _decode_novels(deb: Path) -> dict[str, list[str]]:
    """Decode the R lazy-load database inside the package into {novel: lines}."""
    import rdata  # imported here: only set-up needs it

    with tarfile.open(fileobj=io.BytesIO(_deb_member(deb, "data.tar"))) as tar:
        base = "./usr/lib/R/site-library/janeaustenr/data/"
        rdx = tar.extractfile(base + "Rdata.rdx").read()
        rdb = tar.extractfile(base + "Rdata.rdb").read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" is harmless
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx)))
        novels = {}
        for name, (offset, length) in index["variables"].items():
            blob = rdb[int(offset) : int(offset) + int(length)]  # 4-byte length, then a zlib stream
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
            novels[str(name)] = [str(line) for line in lines]
    return novels


def _unwrap(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs separated by blank lines."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def austen_chapters(novels: dict[str, list[str]]) -> list[dict]:
    """Split each novel at its chapter headings; front matter before chapter one is dropped."""
    chapters = []
    for book in sorted(novels):
        current: list[str] | None = None
        bodies = []
        for line in novels[book]:
            if _CHAPTER.match(line):
                current = [line]
                bodies.append(current)
            elif current is not None:
                current.append(line)
        chapters += [{"book": book, "chapter": i + 1, "text": _unwrap(b)} for i, b in enumerate(bodies)]
    return chapters


def prepare_austen(data_dir: str | Path) -> dict[str, Path]:
    """Build data_dir/austen/{train,validation,test}.jsonl, verified against data/MANIFEST.json."""
    manifest = load_manifest()["austen"]
    data_dir = Path(data_dir)
    out = data_dir / "austen"
    files = {s: out / f"{s}.jsonl" for s in SPLITS}
    if all(f.is_file() and sha256_file(f) == manifest["splits"][f.name] for f in files.values()):
        return files
    deb = _download_austen_deb(data_dir / "downloads", manifest["deb"]["name"])
    verify(deb, manifest["deb"]["sha256"], "the r-cran-janeaustenr package")
    chapters = austen_chapters(_decode_novels(deb))
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows = [c for i, c in enumerate(chapters) if split_of(i) == split]
        tmp = files[split].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(files[split])
        verify(files[split], manifest["splits"][files[split].name], f"the Austen {split} split")
    return files


# --------------------------------------------------------------------------------------------
# Any corpus -> DatasetDict of documents with a "text" column
# --------------------------------------------------------------------------------------------


def _local_documents(paths: list[Path]) -> list[str]:
    files: list[Path] = []
    for p in paths:
        files += sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        # documents of ~4k characters along paragraph boundaries, so that the 1-in-20 held-out
        # rule also works for a single long file
        doc = ""
        for para in re.split(r"\n\s*\n", text):
            if para.strip():
                doc = f"{doc}\n\n{para.strip()}" if doc else para.strip()
            if len(doc) >= 4000:
                docs.append(doc)
                doc = ""
        if doc:
            docs.append(doc)
    return docs


def load_documents(data: str, data_dir: str | Path):
    """Return a `datasets.DatasetDict` with train/validation/test splits of documents."""
    import datasets

    cache = str(Path(data_dir) / "cache" / "hf")
    if data == "austen":
        files = {s: Path(data_dir) / "austen" / f"{s}.jsonl" for s in SPLITS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise KDLabError(f"the Austen corpus is not prepared ({missing[0]} is missing); run `kdlab prepare`")
        return datasets.load_dataset("json", data_files={s: str(f) for s, f in files.items()}, cache_dir=cache)

    paths = [Path(p) for p in data.split(",")]
    looks_local = any(p.exists() or p.suffix or str(p).startswith((".", "/", "~")) for p in paths)
    if looks_local:
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise KDLabError(f"data file {missing[0]!r} does not exist")
        docs = _local_documents(paths)
        by_split = {s: [d for i, d in enumerate(docs) if split_of(i) == s] for s in SPLITS}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": d}) for s, d in by_split.items()})
    try:
        loaded = datasets.load_dataset(data, cache_dir=cache)
    except Exception as e:  # offline, unknown name, ...: one clear line instead of a hub traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KDLabError(
            f"data={data!r} is neither 'austen', an existing file/folder, nor a loadable HF dataset ({first})"
        ) from None
    if "text" not in loaded["train"].column_names:
        raise KDLabError(f"HF dataset {data!r} has no 'text' column (columns: {loaded['train'].column_names})")
    if "validation" in loaded and "test" in loaded:
        return datasets.DatasetDict({s: loaded[s].select_columns(["text"]) for s in SPLITS})
    train = loaded["train"].select_columns(["text"])
    return datasets.DatasetDict({s: train.select([i for i in range(len(train)) if split_of(i) == s]) for s in SPLITS})


# --------------------------------------------------------------------------------------------
# Tokenize and pack
# --------------------------------------------------------------------------------------------


@dataclass
class PackedSplit:
    """Fixed-length token blocks of one split."""

    input_ids: torch.Tensor  # (n_blocks, seq_len) int64
    attention_mask: torch.Tensor  # (n_blocks, seq_len) int64, 0 on padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def head(self, n: int) -> PackedSplit:
        """The first `n` blocks (all of them if there are fewer)."""
        return PackedSplit(self.input_ids[:n], self.attention_mask[:n])

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        ids = self.input_ids[indices]
        mask = self.attention_mask[indices]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}

    def eval_batches(self, batch_size: int, max_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in corpus order; the first `max_batches` (0 = all), the same ones every time."""
        n = len(self) if max_batches == 0 else min(len(self), max_batches * batch_size)
        for start in range(0, n, batch_size):
            yield self.batch(list(range(start, min(start + batch_size, n))))


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (a fast tokenizer's JSON, else its vocabulary)."""
    text = (
        tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer.get_vocab())
    )
    return hashlib.sha256(text.encode()).hexdigest()


def tokenize_and_pack(documents, tokenizer, seq_len: int) -> dict[str, PackedSplit]:
    """Tokenize every document, append EOS, concatenate and cut into blocks of `seq_len`."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise KDLabError("the tokenizer has no EOS token to separate documents")
    tok_key = tokenizer_fingerprint(tokenizer)[:32]

    def pack(batch):
        ids: list[int] = []
        for enc in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            ids += enc + [eos]
        blocks, masks = [], []
        for start in range(0, len(ids), seq_len):
            block = ids[start : start + seq_len]
            n = len(block)
            blocks.append(block + [pad] * (seq_len - n))
            masks.append([1] * n + [0] * (seq_len - n))
        return {"input_ids": blocks, "attention_mask": masks}

    packed = {}
    for split in SPLITS:
        ds = documents[split]
        if len(ds) == 0:
            raise KDLabError(f"the {split} split of the corpus is empty; give more documents (1 in 20 is held out)")
        ds = ds.map(
            pack,
            batched=True,
            batch_size=1000,
            remove_columns=ds.column_names,
            new_fingerprint=_fingerprint(ds._fingerprint, tok_key, str(seq_len), "pack-v1"),
            desc=f"tokenizing {split}",
        )
        cols = ds.with_format("torch")[:]  # the whole split as (n_blocks, seq_len) tensors
        split_data = PackedSplit(cols["input_ids"], cols["attention_mask"])
        if split_data.num_tokens < 2:
            raise KDLabError(
                f"the {split} split has no text to learn from (after tokenization it holds "
                f"{split_data.num_tokens} tokens)"
            )
        packed[split] = split_data
    return packed


@functools.lru_cache(maxsize=4)
def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled block order of one epoch: a pure function of (seed, epoch), so a resumed run
    sees the very same batches. Cached: the trainer asks for it for every micro-batch (read-only)."""
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batches_per_epoch(data: PackedSplit, batch_size: int) -> int:
    return len(data) // batch_size


def prepare_data(data: str, data_dir: str | Path, tokenizer, seq_len: int) -> dict[str, PackedSplit]:
    """Corpus name/path -> packed train/validation/test splits (builds the Austen files if needed)."""
    if data == "austen":
        prepare_austen(data_dir)
    return tokenize_and_pack(load_documents(data, data_dir), tokenizer, seq_len)


__all__ = [
    "PackedSplit",
    "prepare_austen",
    "prepare_data",
    "load_documents",
    "tokenize_and_pack",
    "epoch_order",
    "batches_per_epoch",
    "split_of",
    "austen_chapters",
]
