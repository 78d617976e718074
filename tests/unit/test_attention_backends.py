"""Every attention backend equals the dense reference (outputs and gradients), DESIGN.md invariant 1."""
from __future__ import annotations

import pytest
import torch

from megabd3.diffusion.masks import AttentionSpec, attention_mask
from megabd3.errors import UserError
from megabd3.model.attention import attend, empty_rows, tile_size

CASES = [(L, B) for L in (16, 128) for B in (1, 4, 16, L) if B <= L]
CASES = sorted(set(CASES))


def _inputs(b: int, S: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, S, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]


def _padding(b: int, L: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    lengths[0] = L  # one unpadded row; another fully padded beyond its first token
    lengths[-1] = 1
    return torch.arange(L)[None] < lengths[:, None]


def _naive(q, k, v, spec):  # noqa: ANN001, ANN202
    """Softmax attention written out (independent of SDPA) with the dense rule mask."""
    mask = attention_mask(spec)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("L,B", CASES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tile", [4, 32, 128])
def test_tiled_equals_dense(L: int, B: int, padded: bool, tile: int) -> None:
    b = 3
    spec = AttentionSpec("bd3", L, B, _padding(b, L) if padded else None)
    q, k, v = _inputs(b, 2 * L)
    grad = torch.randn(b, 2, 2 * L, 8, dtype=torch.float64)
    ref = attend(q, k, v, spec, "dense")
    ref_g = torch.autograd.grad(ref, (q, k, v), grad)
    out = attend(q, k, v, spec, "tiled", tile=tile)
    out_g = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, r in zip(out_g, ref_g):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("L,B", [(16, 4), (128, 16)])
def test_dense_equals_naive_softmax(L: int, B: int) -> None:
    spec = AttentionSpec("bd3", L, B)
    q, k, v = _inputs(2, 2 * L)
    torch.testing.assert_close(attend(q, k, v, spec, "dense"), _naive(q, k, v, spec))


def test_tiled_float32_cpu_kernel_gradients() -> None:
    """The fused-CPU-kernel path (float32) against dense, with padding and several tiles."""
    L, B, b = 64, 4, 2
    spec = AttentionSpec("bd3", L, B, _padding(b, L))
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(b, 2 * L))
    g = torch.randn(b, 2, 2 * L, 8)
    ref = torch.autograd.grad(attend(q, k, v, spec, "dense"), (q, k, v), g)
    out = torch.autograd.grad(attend(q, k, v, spec, "tiled", tile=16), (q, k, v), g)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["causal", "full"])
@pytest.mark.parametrize("padded", [False, True])
def test_other_kinds(kind: str, padded: bool) -> None:
    L, b = 16, 3
    spec = AttentionSpec(kind, L, 1, _padding(b, L) if padded else None)
    q, k, v = _inputs(b, L)
    ref = _naive(q, k, v, spec)
    torch.testing.assert_close(attend(q, k, v, spec, "dense"), ref)
    torch.testing.assert_close(attend(q, k, v, spec, "tiled"), ref)


@pytest.mark.parametrize("L,B", [(16, 1), (16, 4), (16, 16), (128, 16)])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_forward_equals_dense(L: int, B: int, padded: bool) -> None:
    b = 2
    spec = AttentionSpec("bd3", L, B, _padding(b, L) if padded else None)
    q, k, v = (t.detach().float() for t in _inputs(b, 2 * L))
    with torch.no_grad():
        ref = attend(q, k, v, spec, "dense")
        out = attend(q, k, v, spec, "flex")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_with_gradients_on_cpu_is_rejected() -> None:
    spec = AttentionSpec("bd3", 16, 4)
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(1, 32))
    with pytest.raises(UserError, match="tiled or auto"):
        attend(q, k, v, spec, "flex")


def test_unknown_backend_rejected() -> None:
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(UserError, match="attention_backend"):
        attend(q, q, q, AttentionSpec("full", 4), "fast")


def test_empty_rows_match_dense_mask() -> None:
    L, B, b = 16, 4, 4
    spec = AttentionSpec("bd3", L, B, _padding(b, L))
    dense = AttentionSpec("bd3", L, B)
    keys = torch.cat([spec.key_padding] * 2, 1)
    allowed = attention_mask(dense)[None] & keys[:, None, :]
    assert torch.equal(empty_rows(spec), ~allowed.any(-1))


def test_tile_size_divides_and_keeps_blocks() -> None:
    for L, B, req in [(1024, 16, 128), (128, 4, 100), (96, 8, 64), (16, 16, 128), (48, 1, 128)]:
        T = tile_size(L, B, req)
        assert T % B == 0 and L % T == 0 and T <= L
