"""Nucleus (top-p) truncation of categorical distributions, two semantics (registry ``NUCLEUS``).

``reference`` is what bd3lms does (spec section 5.1): sort descending, keep tokens whose *inclusive*
cumulative probability is <= p, always keep the top one, renormalise. It drops the token that crosses
p, so it is stricter than the usual top-p. ``hf`` is the transformers ``TopPLogitsWarper`` rule: keep
the smallest prefix whose cumulative probability reaches p (a token is kept iff the mass *before* it
is < p).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch


def _truncate(probs: torch.Tensor, keep_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    keep_sorted[..., 0] = True  # the most likely token always survives
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    out = probs * keep
    return out / out.sum(-1, keepdim=True)


def nucleus_reference(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens while the inclusive cumulative probability is <= p (top-1 always kept)."""
    if p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) <= p
    return _truncate(probs, keep, order)


def nucleus_hf(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest most-likely set whose cumulative probability reaches p."""
    if p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    keep = before < p
    return _truncate(probs, keep, order)


NUCLEUS: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reference": nucleus_reference,
    "hf": nucleus_hf,
}


def get_nucleus(name: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    from megabd3.errors import UserError

    if name not in NUCLEUS:
        raise UserError(f"sampling.nucleus must be one of {sorted(NUCLEUS)}, found {name!r}")
    return NUCLEUS[name]
