#!/usr/bin/env python
"""Tokenize text into Megatron MMIDIDX datasets (<prefix>.bin/.idx + <prefix>.manifest.json).

Examples:
    # the demo data (BBC news, GPT-2): data/demo/bbc_train + data/demo/bbc_valid
    python tools/preprocess_data.py --input ~/.cache/megabd3/text/bbc.jsonl --tokenizer gpt2 \\
        --output-prefix data/demo/bbc --split train:0.95 --split valid:0.05 --workers 2
    # OpenWebText as bd3lms splits it (last 100,000 documents = validation)
    python tools/preprocess_data.py --preset owt --input 'owt/*.jsonl' --output-prefix data/owt/owt --workers 32
    # LM1B sentences with BERT, from a connected cluster
    python tools/preprocess_data.py --preset lm1b --hf-dataset lm1b --hf-split train --output-prefix data/lm1b/train

Inputs: jsonl (--text-key, default "text"), txt (one document per line, or --txt-mode file), parquet
(--text-key column), globs, or an HF dataset (--hf-dataset/--hf-config/--hf-split, --streaming; a packaged
builder over local files: --hf-dataset json --hf-data-files 'dir/*.jsonl').
A killed run resumes from its finished shards when re-run with the same arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.data import preprocess  # noqa: E402
from megabd3.errors import UserError, cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], help="input files or globs (jsonl/json, txt, parquet)")
    p.add_argument("--hf-dataset", default=None, help="HF dataset name or local dataset script/dir instead of --input")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-data-files", nargs="+", default=None,
                   help="local files/globs for a packaged HF builder, e.g. --hf-dataset json --hf-data-files 'x/*.jsonl'")
    p.add_argument("--streaming", action="store_true", help="stream the HF dataset (shards = its files)")
    p.add_argument("--output-prefix", required=True, help="output path prefix (without .bin/.idx)")
    p.add_argument("--tokenizer", default=None, help="gpt2, bert-base-uncased, a tokenizer directory or Hub name")
    p.add_argument("--preset", choices=sorted(preprocess.PRESETS), default=None,
                   help="owt: gpt2 + last 100,000 documents as valid; lm1b: bert-base-uncased, sentence documents")
    p.add_argument("--split", action="append", default=None,
                   help="NAME:START:END document range (ints, negatives from the end, or fractions) or NAME:FRACTION; "
                        "repeat for several splits; outputs <prefix>_<NAME>")
    p.add_argument("--text-key", default="text")
    p.add_argument("--txt-mode", choices=["lines", "file"], default=None, help="txt inputs: one document per line (default) or per file")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict", help="invalid UTF-8: fail (default) or replace and count")
    p.add_argument("--bert-sep-eos", action="store_true",
                   help="BERT: use [SEP] 102 as the document separator instead of the reference's [CLS] 101")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--shard-mb", type=float, default=0, help="target shard size in MB (0 = automatic)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-after-shards", type=int, default=0, help=argparse.SUPPRESS)  # tests: die after N shards
    return p


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    preset = preprocess.PRESETS.get(args.preset or "", {})
    tokenizer = args.tokenizer or preset.get("tokenizer")
    if not tokenizer:
        raise UserError("--tokenizer is required (gpt2, bert-base-uncased, a directory or Hub name) unless --preset is given")
    splits = args.split if args.split is not None else preset.get("splits", [])
    job = preprocess.Job(inputs=args.input, tokenizer=tokenizer, text_key=args.text_key,
                         txt_mode=args.txt_mode or preset.get("txt_mode", "lines"), errors=args.errors,
                         hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                         hf_data_files=args.hf_data_files,
                         streaming=args.streaming, shard_bytes=int(args.shard_mb * 1e6), workers=args.workers,
                         reference_separator=not args.bert_sep_eos)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    summary = preprocess.run(job, args.output_prefix, splits, progress=not args.no_progress,
                             stop_after_shards=args.stop_after_shards, log=log)
    for name, o in summary["outputs"].items():
        print(f"wrote {o['prefix']}.bin/.idx/.manifest.json: {o['documents']:,} documents, {o['tokens']:,} tokens")
    print(f"{summary['documents']:,} documents ({summary['empty_skipped']:,} empty skipped), {summary['tokens']:,} tokens, "
          f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f}s: {summary['tokens_per_s'] / 1e6:.2f} M tok/s, "
          f"{summary['bytes'] / 1e6 / max(summary['seconds'], 1e-9):.1f} MB/s")
    print("SUMMARY " + json.dumps({k: v for k, v in summary.items() if k != "outputs"}))
    return summary


if __name__ == "__main__":
    main()
