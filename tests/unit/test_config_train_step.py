"""Every committed experiment config builds its objective and takes one real training step.

test_config_files.py checks fields; this runs each of configs/experiments/**.json end to end in
process (no DeepSpeed): load the file with only the model shrunk (hidden 32, 2 heads, 1 layer) and the
sequence length cut to max(16, block size), build the real megatron-core model and the objective the
file names (noise schedule, clip interval, resampling, weighting, BOS handling as committed), run
objective(train=True) on random tokens, backward and one AdamW step. A config whose loss is
identically zero (e.g. resampling a 1-token block to a fraction <= 0.5), non-finite, or that raises,
fails here with its file name.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megabd3.config import Config, effective_block_size, load_config
from megabd3.diffusion.objectives import build_objective
from megabd3.model.export import gather_full_state_dict, load_full_state_dict
from megabd3.model.transformer import build_model
from megabd3.parallel.init import init_distributed

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").rglob("*.json"))
V = 40  # toy vocabulary: tokens 0..38, mask 39
MASK = V - 1
BATCH = 4
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=1", "model.cond_dim=16",
        "model.make_vocab_size_divisible_by=8", "parallel.precision=fp32"]


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


_INITIAL: dict = {}


def _model(cfg: Config) -> torch.nn.Module:
    """A fresh model of cfg's architecture; initial weights are built once per architecture and copied."""
    key = (cfg.model.adaln, cfg.model.time_conditioning)
    if key not in _INITIAL:
        torch.manual_seed(0)
        _INITIAL[key] = gather_full_state_dict(build_model(cfg, V))
    model = build_model(cfg, V)
    load_full_state_dict(model, _INITIAL[key])
    return model.train()


def test_there_are_all_experiments() -> None:
    assert len(EXPERIMENTS) == 162


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(ROOT / "configs" / "experiments")) for p in EXPERIMENTS])
def test_experiment_config_takes_a_real_training_step(path: Path) -> None:
    committed = load_config(path, cuda=False)
    seq_len = max(16, effective_block_size(committed)) if committed.diffusion.objective == "bd3lm" else 16
    cfg = load_config(path, TINY + [f"data.seq_len={seq_len}"], cuda=False)
    objective = build_objective(cfg, MASK, V)
    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.randint(0, MASK, (BATCH, seq_len), generator=torch.Generator().manual_seed(1))
    out = objective(model, x0, torch.Generator().manual_seed(2), train=True)
    loss = out.loss
    assert bool(torch.isfinite(loss)) and float(loss) > 0, f"{path.name}: loss {float(loss)}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads), path.name
    assert any(bool((g != 0).any()) for g in grads), f"{path.name}: every gradient is zero"
    before = model.output_layer.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.output_layer.weight), f"{path.name}: the optimizer step changed nothing"
