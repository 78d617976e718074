"""Pretrain or fine-tune a BD3-LM.

    deepspeed --num_gpus 2 launchers/pretrain.py --config configs/demo.json [--set training.steps=50]
    torchrun --nproc-per-node 8 launchers/pretrain.py --config configs/owt.json
    srun python launchers/pretrain.py --config configs/owt.json        (launchers/slurm/pretrain.sbatch)
    python launchers/pretrain.py --config configs/owt.json --dry-run --world-size 64

--dry-run builds the real model of every rank role on a fake process group of --world-size ranks, traces one
forward+backward with fake tensors and prints the plan, a per-rank memory table and the problems (missing
dataset/tokenizer, ...). It ignores RANK/MASTER_ADDR/... (no rendezvous) and refuses to run under torchrun.
Exit status of --dry-run: 0 = clean; 1 = problems listed (missing data or tokenizer, ...: the plan and
table are still printed); 2 = config error or internal failure (a rank role that could not be planned is
an `n/a` row plus a listed failure; the other roles are still planned).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__import__("megabd3.quiet").quiet.install()  # known third-party noise off before megatron/deepspeed import

from megabd3.errors import cli_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON config file (see configs/)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override, e.g. training.steps=10")
    p.add_argument("--dry-run", action="store_true",
                   help="plan the run: layout, batch math, data, per-rank memory from a fake-tensor trace; no training. "
                        "Exit 0 clean, 1 problems listed, 2 config error or internal failure")
    p.add_argument("--world-size", type=int, default=0, help="world size assumed by --dry-run (default parallel.world_size or 1)")
    p.add_argument("--dry-run-device", choices=("cuda", "cpu"), default="cuda",
                   help="device the planned run trains on (decides precision=auto); default cuda")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def _dry_run(args: argparse.Namespace) -> int:
    """Print the plan; the exit status (module docstring): 2 also for a config error (raised before any
    output) or a failure outside the per-role planning, which cannot give a partial table."""
    import traceback

    from megabd3.config.load import load_config
    from megabd3.errors import UserError
    from megabd3.training.dryrun import EXIT_FAILED, dry_run

    try:
        cfg = load_config(args.config, args.set)
        report = dry_run(cfg, args.world_size or cfg.parallel.world_size or 1, target_cuda=args.dry_run_device == "cuda")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - an internal failure: say so with the cause, keep the traceback
        traceback.print_exc()
        print(f"error: the dry run failed internally: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(report.render(), flush=True)
    return report.exit_code


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        sys.exit(_dry_run(args))
    from megabd3.config.load import load_config

    cfg = load_config(args.config, args.set)
    from megabd3.training.launch import prepare_environment

    prepare_environment()
    from megabd3.training.run import run_training

    run_training(cfg)


if __name__ == "__main__":
    main()
