"""A student with a vocabulary of its own: its tokenizer, the bytes behind every token, the tokens two
vocabularies share, and the embedding a new vocabulary starts from.

    s_tok = load_student_tokenizer("austen-bpe-8k")          # committed, checked against data/MANIFEST.json
    pair = TokenizerPair(s_tok, t_tok)                       # shared tokens, bytes per token, both sides
    emb = init_embedding(pair, teacher.get_input_embeddings().weight)   # (8192, 576), from the teacher

Why a vocabulary of its own: SmolLM2's output layer has 49,152 rows of 576, 28.3M parameters, and its
matmul is a third of a 15-layer student's forward. A byte-level BPE of 8,192 tokens trained on the
corpus cuts that to 4.7M, and on the corpus it splits text into about as many tokens per byte.

Tokens are compared by the bytes they stand for, not by id or by their printed form: two
tokenizers' ids mean nothing to each other, and byte-level BPEs print bytes through a private
alphabet. A special token (end of text) stands for no bytes; it is matched by its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from kdlab.errors import KDLabError
from kdlab.manifest import load_manifest, verify

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
# built-in student tokenizers: name -> tokenizer.json under data/ (committed, sha256 in data/MANIFEST.json)
STUDENT_TOKENIZERS = {"austen-bpe-8k": "tokenizers/austen-bpe-8k/tokenizer.json"}
END_OF_TEXT = "<|endoftext|>"


# ------------------------------------------------------------------------------ the student's tokenizer
def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet, no prefix space) trained on `texts`,
    with one special token, END_OF_TEXT, as id 0. Every byte is in its alphabet, so any text encodes,
    and decoding gives back the exact text. Deterministic for the same texts (HF tokenizers' trainer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tokenizer_file: str | Path):
    """A transformers tokenizer around a tokenizer.json, END_OF_TEXT as its end-of-text and padding."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def load_student_tokenizer(spec: str):
    """The student's tokenizer: a built-in name (STUDENT_TOKENIZERS, checked against data/MANIFEST.json),
    a tokenizer.json file, or a saved tokenizer folder."""
    if spec in STUDENT_TOKENIZERS:
        path = REPO_DATA / STUDENT_TOKENIZERS[spec]
        if not path.is_file():
            raise KDLabError(f"student_tokenizer {spec!r}: {path} is missing; it is part of the repository")
        verify(path, load_manifest()["tokenizers"][spec]["sha256"], f"the {spec} tokenizer")
        return wrap_tokenizer(path)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return wrap_tokenizer(path)
    if path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    raise KDLabError(
        f"student_tokenizer={spec!r} is neither a built-in tokenizer ({', '.join(STUDENT_TOKENIZERS)}) nor an "
        f"existing tokenizer.json or tokenizer folder"
    )


# ------------------------------------------------------------------------------ what tokens stand for
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def is_byte_level(tokenizer) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def token_strings(tokenizer) -> list[bytes | str]:
    """What each id stands for: its bytes, or for a special token its name (a str: no bytes of text).

    Byte-level BPEs print each byte as one character of GPT-2's alphabet; mapping the characters back
    gives the exact bytes. Other tokenizers: the UTF-8 of the token decoded alone."""
    special = set(tokenizer.all_special_ids)
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    if is_byte_level(tokenizer):
        byte_of = _byte_decoder()
        return [
            pieces[i] if i in special else bytes(byte_of[c] for c in (pieces[i] or "") if c in byte_of)
            for i in range(n)
        ]
    return [pieces[i] if i in special else tokenizer.decode([i]).encode("utf-8") for i in range(n)]


def byte_lengths(strings: list[bytes | str]) -> torch.Tensor:
    """(V,) int64: the bytes of text each id stands for (0 for a special token)."""
    return torch.tensor([len(s) if isinstance(s, bytes) else 0 for s in strings], dtype=torch.int64)


class TokenizerPair:
    """A student's and a teacher's tokenizer side by side: what each id stands for, and the tokens
    both vocabularies hold with the same bytes (or the same special name).

    s_shared[i] and t_shared[i] are the student's and the teacher's id of the i-th shared token, in
    the student's id order. With identical tokenizers every id is shared, with itself.
    """

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        self.s_strings, self.t_strings = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
        t_index: dict[bytes | str, int] = {}
        for i, s in enumerate(self.t_strings):
            t_index.setdefault(s, i)  # a string two ids print alike (rare): the first
        pairs = [(i, t_index[s]) for i, s in enumerate(self.s_strings) if s in t_index]
        self.s_shared = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        self.t_shared = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        self.s_bytes, self.t_bytes = byte_lengths(self.s_strings), byte_lengths(self.t_strings)
        self.s_eos, self.t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id

    @property
    def s_size(self) -> int:
        return len(self.s_strings)

    @property
    def t_size(self) -> int:
        return len(self.t_strings)

    def describe(self) -> str:
        return (
            f"student vocabulary {self.s_size:,}, teacher {self.t_size:,}, "
            f"{len(self.s_shared):,} tokens in both ({len(self.s_shared) / self.s_size:.1%} of the student's)"
        )

    def teacher_pieces(self, s: bytes) -> list[int]:
        """The teacher's ids for the bytes `s`: its BPE applied to them as one pre-token (byte-level
        teachers: any bytes, a partial UTF-8 character included), else its encoding of the text."""
        tok = self.teacher
        if is_byte_level(tok):
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            alphabet = bytes_to_unicode()
            return [t.id for t in tok.backend_tokenizer.model.tokenize("".join(alphabet[b] for b in s))]
        return tok(s.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]


def init_embedding(pair: TokenizerPair, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """(V_s, D) fp32 rows for the student's vocabulary from the teacher's (V_t, D) embedding.

    A token the teacher also has (same bytes, or same special name) copies the teacher's row exactly;
    any other token is the mean of the rows of the teacher's tokenization of its bytes (as tokensurgeon
    and FOCUS start a new vocabulary); a special token the teacher lacks, or bytes its vocabulary has
    no token for (SmolLM2 lacks a few control bytes and bytes never valid in UTF-8, 0xC0, 0xF5...),
    get the mean of all rows.
    """
    emb = teacher_embedding.detach().float()
    out = torch.empty(pair.s_size, emb.shape[1], dtype=torch.float32, device=emb.device)
    shared = dict(zip(pair.s_shared.tolist(), pair.t_shared.tolist()))
    for i, s in enumerate(pair.s_strings):
        if i in shared:
            out[i] = emb[shared[i]]
        elif isinstance(s, bytes) and (pieces := pair.teacher_pieces(s)):
            out[i] = emb[pieces].mean(0)
        else:
            out[i] = emb.mean(0)
    return out


def tokenizer_entry(path: Path, source: str) -> dict:
    """The data/MANIFEST.json entry of a committed tokenizer file."""
    from tokenizers import Tokenizer

    from kdlab.manifest import sha256_file

    return {
        "source": source,
        "file": str(path.relative_to(REPO_DATA.parent)),
        "vocab_size": Tokenizer.from_file(str(path)).get_vocab_size(),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


__all__ = [
    "STUDENT_TOKENIZERS",
    "END_OF_TEXT",
    "train_bpe",
    "wrap_tokenizer",
    "load_student_tokenizer",
    "token_strings",
    "byte_lengths",
    "TokenizerPair",
    "init_embedding",
]
