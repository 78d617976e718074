#!/usr/bin/env python
"""Generate samples from a trained checkpoint (any parallel layout: the gathered model.pt is loaded).

    python launchers/sample.py --checkpoint runs/owt_bd3_l16 --set sampling.num_samples=300 \
        --set sampling.length=1024 --set sampling.seed=1 --out samples/bd3_l16_seed1.jsonl

Writes one JSON object per sample (tokens, text, length, NFE, cache-fill forwards, unigram entropy,
stop reason, tries, wall time, tokens/s) and prints a summary table. Sampling options come from the
checkpoint's config ``sampling`` section, overridable with ``--set sampling.key=value``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__import__("megabd3.quiet").quiet.install()  # known third-party noise off before megatron/deepspeed import

from megabd3.errors import cli_main  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir (uses checkpoints/latest), checkpoints/ or a step_* dir")
    p.add_argument("--out", default="", help="samples jsonl (default <run_dir>/samples/<step>_<objective>_len<L>_seed<S>.jsonl)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the checkpoint's data.tokenizer)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@cli_main
def main(argv=None) -> None:
    args = parse(argv)
    from pathlib import Path

    from megabd3.eval.inference import load_model, output_location
    from megabd3.eval.report import markdown_table
    from megabd3.sampling.run import generate_samples, summarize, write_jsonl

    cfg, model, tok = load_model(args.checkpoint, args.overrides, args.tokenizer, use_ema=not args.no_ema,
                                 device=args.device)
    rows = generate_samples(cfg, model, tok, progress=not args.no_progress)
    out = args.out
    if not out:
        run_dir, tag = output_location(args.checkpoint, args.overrides)
        s = cfg.sampling
        out = str(run_dir / "samples" / f"{tag}_{cfg.diffusion.objective}_len{s.length}_seed{s.seed}.jsonl")
    path = write_jsonl(rows, out)
    summary = summarize(rows)
    print(markdown_table([summary], list(summary)))
    print(f"wrote {len(rows)} samples to {Path(path)}")


if __name__ == "__main__":
    main()
