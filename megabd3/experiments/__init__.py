"""The reproduction suite: the report's Tables 1-13 as data, a shared stage graph, a resumable runner, a report.

    tables.py    every table as a list of cells (row, column, metric, the run that produces it, and the
                 report's and the paper's numbers)
    profiles.py  scale profiles (paper / report / cpu / smoke): data, model, steps, sample counts
    prepare.py   the data stage of the cpu/smoke profiles (stand-in corpora, small BPE, unigram baselines)
    stages.py    cells -> a deduplicated stage graph keyed by the hash of each stage's resolved config
    runner.py    runs the graph locally (N at a time) or submits it to SLURM; idempotent and resumable
    report.py    docs/reproduction/<scale>/README.md, CSV, plots and the checked findings

Entry point: ``tools/reproduce.py run|report|plan``.
"""
