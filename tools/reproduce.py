#!/usr/bin/env python
"""Reproduce the reproduction report's Tables 1-13 end to end.

    python tools/reproduce.py plan   --scale cpu --tables all          # list the stage graph
    python tools/reproduce.py run    --scale cpu --tables all --jobs 2 # run it (resumable, idempotent)
    python tools/reproduce.py run    --scale report --tables 1,3,10 --slurm --sbatch-option=--gres=gpu:1
    python tools/reproduce.py report --scale cpu                       # docs/reproduction/cpu/README.md + CSV + plots

Scales: paper (the committed recipes), report (the report's step counts), cpu (2 cores, ~2 h, stand-in
data named as such), smoke (1-2 steps per stage, CI). Stage directories live under
``--root`` (default runs/reproduce/<scale>) and are keyed by the hash of each stage's resolved config:
a finished stage is skipped, an interrupted one resumes from its checkpoint, a failed cell is reported
with its reason and never stops the others.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.errors import UserError, cli_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report", "plan", "exec"])
    p.add_argument("--scale", default="cpu", help="paper | report | cpu | smoke")
    p.add_argument("--tables", default="all", help="'all' or a list such as 1,3,10 or 1-4")
    p.add_argument("--root", default="", help="stage directory root (default runs/reproduce/<scale>)")
    p.add_argument("--jobs", type=int, default=0, help="stages run at once (default: the profile's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per stage (default cores / jobs)")
    p.add_argument("--slurm", action="store_true", help="submit one sbatch job per stage with afterok dependencies")
    p.add_argument("--sbatch", default="sbatch", help="sbatch executable (tests use a stand-in)")
    p.add_argument("--stage", default="", help="exec: the stage key to run")
    p.add_argument("--resubmit", action="store_true", help="--slurm: submit stages that already have a queued job")
    p.add_argument("--out", default="", help="report: output directory (default docs/reproduction/<scale>)")
    p.add_argument("--sbatch-option", dest="extra", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH line, repeatable, e.g. --sbatch-option=--partition=gpu")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from megabd3.experiments.profiles import get_profile
    from megabd3.experiments.stages import build_graph
    from megabd3.experiments.tables import build_tables, parse_tables

    profile = get_profile(args.scale)
    numbers = parse_tables(args.tables)
    tables = build_tables(numbers)
    root = Path(args.root or REPO / "runs" / "reproduce" / args.scale).resolve()
    graph = build_graph(tables, profile, root)
    if args.command == "plan":
        from collections import Counter

        for s in graph.order():
            print(f"{s.key:22s} {s.title}")
        kinds = Counter(s.kind for s in graph.stages.values())
        print(f"{len(graph.stages)} stages: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
        for m, why in graph.errors.items():
            print(f"cannot build: {getattr(m.run, 'label', m)}: {why}")
        return 0
    if args.command == "exec":
        from dataclasses import asdict

        from megabd3.experiments.execute import execute

        if args.stage not in graph.stages:
            raise UserError(f"--stage {args.stage!r} is not in the graph of --scale {args.scale} --tables {args.tables}")
        rec = execute(asdict(graph.stages[args.stage]), str(root), args.threads)
        print(f"{rec['status']}: {rec.get('reason', '')}")
        # 0 once the record is written, failed or not: SLURM afterok dependents then run and record why
        return 0
    if args.command == "run":
        if args.slurm:
            from megabd3.experiments.runner import run_slurm

            run_slurm(graph, args.scale, args.tables, sbatch=args.sbatch, extra=args.extra, resubmit=args.resubmit)
            return 0
        from megabd3.experiments.runner import run_local

        results = run_local(graph, jobs=args.jobs or profile.executor_jobs, threads=args.threads)
        failed = sum(1 for r in results.values() if r.get("status") != "done")
        print(f"{len(results) - failed} stages done, {failed} failed; render with: "
              f"python tools/reproduce.py report --scale {args.scale}" + (f" --root {args.root}" if args.root else ""))
        # The suite itself succeeded even when some cells failed: they are reported with their reasons.
        return 0
    from megabd3.experiments.report import write_report

    out = Path(args.out or REPO / "docs" / "reproduction" / args.scale)
    path = write_report(tables, graph, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
