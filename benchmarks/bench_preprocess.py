#!/usr/bin/env python
"""Preprocessing throughput vs the tokenizer alone, on the fetched real corpus.

    python tools/fetch_assets.py text tokenizers
    python benchmarks/bench_preprocess.py --workers 2 [--tokenizer gpt2] [--repeat 3]

The corpus is BBC news + the Wikipedia excerpt + PTB train ($MEGABD3_HOME/text), concatenated
``--repeat`` times into one jsonl (so per-run start-up is amortised as on a real corpus). Prints:

* raw: ``Tokenizer.encode_batch`` on the texts already in memory, batches of 1000, with as many threads
  as workers (tiktoken releases the GIL) — the ceiling;
* end-to-end: ``tools/preprocess_data.py`` in a subprocess (read, decode JSON, tokenize, numpy, write
  shards, merge, manifest), timed from launch to exit;
* the ratio (target >= 0.60 with 2 workers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.data.assets import text_dir  # noqa: E402
from megabd3.data.tokenizers import get_tokenizer  # noqa: E402
from megabd3.errors import UserError, cli_main  # noqa: E402

FILES = ["bbc.jsonl", "wiki_excerpt.jsonl", "ptb_train.jsonl"]


def build_corpus(out: Path, repeat: int) -> list[str]:
    texts = []
    for name in FILES:
        p = text_dir() / name
        if not p.is_file():
            raise UserError(f"{p} missing; run `python tools/fetch_assets.py text` first")
        texts += [json.loads(line)["text"] for line in open(p, encoding="utf-8")]
    texts = texts * repeat
    with open(out, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def raw_throughput(tok, texts: list[str], threads: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 1000):
        n += sum(len(x) for x in tok.encode_batch(texts[i:i + 1000], num_threads=threads))
    return n / (time.perf_counter() - t0), n


@cli_main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tok = get_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        texts = build_corpus(corpus, args.repeat)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {len(texts):,} documents, {mb:.1f} MB ({', '.join(FILES)} x{args.repeat})")
        raw1, ntok = raw_throughput(tok, texts, 1)
        rawn, _ = raw_throughput(tok, texts, args.workers)
        print(f"raw tokenizer ({args.tokenizer}): {raw1 / 1e6:.2f} M tok/s with 1 thread, "
              f"{rawn / 1e6:.2f} M tok/s with {args.workers} threads ({ntok:,} tokens)")
        cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--tokenizer", args.tokenizer,
               "--output-prefix", str(Path(tmp) / "out"), "--workers", str(args.workers), "--no-progress"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise UserError(f"preprocess_data.py failed: {proc.stderr.strip().splitlines()[-1]}")
        summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
        body = summary["tokens"] - summary["documents"]  # without the appended EODs, as the raw count
        e2e = body / wall
        print(f"end-to-end preprocess_data.py --workers {args.workers}: {e2e / 1e6:.2f} M tok/s "
              f"({wall:.2f}s wall incl. interpreter start, {mb / wall:.1f} MB/s, {summary['documents'] / wall:,.0f} docs/s)")
        print(f"ratio end-to-end / raw({args.workers} threads) = {e2e / rawn:.2f}   (target >= 0.60)")
        print(f"ratio end-to-end / raw(1 thread)   = {e2e / raw1:.2f}")


if __name__ == "__main__":
    main()
