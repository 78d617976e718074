"""Learning-rate schedules: linear warm-up, then constant or cosine (registry `LR_SCHEDULES`).

The factor multiplies `optim.lr`. Warm-up follows `transformers.get_*_schedule_with_warmup` (the
reference): factor = step / warmup for step < warmup, so the very first optimizer step runs at lr 0.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from megabd3.errors import UserError


def constant_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then 1."""
    if warmup > 0 and step < warmup:
        return step / warmup
    return 1.0


def cosine_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then a half cosine from 1 down to `min_ratio` at `total` steps (held after)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


LR_SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "constant": constant_factor,
    "cosine": cosine_factor,
}


class LRFactor:
    """Picklable callable for `LambdaLR` (a plain object, so its state round-trips in checkpoints)."""

    def __init__(self, schedule: str, warmup: int, total: int, lr: float, min_lr: float) -> None:
        if schedule not in LR_SCHEDULES:
            raise UserError(f"optim.schedule={schedule!r} is unknown; expected one of {sorted(LR_SCHEDULES)}")
        self.schedule, self.warmup, self.total = schedule, int(warmup), int(total)
        self.min_ratio = (min_lr / lr) if lr > 0 else 0.0

    def __call__(self, step: int) -> float:
        return LR_SCHEDULES[self.schedule](step, self.warmup, self.total, self.min_ratio)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:  # type: ignore[no-untyped-def]
    """A LambdaLR over the optimizer built from `OptimConfig` (stepped once per optimizer step)."""
    factor = LRFactor(optim_cfg.schedule, optim_cfg.warmup_steps, total_steps, optim_cfg.lr, optim_cfg.min_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
