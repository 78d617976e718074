"""Resume at another data-parallel size (PP = TP = 1), with the real launcher and BD3 model, ZeRO-3:

run A at DP = 1 for 4 steps (checkpoints at 2, 4) is the reference; the same run directory is then
rewound to step 2 and resumed at DP = 2 (DeepSpeed universal checkpoint for the ZeRO shards, the EMA
from model.pt). DP = 2 -> 1 takes the same code path (verified by hand: `rewind` to a DP = 2 checkpoint
and resume with one process; left out here to keep the suite's time).
The global batch stays 4 (training.global_batch_size; micro batch 2 x accumulation 2 at DP = 1,
x 1 at DP = 2) and the data position is the global consumed_samples, so the resumed steps see the
same samples with the same per-sample noise.

Tolerance: 1e-5 relative on losses and grad norms, LRs exact, final weights and EMA within 1e-5 --
fp32, only the gradient reduction order differs. Per-rank RNG streams cannot be carried bit-exactly
across a DP change (rank r restores old rank min(r, old world - 1)); this tiny model draws no noise
from them (dropout 0), so they do not show here.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _training_run import make_dataset, ok, pretrain, tiny_config  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def records(run_dir: Path, skip: int = 0) -> dict[int, tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r["kind"] == "train"][skip:]
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in recs}


def n_records(run_dir: Path) -> int:
    return sum(json.loads(line)["kind"] == "train" for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def rewind(run_dir: Path, step: int) -> None:
    """Point `latest` at step_<step> and drop the later checkpoints, as if the run had stopped there."""
    ck = run_dir / "checkpoints"
    for d in ck.glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (ck / "latest").write_text(f"step_{step:08d}\n")


def same_curve(got: dict, ref: dict, steps: range) -> None:
    for s in steps:
        (l0, g0, lr0), (l1, g1, lr1) = ref[s], got[s]
        assert l1 == pytest.approx(l0, rel=1e-5), s
        assert g1 == pytest.approx(g0, rel=1e-5), s
        assert lr1 == lr0, s


def close_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_dp1_checkpoint_at_dp2(tmp_path):
    prefix = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.json", prefix, run, training={"steps": 4, "global_batch_size": 4},
                      checkpoint={"save_interval": 2, "keep_last_n": 5}, parallel={"zero_stage": 3})
    ok(pretrain(cfg))  # A: DP = 1
    ref = records(run)
    assert sorted(ref) == list(range(1, 5))
    final_a = torch.load(run / "checkpoints" / "step_00000004" / "model.pt", weights_only=False)

    rewind(run, 2)
    skip = n_records(run)
    ok(pretrain(cfg, world=2))  # B: DP = 2 from A's step 2
    dp2 = records(run, skip)
    assert sorted(dp2) == [3, 4]
    same_curve(dp2, ref, range(3, 5))
    assert (run / "checkpoints" / "step_00000002" / "universal").is_dir()  # converted once, kept
    final_b = torch.load(run / "checkpoints" / "step_00000004" / "model.pt", weights_only=False)
    close_weights(final_b["model"], final_a["model"])  # fp32 master and Adam moments carried over
    close_weights(final_b["ema"], final_a["ema"])  # the EMA, re-partitioned from model.pt
    assert final_b["ema_num_updates"] == final_a["ema_num_updates"] == 4


def test_model_parallel_change_is_rejected():
    from megabd3.training.checkpoint import reshard_problem

    base = {"world_size": 2, "tp": 1, "pp": 1, "zero": 1, "global_batch": 8}
    assert reshard_problem(base, dict(base)) is None
    assert reshard_problem(base, dict(base, world_size=4)) is None
    assert reshard_problem({k: v for k, v in base.items() if k != "global_batch"}, dict(base, world_size=1)) is None
    assert "tp changed" in reshard_problem(base, dict(base, tp=2))
    assert "zero changed" in reshard_problem(base, dict(base, zero=3))
    assert "global batch" in reshard_problem(base, dict(base, world_size=4, global_batch=16))
    tp2 = dict(base, tp=2, world_size=2)
    assert "tensor/pipeline" in reshard_problem(tp2, dict(tp2, world_size=4))


def test_failed_universal_conversion_reaches_every_rank(tmp_path):
    """Rank 0's failed ds_to_universal conversion (a failing subprocess, then a KeyboardInterrupt) is
    broadcast: rank 1 raises a UserError naming the offline command instead of hanging in the
    broadcast; rank 0 raises too (the interrupt stays an interrupt), and no temp directory is left."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _launch import launch

    launch(Path(__file__).with_name("_universal_fail_worker.py"), 2, str(tmp_path), timeout=120)
    r0 = json.loads((tmp_path / "result.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for r in (r0, r1):
        assert r["subprocess"].startswith("UserError: ") and "boom: no zero shards" in r["subprocess"]
        assert "deepspeed.checkpoint.ds_to_universal" in r["subprocess"]  # the offline command
        assert r["tmp_left"] == []  # .tmp_universal removed
    assert r0["interrupt"] == "KeyboardInterrupt"
    assert r1["interrupt"].startswith("UserError: ") and "KeyboardInterrupt" in r1["interrupt"]
