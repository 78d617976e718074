"""Categorical sampling in float64 with Gumbel-max, as the reference (spec section 5.1, paper C.5).

``argmax(p / E)`` with ``E = -log(U + 1e-10) + 1e-10`` is Gumbel-max on ``log p`` (``-log E`` is a
Gumbel variable). Doing it in float64 matters: in float32 the low-probability tail is truncated and
the effective temperature drops (Zheng et al.). ``p`` may be unnormalised (SEDD's analytic update).
"""
from __future__ import annotations

from typing import Optional

import torch


def uniform64(shape: tuple, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Float64 uniforms from ``generator`` (drawn on the generator's device, then moved)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def gumbel_argmax(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of ``probs[..., V]`` (non-negative, any scale) -> LongTensor[...]."""
    probs = probs.to(torch.float64)
    u = uniform64(tuple(probs.shape), generator, probs.device)
    # e = -log(u + 1e-10) + 1e-10, in place on the fresh uniforms (same operations, fewer passes over V)
    e = u.add_(1e-10).log_().neg_().add_(1e-10)
    return torch.div(probs, e, out=e).argmax(dim=-1)


def uniform_choice(valid: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """For each row of the bool matrix ``valid[b, n]`` pick one True column uniformly -> LongTensor[b].

    Rows with no True column return 0 (callers only ask when at least one is valid).
    """
    u = uniform64((valid.shape[0],), generator, valid.device)
    counts = valid.sum(-1)
    k = torch.clamp((u * counts).floor().long(), max=torch.clamp(counts - 1, min=0))
    # index of the k-th True column: first column whose running count exceeds k
    running = valid.long().cumsum(-1)
    return (running > k[:, None]).long().argmax(-1)
