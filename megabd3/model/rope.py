"""Rotary embeddings with explicit positions (both BD3 halves use 0..L-1, DESIGN.md invariant 2).

megatron's ``apply_rotary_pos_emb`` takes angles ``freqs`` of shape [S, b|1, 1, head_dim] laid out as
``cat(f, f)`` (non-interleaved rotate-half, as the reference backbone) and computes cos/sin itself.
"""
from __future__ import annotations

import math

import torch

# Above this position fp32 angles lose too much precision (pos * inv_freq rounds by ~pos * 6e-8 rad);
# the sampler's sliding-window KV cache can go far beyond the training length. Such angles are reduced
# modulo 2*pi in float64 before the cast, which keeps every fp32 angle within ~3e-7 rad of the exact
# one (positions below keep their plain fp32 angles, as before).
_FP64_POSITIONS = 1 << 14
_TWO_PI = 2.0 * math.pi


def inv_freq(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """1 / base^(2i/d), i < d/2, in float64."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))


def _shared_row(pos: torch.Tensor) -> bool:
    """Whether all rows of ``pos`` [b, S] are equal, decided without a device sync: an expanded
    tensor (stride 0 over the batch, as every caller builds them) says so by its layout; on CPU the
    values are compared too (no sync there). A False answer only costs the per-sample cos/sin."""
    if pos.shape[0] <= 1 or pos.stride(0) == 0:
        return True
    return pos.device.type == "cpu" and bool((pos == pos[:1]).all())


def rotary_freqs(position_ids: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles for ``position_ids`` [b, S] -> float32 [S, b, 1, head_dim] (or [S, 1, 1, head_dim] when
    all rows are equal, so cos/sin are computed once per position instead of per sample).

    No host sync (GPU step time): neither the rows-equal test nor the large-position handling reads
    tensor values on the host.
    """
    pos = position_ids[:1] if _shared_row(position_ids) else position_ids
    angles = pos.to(torch.float64).t()[..., None] * inv_freq(head_dim, base, pos.device)
    large = (pos.t() >= _FP64_POSITIONS)[..., None]
    angles = torch.where(large, torch.remainder(angles, _TWO_PI), angles)
    return torch.cat([angles, angles], dim=-1)[:, :, None, :].float()


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Reference rotate-half RoPE on x [S, b, h, d] (an independent implementation used by tests)."""
    cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
