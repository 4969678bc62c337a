"""Two tokenizations of one text, lined up by bytes: the chunks a cross-tokenizer loss compares.

    s_chunk, t_chunk = align_chunks(byte_ends(s_ids, s_bytes), byte_ends(t_ids, t_bytes))
    split = pair_documents(texts, pair, seq_len=256)     # blocks in both tokenizations, with chunk ids

A token's byte end is where its bytes stop in the text (the cumulative sum of the bytes each token
stands for; a special token stands for none). A chunk boundary is a byte position where *both*
tokenizations have a token boundary; a chunk is the text between two consecutive boundaries, and
each token belongs to the chunk its bytes fall in (the chunks partition the bytes, and each chunk
holds at least one token of either side). At the start of a chunk both models have read exactly the
same bytes, so

    log p(chunk)  = sum of log p(token | prefix) over the chunk's tokens          (each model, teacher-forced)
    sum over chunks of log p(chunk) = log p(text)                                   (each model)

and the two models' chunk probabilities are probabilities of the same event: "the next bytes are
these". The position before a chunk's first token is an *aligned position*: both models predict
the next token from the same byte prefix (kdlab.loss.cross_tokenizer compares them there).

Blocks (`pair_documents`): each document is encoded by the student's tokenizer and cut into
blocks of at most seq_len tokens, each opening with the student's end-of-text token (a block is a
document fragment, and that token makes every text token one that is predicted); the cut moves
back to a UTF-8 character boundary. The teacher encodes each block's text on its own, after its own
end-of-text token. Both sides then cover exactly the same bytes, so bits per byte of student and
teacher are over the same text.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdlab.data.corpus import SPLITS, PackedSplit, load_documents, prepare_austen, tokenizer_fingerprint
from kdlab.errors import KDLabError
from kdlab.loss.cross_tokenizer import NO_CHUNK, chunk_starts
from kdlab.loss.divergences import IGNORE_INDEX


def byte_ends(ids: Sequence[int], token_bytes: Sequence[int] | torch.Tensor) -> list[int]:
    """The byte position where each token's bytes end (cumulative; a special token adds none)."""
    ends, pos = [], 0
    for i in ids:
        pos += int(token_bytes[i])
        ends.append(pos)
    return ends


def align_chunks(s_ends: Sequence[int], t_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """Chunk id of every token on each side (NO_CHUNK for a token with no bytes).

    Both sides must cover the same bytes (their last ends equal). Chunk c spans the bytes between
    the c-th and the (c+1)-th common boundary; a token belongs to the chunk its last byte is in."""
    s_total, t_total = (s_ends[-1] if s_ends else 0), (t_ends[-1] if t_ends else 0)
    if s_total != t_total:
        raise ValueError(f"the two tokenizations cover {s_total} and {t_total} bytes; they must cover the same text")
    boundaries = sorted((set(s_ends) & set(t_ends)) - {0})

    def chunks(ends: Sequence[int]) -> list[int]:
        out, prev = [], 0
        for e in ends:
            out.append(bisect.bisect_left(boundaries, e) if e > prev else NO_CHUNK)
            prev = e
        return out

    return chunks(s_ends), chunks(t_ends)


@dataclass
class PairedSplit(PackedSplit):
    """Blocks of one split in the student's tokenization (input_ids, attention_mask: what PackedSplit
    holds, so every batch source and evaluation reads it unchanged) and in the teacher's, with each
    token's chunk id. A batch adds t_input_ids, t_attention_mask, s_chunk and t_chunk, the teacher's
    side trimmed to its longest row in the batch."""

    t_input_ids: torch.Tensor = None  # (n_blocks, T_t) the same text, teacher tokens, padded
    t_attention_mask: torch.Tensor = None
    s_chunk: torch.Tensor = None  # (n_blocks, T) chunk id of each student token, NO_CHUNK where none
    t_chunk: torch.Tensor = None  # (n_blocks, T_t)

    def head(self, n: int) -> PairedSplit:
        return PairedSplit(
            self.input_ids[:n],
            self.attention_mask[:n],
            self.t_input_ids[:n],
            self.t_attention_mask[:n],
            self.s_chunk[:n],
            self.t_chunk[:n],
        )

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        out = super().batch(indices)
        t_mask = self.t_attention_mask[indices]
        width = int(t_mask.sum(1).max())
        t_ids = self.t_input_ids[indices][:, :width]
        return out | {
            "t_input_ids": t_ids,
            "t_attention_mask": t_mask[:, :width],
            "s_chunk": self.s_chunk[indices],
            "t_chunk": self.t_chunk[indices][:, :width],
        }

    def aligned_share(self) -> dict[str, float]:
        """The share of each side's predicted text tokens that sit at an aligned position."""
        out = {}
        for side, chunk in (("student", self.s_chunk), ("teacher", self.t_chunk)):
            starts = int(chunk_starts(chunk).sum())
            out[side] = starts / int((chunk != NO_CHUNK).sum())
        return out


def teacher_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's view of a paired batch: its own tokens, as a model's forward and the losses read them."""
    ids, mask = batch["t_input_ids"], batch["t_attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def _blocks(text: str, s_tok, s_bytes: torch.Tensor, seq_len: int) -> Iterator[tuple[list[int], bytes]]:
    """(student ids without the leading end-of-text, the block's bytes) for each block of one document."""
    raw = text.encode("utf-8")
    ids = s_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # "<|endoftext|>" in text is text
    ends = byte_ends(ids, s_bytes)
    start, pos = 0, 0
    while start < len(ids):
        stop = min(start + seq_len - 1, len(ids))
        # back to a character boundary: the teacher encodes the block's text on its own
        while (
            stop < len(ids) and stop > start + 1 and ends[stop - 1] < len(raw) and (raw[ends[stop - 1]] & 0xC0) == 0x80
        ):
            stop -= 1
        yield ids[start:stop], raw[pos : ends[stop - 1]]
        start, pos = stop, ends[stop - 1]


def pair_documents(texts: Sequence[str], pair, seq_len: int) -> PairedSplit:
    """Every document cut into blocks in both tokenizations (see the module's docstring)."""
    s_tok, t_tok = pair.student, pair.teacher
    s_rows, t_rows, s_chunks, t_chunks = [], [], [], []
    pieces = [piece for text in texts if text for piece in _blocks(text, s_tok, pair.s_bytes, seq_len)]
    t_texts = [raw.decode("utf-8") for _, raw in pieces]
    t_encoded = t_tok(t_texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if t_texts else []
    for (s_ids, raw), t_ids in zip(pieces, t_encoded):
        s_ids, t_ids = [pair.s_eos, *s_ids], [pair.t_eos, *t_ids]
        s_ends, t_ends = byte_ends(s_ids, pair.s_bytes), byte_ends(t_ids, pair.t_bytes)
        if t_ends[-1] != len(raw) or s_ends[-1] != len(raw):
            raise KDLabError(
                "a tokenizer does not reproduce the text's bytes (it normalises or drops some), so the two "
                "tokenizations cannot be aligned by bytes; use byte-level tokenizers"
            )
        s_chunk, t_chunk = align_chunks(s_ends, t_ends)
        s_rows.append(s_ids), t_rows.append(t_ids), s_chunks.append(s_chunk), t_chunks.append(t_chunk)
    if not s_rows:
        raise KDLabError("the split has no text to pair")
    t_width = max(len(r) for r in t_rows)

    def pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)

    def mask(rows: list[list[int]], width: int) -> torch.Tensor:
        return pad([[1] * len(r) for r in rows], width, 0)

    s_pad = s_tok.pad_token_id if s_tok.pad_token_id is not None else pair.s_eos
    t_pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else pair.t_eos
    return PairedSplit(
        pad(s_rows, seq_len, s_pad),
        mask(s_rows, seq_len),
        pad(t_rows, t_width, t_pad),
        mask(t_rows, t_width),
        pad(s_chunks, seq_len, NO_CHUNK),
        pad(t_chunks, t_width, NO_CHUNK),
    )


def _utf8_prefix(raw: bytes) -> int:
    """The length of the longest prefix of `raw` that is whole, valid UTF-8."""
    try:
        raw.decode("utf-8")
        return len(raw)
    except UnicodeDecodeError as e:
        return e.start


def pair_generated(prompt: torch.Tensor, continuation: torch.Tensor, pair) -> dict[str, torch.Tensor]:
    """The teacher's side of text the student generated (kdlab.training.on_policy): t_input_ids,
    t_attention_mask, s_chunk and t_chunk for rows of `prompt` (B, P) + `continuation` (B, G) student ids,
    and s_sampled (B, P + G) bool: the generated tokens the scored text depends on (all of them up to
    and including the first special token), whose log-probabilities the on-policy gradient scores.

    Only the generated text is scored, so only chunks that lie wholly in it get an id (a chunk that
    straddles the prompt's end is left out, like the prompt). The scored text stops before the first
    special token the student wrote (it stands for no bytes the teacher could read) and at the last
    whole UTF-8 character (a byte-level student can write bytes that are not text). The teacher
    reads the kept bytes, prompt included, re-tokenized: after its end-of-text token, its own
    tokenization of that text in one piece. A row whose text the teacher does not read back byte for byte
    is left unscored."""
    t_rows, s_chunks, t_chunks, sampled = [], [], [], []
    P = prompt.shape[1]
    for p_ids, c_ids in zip(prompt.tolist(), continuation.tolist()):
        s_ids = p_ids + c_ids
        specials = [k for k, i in enumerate(c_ids) if isinstance(pair.s_strings[i], str)]
        m = P + (specials[0] if specials else len(c_ids))  # student tokens that may be scored
        sampled.append([False] * P + [k <= (specials[0] if specials else len(c_ids)) for k in range(len(c_ids))])
        ends = byte_ends(s_ids[:m], pair.s_bytes)
        raw = b"".join(s for s in (pair.s_strings[i] for i in s_ids[:m]) if isinstance(s, bytes))
        valid = _utf8_prefix(raw)
        while m > 0 and (ends[m - 1] > valid or _utf8_prefix(raw[: ends[m - 1]]) < ends[m - 1]):
            m -= 1  # back to a token end inside the valid text and on a character boundary
        kept = raw[: ends[m - 1]] if m else b""
        text = kept.decode("utf-8")
        t_ids = [pair.t_eos, *pair.teacher(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
        try:
            s_chunk, t_chunk = align_chunks(ends[:m], byte_ends(t_ids, pair.t_bytes))
        except ValueError:  # the teacher's tokenizer changed the bytes (it normalises): score nothing here
            s_chunk, t_chunk, m, sampled[-1] = [], [NO_CHUNK] * len(t_ids), 0, [False] * len(s_ids)
        # keep only the chunks that start in the generated text (not the prompt's, nor one that straddles)
        first = len(ends) + 1  # no chunk id reaches it: nothing is scored
        if m > P:
            prompt_end = ends[P - 1]
            start: dict[int, int] = {}  # chunk -> the byte it starts at (its first token's start)
            for c, prev in zip(s_chunk, [0, *ends[: m - 1]]):
                if c != NO_CHUNK:
                    start.setdefault(c, prev)
            opened = [c for c, b in start.items() if b >= prompt_end]
            first = min(opened) if opened else first
        s_chunks.append([c if c >= first else NO_CHUNK for c in s_chunk] + [NO_CHUNK] * (len(s_ids) - m))
        t_chunks.append([c if c >= first else NO_CHUNK for c in t_chunk])
        t_rows.append(t_ids)
    width = max(len(r) for r in t_rows)
    t_pad = pair.teacher.pad_token_id if pair.teacher.pad_token_id is not None else pair.t_eos
    return {
        "t_input_ids": torch.tensor([r + [t_pad] * (width - len(r)) for r in t_rows]),
        "t_attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in t_rows]),
        "s_chunk": torch.tensor(s_chunks),
        "t_chunk": torch.tensor([r + [NO_CHUNK] * (width - len(r)) for r in t_chunks]),
        "s_sampled": torch.tensor(sampled),
    }


def prepare_paired_data(data: str, data_dir: str | Path, pair, seq_len: int) -> dict[str, PairedSplit]:
    """Corpus name/path -> paired train/validation/test splits, cached in data_dir/cache (a few
    seconds to build on Austen; keyed by both tokenizers, the documents and seq_len)."""
    if data == "austen":
        prepare_austen(data_dir)
    documents = load_documents(data, data_dir)
    key = hashlib.sha256(
        "\x00".join(
            [
                "paired-v2",
                tokenizer_fingerprint(pair.student),
                tokenizer_fingerprint(pair.teacher),
                str(seq_len),
                *(documents[s]._fingerprint for s in SPLITS),
            ]
        ).encode()
    ).hexdigest()[:24]
    path = Path(data_dir) / "cache" / f"paired-{key}.pt"
    if path.is_file():
        return {s: PairedSplit(**fields) for s, fields in torch.load(path).items()}
    splits = {s: pair_documents(documents[s]["text"], pair, seq_len) for s in SPLITS}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({s: vars(d) for s, d in splits.items()}, tmp)
    tmp.replace(path)
    return splits


__all__ = [
    "byte_ends",
    "align_chunks",
    "PairedSplit",
    "teacher_batch",
    "pair_documents",
    "pair_generated",
    "prepare_paired_data",
]
