"""The reproduction suite end to end: tools/reproduce.py at the smoke scale through the real launchers.

* ``run --scale smoke --tables all`` trains, evaluates, samples and judges every cell kind (AR, MDLM,
  SEDD, BD3-LM at every L', every schedule incl. Gaussian and bimodal, every weighting, clip search,
  fine-tunes, zero-shot, variable-length sampling, Gen PPL with a tiny judge); the report fills all 13
  tables and the only failed cells are the ones with no offline data (LAMBADA).
* kill -9 midway, rerun: finished stages are not redone, the interrupted one is run again (training
  resumes from its last checkpoint: the smoke profile checkpoints every step), and the suite completes.
* --slurm submits one job per pending stage with afterok dependencies.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def reproduce(*args, timeout=900, **kw):
    cmd = [sys.executable, str(ROOT / "tools" / "reproduce.py"), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)


def stage_records(root: Path) -> dict:
    out = {}
    for f in sorted((root / "stages").glob("*/stage.json")):
        out[f.parent.name] = json.loads(f.read_text())
    return out


def test_smoke_suite_all_tables(tmp_path):
    root, report = tmp_path / "suite", tmp_path / "report"
    proc = reproduce("run", "--scale", "smoke", "--tables", "all", "--root", root, "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = stage_records(root)
    failed = {k: r for k, r in recs.items() if r["status"] != "done"}
    assert all("LAMBADA" in r["reason"] for r in failed.values()), {k: r["reason"] for k, r in failed.items()}
    titles = " ".join(r["title"] for r in recs.values() if r["status"] == "done")
    for kind in ["/ar/", "/mdlm/", "/sedd/", "bd3lm_bs1_tuned", "bd3lm_bs4_", "bd3lm_bs8_", "bd3lm_bs16_",
                 "bd3lm_bs128_", "gaussian_mu", "bimodal_mu", "+clip_search", "/finetune/", "zeroshot lm1b",
                 "sample varlen", "sample fixed"] + [f"weighting_{w}" for w in ("edm", "iddpm", "sigmoid", "fm", "simple")]:
        assert kind in titles, kind
    judged = [r for r in recs.values() if r["kind"] == "sample" and r["status"] == "done" and r["spec"]["genppl"]]
    assert judged and all(r["result"]["gen_ppl"] > 0 for r in judged)
    searched = [r for r in recs.values() if r["kind"] == "train" and "+clip_search" in r["title"]]
    assert searched and searched[0]["status"] == "done"
    proc = reproduce("report", "--scale", "smoke", "--root", root, "--out", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (report / "README.md").read_text()
    for n in range(1, 14):
        assert f"## Table {n}:" in text
    assert "failed: not run yet" not in text
    assert text.count("failed:") == text.count("failed: no offline LAMBADA") == 4  # 4 models x LAMBADA
    assert (report / "results.csv").is_file() and (report / "ppl_vs_block.png").is_file()
    # rerunning a finished suite does nothing
    again = reproduce("run", "--scale", "smoke", "--tables", "all", "--root", root, timeout=300)
    assert f"{len(recs)} stages: {len(recs) - len(failed)} already done" in again.stdout


def test_kill_midway_then_rerun_skips_finished_stages(tmp_path):
    root = tmp_path / "suite"
    cmd = [sys.executable, str(ROOT / "tools" / "reproduce.py"), "run", "--scale", "smoke", "--tables", "3",
           "--root", str(root), "--jobs", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            done = [k for k, r in stage_records(root).items() if r["status"] == "done"] if (root / "stages").exists() else []
            if len(done) >= 4:
                break
            time.sleep(0.5)
        assert len(done) >= 4, "the suite made no progress"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = stage_records(root)
    finished = {k: r for k, r in before.items() if r["status"] == "done"}
    interrupted = [k for k, r in before.items() if r["status"] == "running"]
    proc2 = reproduce("run", "--scale", "smoke", "--tables", "3", "--root", root, "--jobs", "1", timeout=600)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    after = stage_records(root)
    assert all(r["status"] == "done" for r in after.values()), {k: r.get("reason") for k, r in after.items()}
    for k, r in finished.items():
        assert after[k] == r, f"finished stage {k} was redone"
    for k in interrupted:  # the stage the kill hit was run again (a training stage resumes from its checkpoint)
        assert after[k]["status"] == "done"
    assert f"{len(finished)} already done" in proc2.stdout or f"{len(finished) + 1} already done" in proc2.stdout


def test_slurm_submission_chains_afterok(tmp_path):
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "sbatch"
    fake.write_text(f"""#!/bin/bash
n=$(( $(wc -l < {log} 2>/dev/null || echo 0) + 100 ))
echo "$@" >> {log}
echo "$n;cluster"
""")
    fake.chmod(0o755)
    proc = reproduce("run", "--scale", "smoke", "--tables", "3", "--root", tmp_path / "suite", "--slurm",
                     "--sbatch", fake, "--sbatch-option=--partition=cpu", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = log.read_text().splitlines()
    plan = reproduce("plan", "--scale", "smoke", "--tables", "3", "--root", tmp_path / "suite", timeout=120)
    keys = [ln.split()[0] for ln in plan.stdout.splitlines() if ln.split() and "-" in ln.split()[0]]
    assert len(calls) == len(keys)
    ids = {k: str(100 + i) for i, k in enumerate(keys)}
    for k, call in zip(keys, calls):
        script = Path(call.split()[-1])
        assert script.parent.name == k and script.is_file()
        body = script.read_text()
        assert "#SBATCH --partition=cpu" in body and f"--stage {k}" in body
        deps = _deps(tmp_path / "suite", k)
        dep_arg = [a for a in call.split() if a.startswith("--dependency=afterok:")]
        if deps:
            assert len(dep_arg) == 1 and set(dep_arg[0].split(":")[1:]) == {ids[d] for d in deps}
        else:
            assert not dep_arg


def _deps(root: Path, key: str):
    from megabd3.experiments.profiles import get_profile
    from megabd3.experiments.stages import build_graph
    from megabd3.experiments.tables import build_tables

    g = build_graph(build_tables([3]), get_profile("smoke"), root.resolve())
    return g.stages[key].deps
