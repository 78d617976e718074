"""Rotary embeddings with explicit positions (both BD3 halves use 0..L-1, DESIGN.md invariant 2).

megatron's ``apply_rotary_pos_emb`` takes angles ``freqs`` of shape [S, b|1, 1, head_dim] laid out as
``cat(f, f)`` (non-interleaved rotate-half, as the reference backbone) and computes cos/sin itself.
"""
from __future__ import annotations

import torch

# Above this position fp32 angles lose too much precision (pos * inv_freq rounds by ~pos * 6e-8 rad);
# the sampler's sliding-window KV cache can go far beyond the training length.
_FP64_POSITIONS = 1 << 14


def inv_freq(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """1 / base^(2i/d), i < d/2, in float64."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))


def rotary_freqs(position_ids: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles for ``position_ids`` [b, S] -> [S, b, 1, head_dim] (or [S, 1, 1, head_dim] when all rows
    are equal, so cos/sin are computed once per position instead of per sample)."""
    pos = position_ids
    if pos.shape[0] > 1 and bool((pos == pos[:1]).all()):
        pos = pos[:1]
    angles = pos.to(torch.float64).t()[..., None] * inv_freq(head_dim, base, pos.device)
    emb = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    large = pos.numel() > 0 and int(pos.max()) >= _FP64_POSITIONS
    return emb if large else emb.float()


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Reference rotate-half RoPE on x [S, b, h, d] (an independent implementation used by tests)."""
    cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
