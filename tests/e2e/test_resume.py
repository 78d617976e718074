"""Exact resume (invariant 7) and crash-safe checkpoint commits, with the real Trainer/engine/checkpoint
code on a tiny torch model (dropout + random noise, EMA, LR warm-up, clipping).

* kill -9 between checkpoints, restart: the per-step losses and grad norms after the checkpoint equal
  the uninterrupted run bit for bit (compared as exact floats).
* kill -9 while a checkpoint is being written: `latest` still names the previous checkpoint, the partial
  directory is ignored and removed, and resuming from it reproduces the uninterrupted run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("resume_tiny_worker.py")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]


def run(args, world=1, expect_kill=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    if world == 1:
        cmd = [sys.executable, str(WORKER), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(29700 + os.getpid() % 200), str(WORKER), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if expect_kill:
        assert proc.returncode != 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = (rec["loss"], rec["grad_norm"])  # a re-done step overwrites the killed run's
    return out


@pytest.mark.parametrize("zero,world", [(0, 1), (3, 2)])
def test_kill_between_checkpoints_resumes_bit_exact(tmp_path, zero, world):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run([ref, 8, 3, zero], world)
    run([cut, 8, 3, zero, 5], world, expect_kill=True)  # dies after step 5; last checkpoint is step 3
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    run([cut, 8, 3, zero], world)
    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # exact float equality for every step, including the re-done steps 4..8


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run([ref, 8, 3, 0])
    run([cut, 8, 3, 0, -1, 6], expect_kill=True)  # dies while writing step 6 (engine files already there)
    ck = cut / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert (ck / ".tmp_step_00000006").is_dir() and not (ck / "step_00000006").exists()
    from megabd3.training import checkpoint as ckpt

    assert ckpt.read_latest(cut) == ck / "step_00000003"
    assert ckpt.load_global_state(ck / "step_00000003").step == 3
    run([cut, 8, 3, 0])
    assert not (ck / ".tmp_step_00000006").exists()  # partial save cleaned up at start
    assert losses(ref) == losses(cut)
    assert (ck / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000006", "step_00000008"]  # keep_last_n=2
