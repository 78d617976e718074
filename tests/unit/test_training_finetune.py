"""Fine-tuning with `training.init_from` (the paper's pretrain -> block-size fine-tune protocol), on the
real tiny BD3 model through the real launcher: pretrain 2 steps with block 16, fine-tune with block 4.

Checks: the weights are loaded (fine-tune step 1 runs at warm-up LR 0, so its checkpoint must hold the
pretrained weights exactly), the optimizer is fresh (AdamW step count 1 after one step, LR warm-up
restarts at 0), and the EMA is carried over: after one fine-tune step the EMA equals the hand-computed
update of the pretraining EMA with the continued decay (1+n)/(10+n), n = pretraining updates + 1.
"""
from __future__ import annotations

import pytest
import torch

from _training_run import make_dataset, ok, pretrain, tiny_config, train_records

pytestmark = pytest.mark.slow


def test_init_from_new_block_size(tmp_path):
    prefix = make_dataset(tmp_path / "data")
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    cfg = tiny_config(tmp_path / "c.json", prefix, pre, diffusion={"objective": "bd3lm", "block_size": 16},
                      training={"steps": 2, "ema": 0.999}, optim={"lr": 1e-2, "warmup_steps": 1})
    ok(pretrain(cfg))
    src = torch.load(pre / "checkpoints" / "step_00000002" / "model.pt", weights_only=False)
    assert src["ema_num_updates"] == 2
    ok(pretrain(cfg, "diffusion.block_size=4", f"training.init_from={pre}", f"training.run_dir={fine}",
                "optim.warmup_steps=4", "training.steps=2", "checkpoint.save_interval=1"))
    recs = train_records(fine)
    assert [r["lr"] for r in recs] == [0.0, 1e-2 / 4]  # warm-up restarted from 0
    step1 = fine / "checkpoints" / "step_00000001"
    got = torch.load(step1 / "model.pt", weights_only=False)
    for k, v in src["model"].items():
        assert torch.equal(got["model"][k], v), k  # loaded (and unchanged by the lr-0 first step)
    d = min(0.999, (1 + 3) / (10 + 3))  # the pretraining EMA continues: update number 3
    for k, e in src["ema"].items():
        want = e - (1 - d) * (e - src["model"][k])
        assert torch.allclose(got["ema"][k], want, rtol=1e-6, atol=1e-7), k
    assert got["ema_num_updates"] == 3
    opt = torch.load(next(step1.rglob("mp_rank_00_model_states.pt")), weights_only=False)["optimizer"]["state"]
    assert opt and all(int(s["step"]) == 1 for s in opt.values())  # fresh AdamW: one step taken
    state = torch.load(step1 / "megabd3_state.pt", weights_only=False)
    assert state["step"] == 1 and state["consumed_samples"] == 2  # a new run, not a resume of `pre`
    import json

    assert json.loads((step1 / "config.json").read_text())["diffusion"]["block_size"] == 4
