"""Train the built-in student tokenizer, austen-bpe-8k, and record it in data/MANIFEST.json.

    python scripts/train_tokenizer.py            # writes data/tokenizers/austen-bpe-8k/tokenizer.json

A byte-level BPE of 8,192 tokens (kdlab.vocab.train_bpe) on the Austen training split only, so no
validation or test text shapes the vocabulary the student is measured with. Offline, ~30 s on 2 cores;
the result is committed (a few hundred KB), so users never run this: `kdlab.vocab.load_student_tokenizer`
checks the committed file against the manifest's sha256.
"""

from __future__ import annotations

import argparse
import json

from kdlab.data.corpus import prepare_austen
from kdlab.manifest import MANIFEST
from kdlab.vocab import REPO_DATA, STUDENT_TOKENIZERS, tokenizer_entry, train_bpe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    name = "austen-bpe-8k"
    files = prepare_austen(args.data_dir)
    texts = [json.loads(line)["text"] for line in files["train"].read_text(encoding="utf-8").splitlines()]
    tok = train_bpe(texts, args.vocab_size)
    out = REPO_DATA / STUDENT_TOKENIZERS[name]
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    manifest = json.loads(MANIFEST.read_text())
    source = (
        f"kdlab.vocab.train_bpe: byte-level BPE, {args.vocab_size} tokens, on the {len(texts)} chapters of the "
        f"Austen train split (scripts/train_tokenizer.py)"
    )
    manifest.setdefault("tokenizers", {})[name] = tokenizer_entry(out, source)
    MANIFEST.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(manifest["tokenizers"][name], indent=2))


if __name__ == "__main__":
    main()
