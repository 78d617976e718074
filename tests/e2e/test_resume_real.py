"""Crash and preemption resume of the REAL BD3-LM through `launchers/pretrain.py` on 2 gloo ranks.

The layout is the demo's (configs/demo.json): DP = 2 with DeepSpeed ZeRO-3, fp32, EMA. The model is tiny
(hidden 64, 2 layers, 4 heads, L = 32, block 4, ~0.2 M parameters with a 320-entry BPE trained on the
test corpus) and has dropout 0.1, so exact resume needs every RNG restored, not only the per-sample
diffusion noise. 8 steps, a checkpoint every 2, evaluation (EMA weights) every 3 and at the end.

* kill -9 (the whole job: torchrun and every worker, as a node failure does) after step 5, i.e. between
  the checkpoints of steps 4 and 6; rerunning the same command resumes from step 4, and the losses, grad
  norms, LRs and evaluation NELBOs of steps 5..8 equal the uninterrupted run bit for bit.
* SIGTERM to the process group of a running 2-rank job (srun-style: one `python launchers/pretrain.py`
  per rank, which is how launchers/slurm/*.sbatch start it and what SLURM signals at preemption): both
  ranks save a checkpoint at the current step and exit 0; a rerun continues from it with the same numbers.
  (Under torchrun the workers do the same, but torchrun itself re-raises the signal and exits 1; that is
  torch's launcher, not ours.)

A gate (tests/e2e/resume_gated_pretrain.py) parks rank 0 right after it has logged a chosen step, so the
signal lands at a known point however slow the machine is; every wait below polls with a generous deadline.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _training_run import PRETRAIN, REPO, WORDS, env, free_port, make_dataset, ok, pretrain, tiny_config  # noqa: E402

from megabd3.training import checkpoint as ckpt  # noqa: E402
from megabd3.training.logging import read_metrics  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.dist,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the job's processes")]
GATED = Path(__file__).with_name("resume_gated_pretrain.py")
STEPS, SAVE_EVERY, EVAL_EVERY = 8, 2, 3
KILL_AFTER = 5  # latest checkpoint is step 4 then; steps 5.. are redone
TERM_AFTER = 3  # not a save_interval step: the checkpoint comes from the signal alone
DEADLINE = 300.0  # seconds for any one launch; a 2-core CI box needs ~15 s
WALL_CLOCK = {"kind", "time", "seconds"}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The config and the uninterrupted run's metrics (torchrun, the plain launcher)."""
    root = tmp_path_factory.mktemp("resume_real")
    from megabd3.data.train_tokenizer import train_bpe

    rnd = random.Random(1)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(40)) for _ in range(100)]
    tok = train_bpe(texts, root / "tok", vocab_size=320, name="bpe320-resume-test")
    prefix = make_dataset(root / "data", tokenizer=str(tok))
    cfg = tiny_config(root / "cfg.json", prefix, root / "ref",
                      model={"dropout": 0.1},
                      data={"tokenizer": str(tok)},
                      training={"steps": STEPS, "eval_interval": EVAL_EVERY},
                      parallel={"zero_stage": 3},
                      checkpoint={"save_interval": SAVE_EVERY, "keep_last_n": 2})
    ok(pretrain(cfg, world=2, timeout=DEADLINE))
    recs = read_metrics(root / "ref")
    assert sorted(train_rows(recs)) == list(range(1, STEPS + 1))
    assert sorted(eval_rows(recs)) == [3, 6, 8]
    assert_latest_complete(root / "ref", STEPS)
    return cfg, recs


# -------------------------------------------------------------------------------------------- helpers
def train_rows(recs: list[dict]) -> dict[int, tuple]:
    """step -> (loss, nelbo, grad_norm, lr); a later record of a step (a redone step) wins."""
    return {r["step"]: (r["loss"], r["nelbo"], r["grad_norm"], r["lr"]) for r in recs if r["kind"] == "train"}


def eval_rows(recs: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in WALL_CLOCK} for r in recs if r["kind"] == "eval"}


def assert_latest_complete(run_dir: Path, step: int) -> None:
    """`latest` names step `step`, whose directory holds every file of a complete save, and no partial
    `.tmp_*` directory is left."""
    ck = ckpt.checkpoints_dir(run_dir)
    assert (ck / ckpt.LATEST).read_text().strip() == ckpt.step_dirname(step)
    found = ckpt.read_latest(run_dir)
    assert found == ck / ckpt.step_dirname(step)
    assert ckpt.load_global_state(found).step == step
    for name in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.rank_state_name(0), ckpt.rank_state_name(1)):
        assert (found / name).is_file(), f"{found} lacks {name}"
    assert len(list(found.glob("*optim_states.pt"))) == 2, sorted(p.name for p in found.iterdir())  # ZeRO shards
    assert not [p.name for p in ck.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]


def launcher_args(cfg: Path, run_dir: Path) -> list[str]:
    return ["--config", str(cfg), "--set", f"training.run_dir={run_dir}"]


def logs(paths: list[Path]) -> str:
    return "\n".join(f"---- {p.name}\n{p.read_text()[-5000:]}" for p in paths if p.exists())


def wait_for_step(procs: list[subprocess.Popen], run_dir: Path, step: int, log_files: list[Path]) -> None:
    """Poll metrics.jsonl until rank 0 has logged `step` (it is then parked by the gate)."""
    deadline = time.monotonic() + DEADLINE
    while step not in train_rows(read_metrics(run_dir)):
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"the job ended before step {step}:\n{logs(log_files)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no step {step} after {DEADLINE} s:\n{logs(log_files)}")
        time.sleep(0.1)


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    return children


def job_pids(root: int) -> list[int]:
    """`root` and all its descendants (torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone would leave the workers training)."""
    children, out, todo = _ppid_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def sigkill_all(pids: list[int]) -> None:
    for pid in reversed(pids):  # workers first, so torchrun never sees a lone death and reacts
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill9_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process below it, then wait until all are gone."""
    pids = job_pids(proc.pid)
    assert len(pids) >= 3, f"expected torchrun + 2 workers, found {pids}"
    sigkill_all(pids)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes survived SIGKILL: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def start_srun_style(cfg: Path, run_dir: Path, script: Path, log_dir: Path, **extra_env: str) -> list[subprocess.Popen]:
    """Two ranks as srun starts them (SLURM_PROCID/NTASKS, no torchrun), in one process group."""
    port, procs = free_port(), []
    for rank in range(2):
        e = env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env)
        e.pop("LOCAL_WORLD_SIZE", None)
        pgid = procs[0].pid if procs else 0
        out = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), *launcher_args(cfg, run_dir)], env=e, cwd=REPO,
                                      stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda g=pgid: os.setpgid(0, g)))
        out.close()
    return procs


# ---------------------------------------------------------------------------------------------- tests
def test_kill9_whole_job_resumes_bit_exact(reference, tmp_path):
    cfg, ref_recs = reference
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(GATED), *launcher_args(cfg, run_dir)]
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, env=env(MEGABD3_TEST_GATE_STEP=str(KILL_AFTER)), cwd=REPO, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step([job], run_dir, KILL_AFTER, [log])
        kill9_job(job)
    finally:  # never leave a parked job behind, whatever failed above
        if job.poll() is None:
            sigkill_all(job_pids(job.pid))
    assert job.returncode != 0
    killed = read_metrics(run_dir)
    ref_train, ref_eval = train_rows(ref_recs), eval_rows(ref_recs)
    assert train_rows(killed) == {s: ref_train[s] for s in range(1, KILL_AFTER + 1)}
    assert_latest_complete(run_dir, 4)  # the step-5 weights were never saved

    proc = ok(pretrain(cfg, f"training.run_dir={run_dir}", world=2, timeout=DEADLINE))  # the same command, again
    assert f"{ckpt.step_dirname(4)}" in proc.stdout  # the banner names the checkpoint it resumed from
    resumed = read_metrics(run_dir)[len(killed):]
    assert sorted(r["step"] for r in resumed if r["kind"] == "train") == list(range(5, STEPS + 1))  # not from 0
    assert train_rows(resumed) == {s: ref_train[s] for s in range(5, STEPS + 1)}  # exact floats
    assert eval_rows(resumed) == {s: ref_eval[s] for s in (6, 8)}  # EMA weights resumed exactly too
    assert_latest_complete(run_dir, STEPS)


def test_sigterm_two_rank_job_saves_exits_0_and_resumes(reference, tmp_path):
    cfg, ref_recs = reference
    run_dir, release = tmp_path / "run", tmp_path / "release"
    (tmp_path / "term").mkdir()
    ranks = start_srun_style(cfg, run_dir, GATED, tmp_path / "term", MEGABD3_TEST_GATE_STEP=str(TERM_AFTER),
                             MEGABD3_TEST_GATE_RELEASE=str(release))
    rank_logs = [tmp_path / "term" / "rank0.log", tmp_path / "term" / "rank1.log"]
    try:
        wait_for_step(ranks, run_dir, TERM_AFTER, rank_logs)
        os.killpg(ranks[0].pid, signal.SIGTERM)  # every rank of the job, as SLURM does at preemption
        release.touch()  # rank 0 leaves the gate after its handler has run (see resume_gated_pretrain.py)
        codes = [p.wait(timeout=DEADLINE) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], logs(rank_logs)
    text = rank_logs[0].read_text()
    assert "received SIGTERM" in text and "exiting 0" in text, text[-3000:]
    stopped = read_metrics(run_dir)
    stop_step = max(train_rows(stopped))
    # the stop is agreed at the first step boundary after the signal: normally the parked step itself
    assert TERM_AFTER <= stop_step < STEPS
    ref_train, ref_eval = train_rows(ref_recs), eval_rows(ref_recs)
    assert train_rows(stopped) == {s: ref_train[s] for s in range(1, stop_step + 1)}
    assert_latest_complete(run_dir, stop_step)

    (tmp_path / "rerun").mkdir()
    reruns = start_srun_style(cfg, run_dir, PRETRAIN, tmp_path / "rerun")  # the same job, requeued
    rank_logs = [tmp_path / "rerun" / "rank0.log", tmp_path / "rerun" / "rank1.log"]
    try:
        codes = [p.wait(timeout=DEADLINE) for p in reruns]
    finally:
        for p in reruns:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], logs(rank_logs)
    resumed = read_metrics(run_dir)[len(stopped):]
    assert sorted(r["step"] for r in resumed if r["kind"] == "train") == list(range(stop_step + 1, STEPS + 1))
    assert train_rows(resumed) == {s: ref_train[s] for s in range(stop_step + 1, STEPS + 1)}
    assert eval_rows(resumed) == {s: v for s, v in ref_eval.items() if s > stop_step}
    assert_latest_complete(run_dir, STEPS)
