"""Unit tests of the training building blocks, each against an independent hand computation:
LR schedules, EMA with the (1+n)/(10+n) warm-up, RNG capture/restore, checkpoint commit atomicity and
keep_last_n, JSONL metrics, the stop-signal flag and the skip-step optimizer guard."""
from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megabd3.errors import UserError
from megabd3.training import checkpoint as ckpt
from megabd3.training.ema import EMA
from megabd3.training.engine import skip_optimizer_step
from megabd3.training.lr import LRFactor, build_lr_scheduler
from megabd3.training.rng import capture_rng_state, micro_batch_seed, restore_rng_state
from megabd3.training.signals import StopRequest


# ------------------------------------------------------------------------------------------------ LR
def test_constant_warmup_hand_values():
    f = LRFactor("constant", warmup=4, total=100, lr=1e-3, min_lr=0.0)
    assert [f(s) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_hand_values():
    # warm-up 2, total 10, min_lr/lr = 0.1: after warm-up factor = 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2
    f = LRFactor("cosine", warmup=2, total=10, lr=1.0, min_lr=0.1)
    assert f(0) == 0.0 and f(1) == 0.5
    assert f(2) == pytest.approx(1.0)
    assert f(4) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)  # cos(pi/4)
    assert f(6) == pytest.approx(0.55)  # cos(pi/2) = 0
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)  # held at min_lr after the end


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_lr_scheduler(opt, SimpleNamespace(schedule="constant", warmup_steps=4, lr=2.0, min_lr=0.0), 10)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_unknown_schedule_is_user_error():
    with pytest.raises(UserError, match="optim.schedule"):
        LRFactor("linear", 1, 2, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_matches_hand_computation_with_warmup():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    ema = EMA([p], decay=0.9)
    shadow = [float(v) for v in p.detach()]
    for n in range(1, 101):
        with torch.no_grad():
            p.add_(torch.randn(3))
        ema.update()
        d = min(0.9, (1.0 + n) / (10.0 + n))  # (1+n)/(10+n) warm-up reaches 0.9 at n = 80
        shadow = [s - (1 - d) * (s - float(v)) for s, v in zip(shadow, p.detach())]
    assert ema.num_updates == 100
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(80) == 0.9 and ema.decay_at(81) == 0.9
    assert ema.shadow[0].tolist() == pytest.approx(shadow, rel=1e-5, abs=1e-6)


def test_ema_applied_swaps_and_restores_bit_exact():
    p = torch.nn.Parameter(torch.arange(4.0))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.mul_(3.0)
    ema.update()
    live = p.detach().clone()
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow[0])
        assert not torch.equal(p.detach(), live)
    assert torch.equal(p.detach(), live)
    state = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(4))], decay=0.1)
    other.load_state_dict(state)
    assert other.num_updates == 1 and other.decay == 0.5 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError):
        EMA([torch.nn.Parameter(torch.zeros(5))], 0.1).load_state_dict(state)


# ----------------------------------------------------------------------------------------------- RNG
def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()
    state = capture_rng_state()
    first = _draw()
    _draw()  # move every generator on
    restore_rng_state(state)
    assert _draw() == first


def test_micro_batch_seed_depends_on_inputs_only():
    assert micro_batch_seed(1, 8) == micro_batch_seed(1, 8)
    assert len({micro_batch_seed(1, 8), micro_batch_seed(1, 9), micro_batch_seed(2, 8),
                micro_batch_seed(1, 8, "dropout")}) == 4
    assert 0 <= micro_batch_seed(123, 10**12) < 2**63


# ---------------------------------------------------------------------------------------- checkpoints
class FakeEngine:
    """Stands in for DeepSpeed's engine: writes one 'engine file' per save into the tag directory."""

    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), **client_state}, d / "mp_rank_00_model_states.pt")


def _save(run_dir, step, keep=2, engine=None):
    module = torch.nn.Linear(2, 2)
    engine = engine or FakeEngine(module)
    return ckpt.save_checkpoint(engine, EMA(list(module.parameters()), 0.9), ckpt.TrainState(step=step, consumed_samples=4 * step),
                                {"rng": capture_rng_state()}, run_dir, keep,
                                lambda d: (Path(d) / ckpt.CONFIG_FILE).write_text("{}"), module=module)


def test_checkpoint_commit_and_keep_last_n(tmp_path):
    for step in (1, 2, 3):
        path = _save(tmp_path, step)
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert not list(ck.glob(".tmp_*"))
    assert ckpt.read_latest(tmp_path) == ck / "step_00000003"
    assert ckpt.load_global_state(ck / "step_00000003").consumed_samples == 12
    files = {p.name for p in (ck / "step_00000003").iterdir()}
    assert {ckpt.GLOBAL_STATE, ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.rank_state_name(0)} <= files
    assert ckpt.resolve_checkpoint(tmp_path) == ck / "step_00000003"


def test_checkpoint_crash_mid_write_keeps_previous_latest(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = ckpt.atomic_torch_save

    def crash_on_model_file(obj, path):
        if Path(path).name == ckpt.MODEL_FILE:
            raise KeyboardInterrupt("simulated crash while writing model.pt")
        return real(obj, path)

    monkeypatch.setattr(ckpt, "atomic_torch_save", crash_on_model_file)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000001"  # latest only moves after completion
    assert (ck / ".tmp_step_00000002").is_dir() and not (ck / "step_00000002").exists()
    assert ckpt.read_latest(tmp_path) == ck / "step_00000001"
    assert ckpt.list_step_dirs(ck) == [ck / "step_00000001"]
    assert ckpt.remove_partial(ck) == [ck / ".tmp_step_00000002"] and not (ck / ".tmp_step_00000002").exists()


def test_latest_naming_missing_dir_is_user_error(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "latest").write_text("step_00000009\n")
    with pytest.raises(UserError, match="step_00000009"):
        ckpt.read_latest(tmp_path)


# ------------------------------------------------------------------------------------------- logging
def test_run_logger_writes_jsonl_lines(tmp_path, capsys):
    from megabd3.config.schema import Config
    from megabd3.training.logging import RunLogger, format_line, read_metrics

    cfg = Config()
    cfg.logging.wandb_mode, cfg.logging.progress_bar = "disabled", False
    rec = dict(step=1, loss=2.5, nelbo=2.25, grad_norm=0.5, lr=1e-4, tokens_per_s=1000.0, tokens_per_s_per_rank=500.0,
               flops_per_s_per_rank=None, mfu=None, peak_mem_gib=0.1, consumed_tokens=64, consumed_samples=2, skipped=False)
    logger = RunLogger(cfg, tmp_path, rank=0, start_step=0, total_steps=10)
    logger.train_step(rec, print_line=True)
    logger.train_step(dict(rec, step=2), print_line=False)  # not a log step: no JSONL line
    logger.record("eval", {"step": 2, "nelbo": 3.0})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["kind"] == "train" and first["step"] == 1 and first["loss"] == 2.5 and first["skipped"] is False
    assert json.loads(lines[1]) | {"time": 0} == {"kind": "eval", "step": 2, "nelbo": 3.0, "time": 0}
    assert [r["kind"] for r in read_metrics(tmp_path)] == ["train", "eval"]
    out = capsys.readouterr().out
    assert format_line(rec, 10) in out and "step  1/10 | loss 2.5000 | nelbo 2.2500" in out
    silent = RunLogger(cfg, tmp_path / "other", rank=1, start_step=0, total_steps=10)
    silent.train_step(rec, print_line=True)
    assert not (tmp_path / "other").exists()  # non-zero ranks write nothing


# ------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_request_sets_flag(sig):
    before = signal.getsignal(sig)
    stop = StopRequest()
    assert stop.requested is None
    os.kill(os.getpid(), sig)
    assert stop.requested == signal.Signals(sig).name
    stop.uninstall()
    assert signal.getsignal(sig) == before


# ------------------------------------------------------------------------------------------ skip step
def test_skip_optimizer_step_leaves_weights_and_state_untouched():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before_p, before_state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((3,), 5.0)
    with skip_optimizer_step(opt):
        opt.step()
    assert torch.equal(p.detach(), before_p)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before_state.items())
    opt.step()  # restored: the next step updates again
    assert not torch.equal(p.detach(), before_p)
