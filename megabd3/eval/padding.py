"""Evaluation batches without their all-padding rows.

The eval loader pads the last micro-batch with rows whose attention mask is all False, so that every
data-parallel rank runs the same number of steps. Those rows add no tokens to any sum, but the
objective's antithetic strata cover the K x B (sequence, block) cells of the batch it is *given*: a
padded row would take strata away from the real rows (moving their t), and its zero per-block means
would enter Var. NELBO and the clip-search variance. So the objective only ever sees the real rows.

Rows that are only partly padded (``data.mode=pad``) are real sequences and are kept.
This module imports nothing from megabd3 so that megabd3.diffusion.clip_search may use it.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch


def real_rows(batch: Mapping[str, Any]) -> Dict[str, Any]:
    """``batch`` restricted to rows with at least one attended token (all rows when it has no mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return dict(batch)
    keep = mask.to(torch.bool).any(dim=1)
    if bool(keep.all()):
        return dict(batch)
    n = keep.shape[0]
    return {k: (v[keep] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v) for k, v in batch.items()}


def blocks_per_row(objective: Any, seq_len: int) -> int:
    """Number of per-block means the objective reports per sequence (the width of ``per_block_mean``)."""
    name = getattr(objective, "name", "")
    if name == "ar":
        return seq_len  # one "block" per token
    if name == "sedd":
        return 1
    return seq_len // objective.block_size(seq_len)


def block_means(
    objective: Any,
    model_fn: Any,
    batch: Mapping[str, Any],
    generator: Optional[torch.Generator],
    **call: Any,
) -> Tuple[Optional[Any], torch.Tensor]:
    """(objective output or None, per-block means [k, B]) on the real rows of ``batch``.

    ``call`` goes to the objective (``train=False``, ``interval=...``). With no real row the objective
    is not called (no draws consumed) and the means are an empty [0, B] float64 tensor, so that a rank
    whose whole batch is padding still joins the data-parallel gather of the variance.
    """
    rows = real_rows(batch)
    x0 = rows["input_ids"]
    if x0.shape[0] == 0:
        return None, torch.zeros((0, blocks_per_row(objective, x0.shape[1])), dtype=torch.float64, device=x0.device)
    out = objective(model_fn, x0, generator, attention_mask=rows.get("attention_mask"), **call)
    return out, out.per_block_mean
