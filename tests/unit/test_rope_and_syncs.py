"""RoPE angles without host syncs, and the GPU-side attention paths without host syncs.

A host sync reads tensor values on the host (``.item()``, ``bool(t)``, ``int(t.max())``). The meta
device has no values, so code that runs on meta tensors provably reads none: that is how these tests
check the code paths taken off CPU.
"""
from __future__ import annotations

import math

import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.model.attention import tiled_attention
from megabd3.model.rope import _FP64_POSITIONS, inv_freq, rotary_freqs


def _old_angles(pos: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The previous implementation's fp32 angles for small positions: fp64 product, then cast."""
    a = pos.to(torch.float64).t()[..., None] * inv_freq(head_dim, base)
    return torch.cat([a, a], -1)[:, :, None, :].float()


def test_expanded_positions_give_one_row_without_reading_values() -> None:
    b, L, d = 3, 8, 16
    pos = torch.arange(L, device="meta").repeat(2).expand(b, 2 * L)  # as every caller builds them
    out = rotary_freqs(pos, d)
    assert out.shape == (2 * L, 1, 1, d) and out.dtype == torch.float32


def test_distinct_rows_off_cpu_run_without_reading_values() -> None:
    pos = torch.empty(2, 16, dtype=torch.long, device="meta")  # a copy: the layout says nothing
    assert rotary_freqs(pos, 8).shape == (16, 2, 1, 8)


def test_equal_rows_on_cpu_still_share_one_row() -> None:
    pos = torch.arange(16).repeat(3, 1)  # contiguous, equal rows: compared on CPU (no sync there)
    assert rotary_freqs(pos, 8).shape == (16, 1, 1, 8)
    pos[1, 0] = 5
    out = rotary_freqs(pos, 8)
    assert out.shape == (16, 3, 1, 8)
    torch.testing.assert_close(out, _old_angles(pos, 8), rtol=0, atol=0)


def test_small_positions_unchanged_bit_for_bit() -> None:
    pos = torch.arange(1024)[None]
    assert torch.equal(rotary_freqs(pos, 64), _old_angles(pos, 64))


def test_large_positions_stay_accurate_in_fp32() -> None:
    """Beyond 2^14 the angles are reduced mod 2 pi in fp64 first: cos/sin within ~1e-6 of exact."""
    d = 64
    pos = torch.tensor([[0, 5, _FP64_POSITIONS - 1, _FP64_POSITIONS, 100_000, 1_000_003]])
    out = rotary_freqs(pos, d)
    assert out.dtype == torch.float32
    exact = pos.double().t()[..., None] * inv_freq(d, 10000.0)
    exact = torch.cat([exact, exact], -1)[:, :, None, :]
    big = pos[0] >= _FP64_POSITIONS
    for fn in (torch.cos, torch.sin):
        err = (fn(out.double()) - fn(exact)).abs()[big]
        assert float(err.max()) < 2e-6
    # plain fp32 angles would be off by ~pos * 6e-8 rad there (the reason for the reduction)
    plain = exact.float().double()
    assert float((torch.cos(plain) - torch.cos(exact)).abs()[big].max()) > 1e-3
    assert float(out[big].abs().max()) <= 2 * math.pi


def test_tiled_gpu_path_with_padding_reads_no_values() -> None:
    """The off-CPU tiled path (per-tile masks, rows left empty by padding) on meta tensors."""
    L, B, b = 16, 4, 2
    kp = torch.ones(b, L, dtype=torch.bool, device="meta")
    q, k, v = (torch.empty(b, 2, 2 * L, 8, device="meta", requires_grad=True) for _ in range(3))
    out = tiled_attention(q, k, v, AttentionSpec("bd3", L, B, kp), tile=8)
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
