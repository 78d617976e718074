"""Vocabulary-dimension operations that also work on tensor-parallel vocab shards.

With megatron's ``parallel_state`` initialised and TP > 1, the model returns logits [..., V/TP]: this
rank holds ids [rank * V_local, (rank + 1) * V_local). Cross-entropy then uses megatron's
``vocab_parallel_cross_entropy`` (all-reduces of max, target logit and sum-exp), log-sum-exp
all-reduces, and per-token logit edits touch only the owning shard. With TP = 1 (or megatron never
imported) everything is plain torch. megatron is looked up in ``sys.modules`` rather than imported,
so single-process users never pay its import time.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _tp_state():
    """megatron's parallel_state when TP > 1 is initialised, else None."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None
    return ps


def shard_range(local_vocab: int) -> Tuple[int, int]:
    """[start, end) of the global vocab ids held by this rank's logits."""
    ps = _tp_state()
    if ps is None:
        return 0, local_vocab
    rank = ps.get_tensor_model_parallel_rank()
    return rank * local_vocab, (rank + 1) * local_vocab


def global_vocab_size(logits: torch.Tensor) -> int:
    ps = _tp_state()
    world = 1 if ps is None else ps.get_tensor_model_parallel_world_size()
    return logits.shape[-1] * world


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-position CE [...] (float32) of logits [..., V_local] against global ids target [...]."""
    ps = _tp_state()
    if ps is None:
        return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's kernel works on [s, b, V] or any leading shape. It overwrites its input in place
    # (subtracts the max, exponentiates, normalises: the buffer ends as the softmax), and its own
    # ``.float()`` is a no-op on float32 input — so hand it a private float32 copy, never the caller's
    # logits (which the caller, or another op's backward, may still read).
    return vocab_parallel_cross_entropy(
        logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True), target.contiguous()
    )


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Every rank receives the same upstream gradient of the total; d total / d local = 1.
        return grad, None


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(logits_v) over the full (all shards) vocabulary, [...]; differentiable."""
    ps = _tp_state()
    logits = logits.float()
    if ps is None:
        return torch.logsumexp(logits, dim=-1)
    group = ps.get_tensor_model_parallel_group()
    m = logits.detach().max(dim=-1).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    # A row that is -inf everywhere on every shard stays -inf; keep the subtraction finite.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    local = torch.exp(logits - m[..., None]).sum(-1)
    return torch.log(_AllReduceSumIdentityGrad.apply(local, group)) + m


def gather_logit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits[..., target] with global ids, summed over shards (zero from non-owning ranks)."""
    ps = _tp_state()
    if ps is None:
        return logits.float().gather(-1, target[..., None]).squeeze(-1)
    start, end = shard_range(logits.shape[-1])
    owned = (target >= start) & (target < end)
    local_idx = torch.where(owned, target - start, torch.zeros_like(target))
    picked = logits.float().gather(-1, local_idx[..., None]).squeeze(-1)
    # where(), not ``* owned``: a non-owning rank reads its local id 0, which may be -inf (padded
    # vocab rows or the SUBS mask) and -inf * 0 is NaN.
    picked = torch.where(owned, picked, torch.zeros_like(picked))
    return _AllReduceSumIdentityGrad.apply(picked, ps.get_tensor_model_parallel_group())


def log_softmax_full(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-softmax [..., V] (shards gathered along the vocab dimension)."""
    ps = _tp_state()
    if ps is None:
        return torch.log_softmax(logits.float(), dim=-1)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return torch.log_softmax(gather_from_tensor_model_parallel_region(logits.float()), dim=-1)


def set_token_logit(logits: torch.Tensor, token_id: int, value: float) -> torch.Tensor:
    """A copy of logits with global id ``token_id`` set to ``value`` (only on the owning shard)."""
    start, end = shard_range(logits.shape[-1])
    if not start <= token_id < end:
        return logits
    out = logits.clone()
    out[..., token_id - start] = value
    return out


def suppress_from(logits: torch.Tensor, first_id: int, value: float = float("-inf")) -> torch.Tensor:
    """Set every global id >= first_id (padded vocab rows) to ``value``."""
    start, end = shard_range(logits.shape[-1])
    if first_id >= end:
        return logits
    out = logits.clone()
    out[..., max(first_id - start, 0):] = value
    return out


def masked_fill_ids(logits: torch.Tensor, ids: Optional[torch.Tensor], value: float) -> torch.Tensor:
    """Set logits[..., ids[...]] = value per position (ids global, [...]); used by SEDD's x_t entry."""
    if ids is None:
        return logits
    start, end = shard_range(logits.shape[-1])
    owned = (ids >= start) & (ids < end)
    local_idx = torch.where(owned, ids - start, torch.zeros_like(ids))
    current = logits.gather(-1, local_idx[..., None])
    new = torch.where(owned[..., None], torch.full_like(current, value), current)
    return logits.scatter(-1, local_idx[..., None], new)
