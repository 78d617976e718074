#!/usr/bin/env python
"""Inspect an MMIDIDX dataset: manifest, counts, dtype, token histogram, first/last documents, consistency.

    python tools/inspect_dataset.py data/demo/bbc_train [--tokenizer gpt2] [--full-check]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megabd3.data.indexed import IndexedDataset  # noqa: E402
from megabd3.data.manifest import check_manifest, read_manifest  # noqa: E402
from megabd3.errors import UserError, cli_main  # noqa: E402


def verify(ds: IndexedDataset) -> list[str]:
    """idx/bin consistency beyond what opening checks: contiguous pointers, positive sizes, doc index order."""
    problems = []
    expect = np.concatenate([[0], np.cumsum(ds.sizes[:-1].astype(np.int64) * ds.dtype.itemsize)]) if len(ds) else ds.pointers
    if not np.array_equal(ds.pointers, expect):
        problems.append("sequence pointers are not the running sum of the lengths")
    if len(ds) and ds.sizes.min() < 0:
        problems.append("negative sequence length")
    if np.any(np.diff(ds.doc_idx) < 0):
        problems.append("document_indices are not non-decreasing")
    return problems


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix")
    p.add_argument("--tokenizer", default=None, help="tokenizer for decoding (default: the manifest's)")
    p.add_argument("--chars", type=int, default=400, help="characters of each decoded document to show")
    p.add_argument("--full-check", action="store_true", help="scan every token for ids >= vocab size")
    args = p.parse_args(argv)
    ds = IndexedDataset(args.prefix)
    m = read_manifest(args.prefix)
    print(f"== {args.prefix}")
    print(f"manifest: {json.dumps(m, indent=1) if m else '(none: built by another tool)'}")
    print(f"dtype {ds.dtype}, sequences {len(ds):,}, documents {ds.num_documents:,}, tokens {ds.num_tokens:,}")
    if len(ds):
        s = ds.sizes
        print(f"document length: min {s.min()}, mean {s.mean():.1f}, median {int(np.median(s))}, max {s.max()}")
        stream = np.asarray(ds.stream)
        counts = np.bincount(stream.astype(np.int64))
        top = np.argsort(counts)[::-1][:10]
        print(f"token ids: max {int(stream.max())}, distinct {int((counts > 0).sum()):,}; most frequent: "
              + ", ".join(f"{int(t)}x{int(counts[t])}" for t in top if counts[t]))
    problems = verify(ds)
    if m:
        if m.get("num_documents") != len(ds):
            problems.append(f"manifest says {m.get('num_documents')} documents, index has {len(ds)}")
        if m.get("num_tokens") != ds.num_tokens:
            problems.append(f"manifest says {m.get('num_tokens')} tokens, index has {ds.num_tokens}")
    name = args.tokenizer or (m or {}).get("tokenizer", {}).get("name")
    if name:
        from megabd3.data.tokenizers import get_tokenizer

        tok = get_tokenizer(name)
        if m:
            check_manifest(args.prefix, tok, check_max_id_samples=len(ds) if args.full_check else 64)
        elif len(ds) and int(np.asarray(ds.stream).max()) >= tok.vocab_size:
            problems.append(f"token ids reach {int(np.asarray(ds.stream).max())} >= vocab {tok.vocab_size}")
        if len(ds):
            for label, i in (("first", 0), ("last", len(ds) - 1)):
                text = tok.decode(ds[i].tolist())
                print(f"-- {label} document ({i}, {ds.sizes[i]} tokens): {text[:args.chars]!r}{'…' if len(text) > args.chars else ''}")
    if problems:
        raise UserError(f"{args.prefix} is inconsistent: {'; '.join(problems)}")
    print("OK: idx/bin consistent" + (", manifest matches" if m else ""))
    return 0


if __name__ == "__main__":
    main()
