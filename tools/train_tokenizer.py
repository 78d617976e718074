#!/usr/bin/env python
"""Train a small byte-level BPE on the training documents of a jsonl corpus (CPU-scale runs).

    python tools/train_tokenizer.py --input ~/.cache/megabd3/text/bbc.jsonl --docs 0:0.95 \\
        --vocab-size 2048 --out data/demo/tok_bbc

``--docs START:END`` picks the training documents (fractions or counts, as ``tools/preprocess_data.py
--split``), so the validation documents never shape the vocabulary. The output is a Hugging Face
tokenizer directory with [BOS]/[EOS]/[PAD]/[MASK] that every megabd3 tool accepts as ``--tokenizer``
or ``data.tokenizer``. See megabd3/data/train_tokenizer.py for why CPU runs want a small vocabulary.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.errors import UserError, cli_main  # noqa: E402


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="jsonl file with one document per line")
    p.add_argument("--text-key", default="text")
    p.add_argument("--docs", default="0:1.0", help="training document range START:END (fractions or counts)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--name", default="", help="name recorded in the tokenizer (default bpe<V>-<input stem>-train)")
    args = p.parse_args(argv)
    from megabd3.data.train_tokenizer import read_jsonl_texts, train_bpe

    from megabd3.data.preprocess import parse_split, resolve_splits

    texts = read_jsonl_texts(args.input, args.text_key)
    # the same document-range rules (and rounding) as tools/preprocess_data.py --split
    ((_, a, b),) = resolve_splits([parse_split(f"train:{args.docs}")], len(texts))
    docs = texts[a:b]
    if not docs:
        raise UserError(f"--docs {args.docs} selects no documents of the {len(texts)} in {args.input}")
    stem = os.path.splitext(os.path.basename(args.input))[0]
    out = train_bpe(docs, args.out, vocab_size=args.vocab_size, name=args.name or f"bpe{args.vocab_size}-{stem}-train")
    print(f"trained a {args.vocab_size}-entry BPE on {len(docs)} documents ({args.docs}) of {args.input} -> {out}")


if __name__ == "__main__":
    main()
