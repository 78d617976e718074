"""``python -m megabd3.config FILE [--set k=v ...] [--world-size N]``

Prints the resolved config, its hash and the derived DeepSpeed config as JSON (exit 0), or every
problem found (exit 1, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from megabd3.config.deepspeed import derive_deepspeed_config
from megabd3.config.derived import data_parallel_size, effective_block_size, model_parallel_size
from megabd3.config.load import config_hash, config_to_dict, load_config
from megabd3.errors import UserError, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megabd3.config", description=__doc__.split("\n\n")[1].strip())
    p.add_argument("file", help="config JSON file (e.g. configs/demo.json)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set diffusion.block_size=4 optim.betas=[0.9,0.98] (repeatable)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to validate and derive the DeepSpeed batch for (default: parallel.world_size, "
                        "else tensor_parallel x pipeline_parallel, i.e. one data-parallel rank)")
    p.add_argument("--eval", action="store_true",
                   help="validate for evaluation/sampling instead of training (allows flex attention on CPU)")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size must be >= 1, found {args.world_size}")
    cfg = load_config(args.file, overrides, world_size=args.world_size, training=not args.eval)
    world_size = args.world_size or cfg.parallel.world_size or model_parallel_size(cfg)
    dp_size = data_parallel_size(cfg, world_size)
    out = {
        "config": config_to_dict(cfg),
        "config_hash": config_hash(cfg),
        "world_size": world_size,
        "dp_size": dp_size,
        "effective_block_size": effective_block_size(cfg),
        "deepspeed": derive_deepspeed_config(cfg, dp_size),
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
