"""Tiny random megabd3 models for the HF export/import tests (single process, TP = PP = 1)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from megabd3.config.schema import Config
from megabd3.model.export import gather_full_state_dict, load_full_state_dict
from megabd3.model.transformer import build_model
from megabd3.parallel.init import init_distributed

V, L = 40, 16


def tiny_cfg(objective: str = "bd3lm", block: int = 4, **model: Any) -> Config:
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.cond_dim = 2, 32, 4, 16
    cfg.model.dropout, cfg.model.make_vocab_size_divisible_by = 0.0, 16
    cfg.model.attention_backend = "dense"
    cfg.data.seq_len = L
    cfg.diffusion.objective, cfg.diffusion.block_size = objective, block
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def random_model(objective: str = "bd3lm", block: int = 4, seed: int = 3, **model: Any
                 ) -> Tuple[Any, Dict[str, torch.Tensor], Config]:
    """A model with random (non-zero everywhere: adaLN and head too) weights, its full state dict, config."""
    cfg = tiny_cfg(objective, block, **model)
    init_distributed(cfg)
    m = build_model(cfg, V)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(t.shape, generator=g) * 0.3 for k, t in gather_full_state_dict(m).items()}
    load_full_state_dict(m, sd)
    return m.eval(), sd, cfg
