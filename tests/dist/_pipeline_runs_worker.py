"""Worker for tests/dist/test_pipeline_gpu_ready.py: several real training runs, one after another, in
one launch (the import/start-up cost of a rank is paid once; megabd3.parallel.init re-creates megatron's
groups when the layout changes).

Usage: [torchrun --nproc-per-node N] _pipeline_runs_worker.py <config.json> <runs.json>
runs.json: a list of lists of ``--set`` overrides, one list per run (each names its training.run_dir).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    from megabd3.config.load import load_config
    from megabd3.training.launch import prepare_environment

    prepare_environment()
    from megabd3.training.run import run_training

    config, runs = sys.argv[1], json.loads(open(sys.argv[2]).read())
    for overrides in runs:
        run_training(load_config(config, overrides))


if __name__ == "__main__":
    main()
