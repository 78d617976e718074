"""Run a stage graph: locally (N stages at a time in long-lived worker processes) or as SLURM jobs.

Local runs keep ``jobs`` spawned worker processes; each imports torch/megatron/DeepSpeed once and runs
stages in-process through the launchers' ``main`` (start-up would otherwise cost ~10 s per stage, more
than a whole fine-tune at the cpu scale). The runner itself never imports torch, so a crashing stage
cannot take it down; a stage that fails (or whose dependency failed) is recorded with its one-line
reason and every independent stage still runs. Finished stages are skipped, so rerunning the same
command after a kill finishes the suite without redoing anything (``stage.json`` is written
atomically, after the stage's outputs).

SLURM (``--slurm``): one ``sbatch`` job per pending stage, running ``tools/reproduce.py exec``, chained
with ``--dependency=afterok:<ids of its dependencies>``.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from megabd3.errors import UserError
from megabd3.experiments.execute import status_of
from megabd3.experiments.stages import Graph, Stage

REPO = Path(__file__).resolve().parents[2]


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


def _run_in_worker(stage: dict, root: str, threads: int) -> dict:
    from megabd3.experiments.execute import execute

    return execute(stage, root, threads)


class Display:
    """One status line per change (tty: redrawn in place) with done/failed/running counts and the ETA."""

    def __init__(self, total: int, out: TextIO = sys.stdout) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.t0 = time.time()
        self.durations: Dict[str, List[float]] = {}
        self.last = 0.0

    def eta(self, pending: List[Stage], running: Dict[str, Stage], jobs: int) -> str:
        allk = [d for v in self.durations.values() for d in v]
        fallback = sum(allk) / len(allk) if allk else 60.0
        work = sum(self._mean(s.kind, fallback) for s in pending + list(running.values()))
        secs = work / max(jobs, 1)
        return f"{int(secs // 60)}m{int(secs % 60):02d}s" if allk else "?"

    def _mean(self, kind: str, fallback: float) -> float:
        v = self.durations.get(kind)
        return sum(v) / len(v) if v else fallback

    def show(self, done: int, failed: int, running: Dict[str, Stage], pending: List[Stage], jobs: int, root: Path,
             force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < (2 if self.tty else 30):
            return
        self.last = now
        parts = []
        for s in running.values():
            prog = _progress(s, root)
            parts.append(f"{s.kind} {s.spec.get('label', s.title)[:60]}{prog}")
        line = (f"[{done + failed}/{self.total}] done {done} failed {failed} | running: {'; '.join(parts) or '-'} | "
                f"elapsed {int(now - self.t0)}s | ETA {self.eta(pending, running, jobs)}")
        if self.tty:
            self.out.write("\r\033[K" + line[: os.get_terminal_size().columns - 1])
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def event(self, msg: str) -> None:
        self.out.write(("\r\033[K" if self.tty else "") + msg + "\n")
        self.out.flush()


def _progress(stage: Stage, root: Path) -> str:
    if stage.kind != "train":
        return ""
    f = stage.dir(root) / "run" / "metrics.jsonl"
    try:
        last = f.read_text().strip().splitlines()[-1]
        step = json.loads(last).get("step")
    except (OSError, IndexError, json.JSONDecodeError):
        return " (starting)"
    total = next((x.split("=")[1] for x in stage.spec.get("sets", []) if str(x).startswith("training.steps=")), "?")
    return f" ({step}/{total})"


def run_local(graph: Graph, jobs: int = 1, out: TextIO = sys.stdout, threads: int = 0) -> Dict[str, dict]:
    """Run every pending stage; returns key -> stage.json content."""
    root = graph.root
    order = graph.order()
    status = {s.key: status_of(s.dir(root)) for s in order}
    done = {k for k, v in status.items() if v.get("status") == "done"}
    failed: Dict[str, str] = {}
    pending = [s for s in order if s.key not in done]
    display = Display(len(order), out)
    display.event(f"{len(order)} stages: {len(done)} already done, {len(pending)} to run, {jobs} at a time (root {root})")
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    running: Dict[str, Stage] = {}
    futures: Dict[Future, Stage] = {}
    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)
    try:
        while pending or futures:
            progressed = False
            for s in list(pending):
                bad = [d for d in s.deps if d in failed]
                if bad:
                    reason = f"dependency {graph.stages[bad[0]].title} failed: {failed[bad[0]]}"
                    _write_skipped(s, root, reason)
                    failed[s.key] = reason
                    pending.remove(s)
                    display.event(f"skip  {s.title}: {reason}")
                    progressed = True
                elif all(d in done for d in s.deps) and len(futures) < jobs:
                    try:
                        futures[pool.submit(_run_in_worker, asdict(s), str(root), threads)] = s
                    except BrokenProcessPool:  # a worker died (OOM killer, segfault): start a fresh pool
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)
                        futures[pool.submit(_run_in_worker, asdict(s), str(root), threads)] = s
                    running[s.key] = s
                    pending.remove(s)
                    progressed = True
            if not futures:
                if not progressed and pending:
                    raise UserError(f"stage graph is stuck: {pending[0].title} waits for a stage that is not in the graph")
                continue
            finished, _ = wait(list(futures), timeout=2.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                s = futures.pop(fut)
                running.pop(s.key, None)
                try:
                    rec = fut.result()
                except Exception as exc:  # the worker process died (e.g. killed by the OOM killer)
                    rec = {"status": "failed", "reason": f"worker died: {type(exc).__name__}: {exc}"}
                    _write_skipped(s, root, rec["reason"])
                status[s.key] = rec
                display.durations.setdefault(s.kind, []).append(float(rec.get("wall_s", 0.0)))
                if rec.get("status") == "done":
                    done.add(s.key)
                    display.event(f"done  {s.title} ({rec.get('wall_s', 0):.0f}s)")
                else:
                    failed[s.key] = rec.get("reason", "failed")
                    display.event(f"FAIL  {s.title}: {failed[s.key]}")
            display.show(len(done), len(failed), running, pending, jobs, root)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    display.show(len(done), len(failed), running, pending, jobs, root, force=True)
    if display.tty:
        out.write("\n")
    return {s.key: status_of(s.dir(root)) for s in order}


def _write_skipped(stage: Stage, root: Path, reason: str) -> None:
    from megabd3.io import atomic_write_json

    d = stage.dir(root)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "stage.json", {"key": stage.key, "kind": stage.kind, "title": stage.title, "spec": stage.spec,
                                         "status": "failed", "reason": reason})


# ---- SLURM -----------------------------------------------------------------------------------------

SBATCH_HEADER = """#!/bin/bash
#SBATCH --job-name=bd3-{kind}
#SBATCH --output={dir}/slurm-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks=1
{extra}
set -euo pipefail
cd {repo}
"""


def run_slurm(graph: Graph, scale: str, tables: str, sbatch: str = "sbatch", extra: Optional[List[str]] = None,
              out: TextIO = sys.stdout, resubmit: bool = False) -> Dict[str, str]:
    """Submit one job per pending stage with afterok dependencies; returns stage key -> job id.

    ``tools/reproduce.py exec`` exits 0 once it has written the stage's record, failed or not, so a
    failed cell does not leave its dependents pending forever: they start, see the failed dependency
    and record that as their reason. A stage already submitted (``slurm_job`` marker, no record yet)
    is chained on instead of submitted again, unless ``resubmit``.
    """
    root = graph.root
    ids: Dict[str, str] = {}
    for s in graph.order():
        if status_of(s.dir(root)).get("status") == "done":
            continue
        d = s.dir(root)
        d.mkdir(parents=True, exist_ok=True)
        queued = d / "slurm_job"
        if queued.is_file() and status_of(d).get("status") == "pending" and not resubmit:
            ids[s.key] = queued.read_text().strip()  # still queued or running: chain on it, do not submit twice
            out.write(f"queued already as {ids[s.key]}: {s.title}\n")
            continue
        script = d / "job.sbatch"
        body = SBATCH_HEADER.format(kind=s.kind, dir=d, repo=REPO, extra="\n".join(f"#SBATCH {x}" for x in extra or []))
        body += (f"{sys.executable} tools/reproduce.py exec --scale {scale} --tables {tables} --root {root} "
                 f"--stage {s.key}\n")
        script.write_text(body)
        cmd = [sbatch, "--parsable"]
        deps = [ids[d_] for d_ in s.deps if d_ in ids]
        if deps:
            cmd.append("--dependency=afterok:" + ":".join(deps))
        cmd.append(str(script))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        ids[s.key] = proc.stdout.strip().split(";")[0]
        queued.write_text(ids[s.key] + "\n")
        out.write(f"submitted {ids[s.key]}: {s.title}\n")
    return ids
