"""Attention backends for the BD3 2L mask (DESIGN.md "Attention backends").

All backends take q, k, v of shape [b, h, S, d] (S = 2L for ``bd3``) and an :class:`AttentionSpec`,
and return [b, h, S, d]. They agree with the dense reference built from
:func:`megabd3.diffusion.masks.attention_mask`, forward and backward (tests/unit/test_attention_*).

- ``dense``: one SDPA call with the boolean [2L, 2L] mask (the reference).
- ``tiled``: exact block-sparse attention from SDPA calls over query tiles of ``T`` tokens (a multiple
  of the block size). Clean (x0) queries of tile j attend to the x0 prefix ``[0, (j+1)T)`` (full
  before their tile, block-causal inside it); noisy (x_t) queries of tile j attend to the x0 prefix
  ``[0, jT)``, the x0 keys of strictly earlier blocks inside their tile, and their own x_t block.
  On CPU (:class:`_TiledCPU`) the keys are split into three parts computed by the fused flash kernels
  (x0 prefix unmasked, one call per tile; in-tile x0 keys, one masked call batched over tiles; own
  x_t block, one unmasked call batched over blocks) and merged by log-sum-exp, with a hand-written
  backward: work vs dense ``(L^2 + TL + LB) / 4L^2``. Off CPU, autograd through per-tile SDPA calls
  (work ``(n+2)/(4n)`` for ``n = L/T`` tiles).
- ``flex``: FlexAttention with :func:`flex_allowed` (the BD3 rule) as ``mask_mod``. On GPU
  ``flex_attention`` and ``create_block_mask`` are compiled with every size static but the batch, at a
  recompile limit that is a hard error (never a silent eager fallback), and one BlockMask per
  forward is shared by all layers (:class:`AttentionCall`). On CPU torch has no flex
  backward, so it only runs under ``no_grad``; its backward is checked against dense through torch's
  eager flex reference (tests/unit/test_attention_flex.py).
- ``auto``: flex on CUDA, tiled otherwise.

Padded keys (``spec.key_padding``) are masked in every backend; a query row left with no allowed key
attends to itself, exactly as the dense reference does (such rows are padding and carry no loss).
"""
from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from megabd3.diffusion.masks import AttentionSpec, attention_mask, dense_mask
from megabd3.errors import UserError

BACKENDS = ("dense", "tiled", "flex", "auto")


def resolve_backend(name: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for ``device``; reject unknown names."""
    if name not in BACKENDS:
        raise UserError(
            f"model.attention_backend: expected one of {', '.join(BACKENDS)}, found {name!r}"
        )
    if name == "auto":
        return "flex" if device.type == "cuda" else "tiled"
    return name


def tile_size(seq_len: int, block_size: int, requested: int) -> int:
    """The tiled backend's tile: a multiple of ``block_size`` near ``requested`` that divides ``seq_len``.

    Tiles must not split a block (the in-tile masks assume whole blocks) and must divide L so every
    tile has the same shape.
    """
    mult = max(1, round(requested / block_size))
    mult = min(mult, seq_len // block_size)
    while (seq_len // block_size) % mult:
        mult -= 1
    return mult * block_size


def empty_rows(spec: AttentionSpec) -> Optional[torch.Tensor]:
    """[b, S] bool: query rows with no allowed real key under ``spec`` (None without padding).

    Computed from per-block counts instead of the dense mask (O(b*L) instead of O(b*L^2)).
    """
    kp = spec.key_padding
    if kp is None:
        return None
    kp = kp.to(torch.bool)
    b, L = kp.shape
    if spec.kind == "bd3":
        B = spec.block_size
        real = kp.view(b, L // B, B).sum(-1)  # real tokens per block
        incl = real.cumsum(-1)  # real x0 tokens in blocks <= k
        excl = incl - real  # real x0 tokens in blocks < k
        noisy_ok = (real > 0) | (excl > 0)
        clean_ok = incl > 0
        rows = torch.cat([noisy_ok.repeat_interleave(B, -1), clean_ok.repeat_interleave(B, -1)], -1)
        return ~rows
    if spec.kind == "causal":
        return kp.cumsum(-1) == 0
    return (~kp.any(-1, keepdim=True)).expand(b, L)


# ----------------------------------------------------------------------------------------------
# dense


@functools.lru_cache(maxsize=16)
def _cached_dense_mask(seq_len: int, block_size: int, device: str) -> torch.Tensor:
    return dense_mask(seq_len, block_size, device)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                    scale: Optional[float] = None) -> torch.Tensor:
    """The reference: one SDPA call with the full boolean mask."""
    if spec.kind == "bd3" and spec.key_padding is None:
        mask = _cached_dense_mask(spec.seq_len, spec.block_size, str(q.device))
    elif spec.kind == "full" and spec.key_padding is None:
        mask = None
    else:
        mask = attention_mask(spec, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------------------------
# tiled


@functools.lru_cache(maxsize=64)
def _in_tile_masks(T: int, B: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks inside one tile of T queries (T a multiple of B, T > B).

    clean: [T, T] over the x0 tile, block-causal. noisy: [T, 2T] over (x0 tile, x_t tile): x0 keys of
    strictly earlier blocks of the tile, then the query's own x_t block.
    """
    blk = torch.arange(T, device=device) // B
    q, kv = blk[:, None], blk[None, :]
    return kv <= q, torch.cat([kv < q, kv == q], dim=1)


def _tile_mask(prefix: int, inner: Optional[torch.Tensor], kp: Optional[torch.Tensor],
               empty: Optional[torch.Tensor], self_col: int, T: int,
               device: torch.device) -> Optional[torch.Tensor]:
    """Mask for one tile call: ``prefix`` fully allowed keys followed by the in-tile keys.

    ``inner`` is the in-tile pattern [T, K - prefix] (None = the in-tile keys are the query tile itself,
    all allowed), ``kp`` the keys' padding [b, K], ``empty`` the tile's queries with nothing allowed
    [b, T]: they attend to themselves, at key column ``self_col + row``. Returns None when nothing is
    masked, so SDPA takes its fastest path.
    """
    if inner is None and kp is None:
        return None
    width = prefix + (T if inner is None else inner.shape[1])
    base = torch.ones(T, width, dtype=torch.bool, device=device)
    if inner is not None:
        base[:, prefix:] = inner
    if kp is None:
        return base
    mask = base[None, None] & kp[:, None, None, :]
    if empty is not None:  # no `empty.any()` test: it would be a host sync per tile on GPU
        # in place on the slice: ``mask`` is a fresh tensor (``base & kp``), and only a cached [T, T]
        # eye is needed, not a [T, width] one per tile (which on long sequences would cache GBs)
        eye = _eye(T, str(device))
        mask[..., self_col:self_col + T] |= eye[None, None] & empty[:, None, :, None]
    return mask


@functools.lru_cache(maxsize=16)
def _eye(T: int, device: str) -> torch.Tensor:
    """torch.eye(T) as bool, cached: every tile of every layer needs it (do not modify in place)."""
    return torch.eye(T, dtype=torch.bool, device=device)


@dataclass
class _TilePlan:
    """Static description of one tiled BD3 call: tile geometry and the per-tile masks."""

    L: int
    T: int
    n: int
    clean_masks: List[Optional[torch.Tensor]]  # per tile, over keys x0[0, e)
    noisy_masks: List[Optional[torch.Tensor]]  # per tile, over keys x0[0, x0_end) ++ x_t tile
    x0_ends: List[int]
    _additive_cache: Dict[torch.dtype, tuple] = field(default_factory=dict)

    def additive(self, dtype: torch.dtype) -> tuple:
        """The masks as additive float tensors (converted once per dtype)."""
        if dtype not in self._additive_cache:
            self._additive_cache[dtype] = ([_additive(m, dtype) for m in self.clean_masks],
                                           [_additive(m, dtype) for m in self.noisy_masks])
        return self._additive_cache[dtype]


@functools.lru_cache(maxsize=32)
def _cached_plan(kind: str, seq_len: int, block_size: int, tile: int, device: str) -> "_TilePlan":
    return _tile_plan(AttentionSpec(kind, seq_len, block_size), tile, torch.device(device))


def _tile_plan(spec: AttentionSpec, tile: int, device: torch.device) -> _TilePlan:
    L, B = spec.seq_len, spec.block_size
    T = tile_size(L, B, tile)
    n = L // T
    clean_inner, noisy_inner = (None, None) if T == B else _in_tile_masks(T, B, str(device))
    kp = None if spec.key_padding is None else spec.key_padding.to(device=device, dtype=torch.bool)
    empty = empty_rows(spec)
    if empty is not None:
        empty = empty.to(device)
    plan = _TilePlan(L, T, n, [], [], [])
    for j in range(n):
        s, e = j * T, (j + 1) * T
        plan.clean_masks.append(_tile_mask(s, clean_inner, None if kp is None else kp[:, :e],
                                           None if empty is None else empty[:, L + s:L + e], s, T,
                                           device))
        # With T == B the in-tile x0 keys are all masked for noisy queries: leave them out.
        x0_end = s if T == B else e
        kp_j = None if kp is None else torch.cat([kp[:, :x0_end], kp[:, s:e]], dim=1)
        plan.noisy_masks.append(_tile_mask(s, noisy_inner, kp_j,
                                           None if empty is None else empty[:, s:e], x0_end, T,
                                           device))
        plan.x0_ends.append(x0_end)
    return plan


def _noisy_keys(x: torch.Tensor, plan: _TilePlan, j: int) -> torch.Tensor:
    """Keys/values of tile j's noisy call: x0[0, x0_end) followed by the x_t tile."""
    L, s, e, x0_end = plan.L, j * plan.T, (j + 1) * plan.T, plan.x0_ends[j]
    if x0_end == 0:
        return x[:, :, s:e]
    return torch.cat([x[:, :, L:L + x0_end], x[:, :, s:e]], dim=2)


def _tiled_autograd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _TilePlan,
                    scale: Optional[float]) -> torch.Tensor:
    """Portable version: autograd through per-tile SDPA calls (used off CPU)."""
    L, T = plan.L, plan.T
    noisy_out, clean_out = [], []
    for j in range(plan.n):
        s, e = j * T, (j + 1) * T
        clean_out.append(F.scaled_dot_product_attention(
            q[:, :, L + s:L + e], k[:, :, L:L + e], v[:, :, L:L + e],
            attn_mask=plan.clean_masks[j], scale=scale))
        noisy_out.append(F.scaled_dot_product_attention(
            q[:, :, s:e], _noisy_keys(k, plan, j), _noisy_keys(v, plan, j),
            attn_mask=plan.noisy_masks[j], scale=scale))
    return torch.cat(noisy_out + clean_out, dim=2)


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Boolean (True = allowed) -> additive float mask, 4-D, as the fused CPU kernel expects."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask[None]
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_NEG = float("-inf")


def _to_tiles(x: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """[b, h, 2L, d] -> [b, n, h, 2T, d]: tile i holds (x_t tile i ; x0 tile i) contiguously (a copy)."""
    b, h, _, d = x.shape
    return x.reshape(b, h, 2, n, T, d).permute(0, 3, 1, 2, 4, 5).reshape(b, n, h, 2 * T, d).contiguous()


def _to_half_tiles(x: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """[b, h, 2L, d] -> [2, b, n, h, T, d] (half, batch, tile, head, row): one copy in which both the
    x_t blocks (the diag part's keys) and the x0 tiles (the inner part's keys) are contiguous views."""
    b, h, _, d = x.shape
    out = torch.empty(2, b, n, h, T, d, dtype=x.dtype, device=x.device)
    out.copy_(x.view(b, h, 2, n, T, d).permute(2, 0, 3, 1, 4, 5))
    return out


def _from_tiles(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_tiles`; ``y`` is [b, n, h, 2T, d] or its split [b, n, h, 2, T/B, B, d]."""
    b, n, h = y.shape[:3]
    d = y.shape[-1]
    if y.dim() == 5:
        y = y.reshape(b, n, h, 2, -1, d)
    return y.permute(0, 2, 3, 1, *range(4, y.dim())).reshape(b, h, -1, d)  # one copy


@dataclass
class _SplitMasks:
    """Additive masks (None = unmasked) and per-row "has an allowed key" flags of the three parts of
    :class:`_TiledCPU` (flags None = every row has one). Shapes broadcast against the kernels' inputs."""

    diag: Optional[torch.Tensor]  # x_t blocks: [b*n*h, T/B, 1 or B, B]
    diag_rows: Optional[torch.Tensor]  # [b*n*h, T/B, 1 or B]
    inner: Optional[torch.Tensor]  # [1 or b*n, 1, R, T], R = 2T (T > B) or T (x0 rows only)
    inner_rows: Optional[torch.Tensor]  # [1 or b*n, 1, R]
    prefix: List[Optional[torch.Tensor]]  # tile i: [b, 1, 1, iT] (index 0 unused)
    prefix_rows: List[Optional[torch.Tensor]]  # tile i: [b, 1, 1] (index 0 unused)


@functools.lru_cache(maxsize=64)
def _inner_pattern(T: int, B: int, device: str) -> Optional[torch.Tensor]:
    """[2T, T] bool: (x_t tile ; x0 tile) queries vs the x0 tile's keys: strictly earlier blocks for
    x_t rows, block-causal for x0 rows. None when T == B (x_t rows see none of them, x0 rows all)."""
    if T == B:
        return None
    blk = torch.arange(T, device=device) // B
    return torch.cat([blk[None, :] < blk[:, None], blk[None, :] <= blk[:, None]], 0)


def _split_masks(spec: AttentionSpec, T: int, h: int, dtype: torch.dtype,
                 device: torch.device) -> _SplitMasks:
    L, B = spec.seq_len, spec.block_size
    n, nbt = L // T, T // B
    pattern = _inner_pattern(T, B, str(device))
    kp = spec.key_padding
    if kp is None:
        return _SplitMasks(None, None, None if pattern is None else _additive(pattern, dtype),
                           None if pattern is None else pattern.any(-1)[None, None],
                           [None] * n, [None] * n)
    kp = kp.to(device=device, dtype=torch.bool)
    b = kp.shape[0]
    empty = empty_rows(spec).to(device)  # a row with no real key anywhere attends to itself
    any_empty = bool(empty.any())
    kpt = kp.view(b * n, T)  # keys of tile i (the same in both halves)
    # x_t block vs its own x_t block
    diag = kpt.view(b * n, 1, nbt, 1, B).expand(b * n, h, nbt, 1, B)
    if any_empty:
        eye = torch.eye(B, dtype=torch.bool, device=device)
        diag = diag | (eye & empty[:, :L].reshape(b * n, 1, nbt, B, 1))
    diag = diag.reshape(b * n * h, nbt, -1, B)
    # (x_t ; x0) rows vs the x0 tile's keys
    base = pattern if pattern is not None else torch.ones(T, T, dtype=torch.bool, device=device)
    inner = base[None, None] & kpt.view(b * n, 1, 1, T)
    if any_empty:
        eye = torch.eye(T, dtype=torch.bool, device=device)
        x0_self = eye & empty[:, L:].reshape(b * n, 1, T, 1)
        inner = torch.cat([inner[:, :, :T], inner[:, :, T:] | x0_self], 2) if pattern is not None \
            else inner | x0_self
    prefix, prefix_rows = [None], [None]
    for i in range(1, n):
        keys = kp[:, :i * T].view(b, 1, 1, i * T)
        prefix.append(_additive(keys, dtype))
        prefix_rows.append(keys.any(-1))
    return _SplitMasks(_additive(diag, dtype), diag.any(-1), _additive(inner, dtype), inner.any(-1),
                       prefix, prefix_rows)


def _rows_lse(lse: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The kernel reports lse 0 for a row with every key masked; make it -inf so the merge drops it."""
    return lse if rows is None else lse.masked_fill(~rows, _NEG)


def _scratch(dead: Optional[torch.Tensor], shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A contiguous ``shape`` buffer over the memory of ``dead`` (a temporary the caller no longer
    uses, owning its whole storage), else a new one. Recycling already-touched memory saves the page
    faults of a fresh full-size allocation, which cost about as much as a copy on CPU."""
    numel = math.prod(shape)
    if (dead is not None and dead.dtype == like.dtype and dead.device == like.device
            and dead.storage_offset() == 0 and 0 not in dead.stride()
            and dead.untyped_storage().nbytes() == dead.numel() * dead.element_size()
            and dead.numel() >= numel):
        return dead.as_strided(shape, torch.empty(shape, device="meta").stride(), 0)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _diag_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                   scratch: tuple = (None, None, None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention backward of the diag part ([N, H, B, d], B-sized blocks) with batched matmuls.

    P = exp(s q k^T + mask - lse), dS = P * (g v^T - rowsum(g * out)); dq = s dS k, dk = s dS^T q,
    dv = P^T g, with the FINAL out/lse so the part's share is exact. For these tiny blocks this is
    about twice as fast as the fused kernel, which zero-fills and re-lays out full-size buffers.
    ``scratch``: up to three dead tensors (with distinct storages) whose memory may be reused.
    """
    N, H, B, d = q.shape
    # delta = rowsum(g * out) straight from the strided view; bmm needs 3-D operands, which is a
    # free view for the contiguous k/v blocks and one copy for the tile-layout q/g.
    delta = torch.linalg.vecdot(g, out).reshape(N * H, B, 1)
    # q and g are strided tile-layout views: copy them into (recycled) private 3-D buffers, which
    # later receive dq and dk.
    q, g = (_scratch(t, (N * H, B, d), x).view(N, H, B, d).copy_(x).view(N * H, B, d)
            for t, x in zip(scratch[:2], (q, g)))
    k, v = (x.reshape(N * H, B, d) for x in (k, v))
    s = torch.baddbmm(torch.empty(N * H, B, B, dtype=q.dtype, device=q.device), q, k.transpose(1, 2),
                      beta=0.0, alpha=scale)
    if mask is not None:
        s += mask.reshape(N * H, -1, B)
    p = s.sub_(lse.reshape(N * H, B, 1).to(s.dtype)).exp_()
    ds = torch.bmm(g, v.transpose(1, 2)).sub_(delta).mul_(p).mul_(scale)  # scale folded into dS
    dv = torch.bmm(p.transpose(1, 2), g, out=_scratch(scratch[2], (N * H, B, d), g))
    # dk and dq land in the buffers of the q/g copies once those are consumed: fresh full-size
    # buffers cost page faults on first touch, which is comparable to these small matmuls.
    dk = torch.bmm(ds.transpose(1, 2), q, out=g)
    dq = torch.bmm(ds, k, out=q)
    return dq, dk, dv


class _TiledCPU(torch.autograd.Function):
    """Tiled BD3 attention on CPU: three fused-kernel parts merged by their log-sum-exp.

    In the tile layout (x_t tile i ; x0 tile i) of 2T rows (T = tile, n = L/T tiles), every allowed
    (query, key) pair of the BD3 mask falls in exactly one part:

    1. diag: each x_t block vs its own x_t block: one unmasked call batched over all b*n*h*(T/B)
       blocks (blocks as heads).
    2. inner: (x_t tile i ; x0 tile i) vs the x0 tile i keys (x_t rows: strictly earlier blocks; x0
       rows: block-causal): one masked call batched over the b*n tiles with a shared [2T, T] mask
       (x0 rows only and no mask when T == B).
    3. prefix: (x_t tile i ; x0 tile i) vs x0[0, iT): unmasked, one call per tile i >= 1, the keys a
       contiguous slice of k (no copies).

    Work vs dense: (L^2 + TL + LB) / 4L^2 query-key pairs, and only part 2 (2TL of them) pays the
    masked kernel's extra cost. Outputs merge as out = sum_p e^(lse_p - lse) o_p. The backward of a
    key split needs no merge: each part's backward, given the FINAL output and lse, returns its share
    of dq (summed) and the exact dk/dv of its keys (as in flash-attention's key splitting).
    """

    @staticmethod
    def forward(ctx, q, k, v, spec: AttentionSpec, T: int, scale: float):  # noqa: ANN001, ANN205
        L, B = spec.seq_len, spec.block_size
        b, h, _, d = q.shape
        n, nbt = L // T, T // B
        masks = _split_masks(spec, T, h, q.dtype, q.device)
        qt = _to_tiles(q, n, T)  # [b, n, h, 2T, d]: (x_t tile i ; x0 tile i) rows adjacent
        kt, vt = (_to_half_tiles(x, n, T) for x in (k, v))  # [2, b, n, h, T, d]
        # Results are combined in split-only views [b, n, h, 2, T/B, B, d] (always valid, whatever
        # strides the kernels return), so no layout copies are needed.
        seven, six = (b, n, h, 2, nbt, B, d), (b, n, h, 2, nbt, B)
        xt = lambda x: x.view(b * n * h, 2, nbt, B, d)[:, 0]  # noqa: E731 - x_t blocks as heads
        kvx = lambda x: x[0].view(b * n * h, nbt, B, d)  # noqa: E731 - the same, half-tile layout
        kv0 = lambda x: x[1].view(b * n, h, T, d)  # noqa: E731 - x0 tiles, half-tile layout
        rows = slice(0, 2) if nbt > 1 else slice(1, 2)  # inner part's query halves
        R = T * (rows.stop - rows.start)
        tiles = lambda x: x.view(b * n, h, 2 * T, d)  # noqa: E731

        parts = []  # (index into the [b, n, h, 2, ...] views, output, lse)
        o, l_d = _FWD(xt(qt), kvx(kt), kvx(vt), attn_mask=masks.diag, scale=scale)
        parts.append(((slice(None), slice(None), slice(None), 0), o.view(b, n, h, nbt, B, d),
                      _rows_lse(l_d, masks.diag_rows).view(b, n, h, nbt, B)))
        o, l_i = _FWD(tiles(qt)[:, :, 2 * T - R:], kv0(kt), kv0(vt), attn_mask=masks.inner, scale=scale)
        k_rows = rows.stop - rows.start
        parts.append(((slice(None), slice(None), slice(None), rows), o.view(b, n, h, k_rows, nbt, B, d),
                      _rows_lse(l_i, masks.inner_rows).view(b, n, h, k_rows, nbt, B)))
        if n > 1:
            # The per-tile outputs are kept as the kernel returns them (merged one by one below,
            # no gathering copy); only their small lse rows are gathered.
            o1 = []
            l1 = torch.empty(b, n - 1, h, 2 * T, dtype=l_d.dtype, device=q.device)
            for i in range(1, n):
                o, li = _FWD(qt[:, i], k[:, :, L:L + i * T], v[:, :, L:L + i * T],
                             attn_mask=masks.prefix[i], scale=scale)
                o1.append(o)
                l1[:, i - 1] = _rows_lse(li, masks.prefix_rows[i])
            parts.append(((slice(None), slice(1, None)), o1, l1.view(b, n - 1, h, 2, nbt, B)))
        # Final lse first (every row has an allowed key somewhere, so it is finite), then
        # out = sum_p e^(lse_p - lse) o_p, one pass per part (rows a part leaves empty get weight 0).
        parts_after = []
        lse = torch.full(six, _NEG, dtype=l_d.dtype, device=q.device)
        for idx, _, l_p in parts:
            lse[idx] = torch.logaddexp(lse[idx], l_p)
        # No zero fill: the inner part (both halves when T > B, else x0 rows) and the diag part
        # (x_t rows) write their rows first; every other contribution is accumulated.
        out = torch.empty(seven, dtype=q.dtype, device=q.device)
        for p, (idx, o_p, l_p) in enumerate(parts):
            w = torch.exp(l_p - lse[idx]).to(q.dtype).unsqueeze(-1)
            if p == 1 or (p == 0 and nbt == 1):
                torch.mul(o_p, w, out=out[idx])
            else:
                parts_after.append((idx, o_p, w))
        for idx, o_p, w in parts_after:
            if isinstance(o_p, list):  # prefix part: tile i >= 1 -> index i - 1
                for i, o_i in enumerate(o_p, start=1):
                    out[:, i].addcmul_(o_i.view(b, h, 2, nbt, B, d), w[:, i - 1])
            else:
                out[idx].addcmul_(o_p, w)
        out, lse = out.view(b, n, h, 2 * T, d), lse.view(b, n, h, 2 * T)
        ctx.save_for_backward(k, v, qt, kt, vt, out, lse)
        ctx.spec, ctx.T, ctx.scale, ctx.masks = spec, T, scale, masks
        return _from_tiles(out)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        k, v, qt, kt, vt, out, lse = ctx.saved_tensors
        T, scale, masks = ctx.T, ctx.scale, ctx.masks
        L, B = ctx.spec.seq_len, ctx.spec.block_size
        b, n, h, _, d = qt.shape
        nbt = T // B
        R = 2 * T if nbt > 1 else T
        gt = _to_tiles(grad_out, n, T)
        xt = lambda x: x.view(b * n * h, 2, nbt, B, d)[:, 0]  # noqa: E731
        tiles = lambda x: x.view(b * n, h, 2 * T, d)  # noqa: E731

        gq, gk, gv = _BWD(tiles(gt)[:, :, 2 * T - R:], tiles(qt)[:, :, 2 * T - R:],
                          kt[1].view(b * n, h, T, d), vt[1].view(b * n, h, T, d), tiles(out)[:, :, 2 * T - R:], lse.view(b * n, h, 2 * T)[:, :, 2 * T - R:],
                          0.0, False, attn_mask=masks.inner, scale=scale)
        # Gradients are written straight into the [b, h, 2L, d] result, seen as [b, h, 2, n, T/B, B, d]
        # (half, tile, block, row), so no final layout copy is needed.
        dq, dk, dv = (torch.empty_like(grad_out, memory_format=torch.contiguous_format) for _ in range(3))
        dqs, dks, dvs = (x.view(b, h, 2, n, nbt, B, d) for x in (dq, dk, dv))
        to_final = lambda x, r: x.view(b, n, h, r, nbt, B, d).permute(0, 2, 3, 1, 4, 5, 6)  # noqa: E731
        dqs[:, :, 2 - R // T:] = to_final(gq, R // T)
        dks[:, :, 1:] = to_final(gk, 1)
        dvs[:, :, 1:] = to_final(gv, 1)
        gq, gk, gv = _diag_backward(xt(gt), xt(qt), kt[0].view(b * n * h, nbt, B, d),
                                    vt[0].view(b * n * h, nbt, B, d), xt(out),
                                    lse.view(b * n * h, 2, nbt, B)[:, 0], masks.diag, scale,
                                    scratch=(gk, gv, gq))  # the inner part's, already consumed
        if R == 2 * T:
            dqs[:, :, :1] += to_final(gq, 1)
        else:
            dqs[:, :, :1] = to_final(gq, 1)
        dks[:, :, :1] = to_final(gk, 1)
        dvs[:, :, :1] = to_final(gv, 1)
        for i in range(1, n):
            gq, gk, gv = _BWD(gt[:, i], qt[:, i], k[:, :, L:L + i * T], v[:, :, L:L + i * T], out[:, i],
                              lse[:, i], 0.0, False, attn_mask=masks.prefix[i], scale=scale)
            dqs[:, :, :, i] += gq.view(b, h, 2, nbt, B, d)
            dks[:, :, 1, :i] += gk.view(b, h, i, nbt, B, d)  # keys x0[0, iT): tiles 0..i-1 of x0
            dvs[:, :, 1, :i] += gv.view(b, h, i, nbt, B, d)
        return dq, dk, dv, None, None, None


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                    scale: Optional[float] = None, tile: int = 128) -> torch.Tensor:
    """Exact block-sparse BD3 attention from 2n SDPA calls (n = L / T); any device, autograd.

    Tile j (queries [jT, (j+1)T) of each half):
      clean queries -> keys x0[0, (j+1)T): all before the tile, block-causal inside it;
      noisy queries -> keys x0[0, (j+1)T) ++ x_t tile j: all x0 before the tile, x0 of strictly
      earlier blocks inside it, and their own x_t block. With T == B the in-tile x0 keys are all
      masked for noisy queries and are left out, and neither call needs a mask.
    """
    if spec.kind != "bd3":
        if spec.key_padding is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=spec.kind == "causal", scale=scale)
        return dense_attention(q, k, v, spec, scale)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        return _TiledCPU.apply(q, k, v, spec, tile_size(spec.seq_len, spec.block_size, tile), scale)
    if spec.key_padding is None:  # the common case: masks depend only on (L, B, T)
        plan = _cached_plan(spec.kind, spec.seq_len, spec.block_size, tile, str(q.device))
    else:
        plan = _tile_plan(spec, tile, q.device)
    return _tiled_autograd(q, k, v, plan, scale)


# ----------------------------------------------------------------------------------------------
# flex


def flex_allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """The BD3 rule of :func:`bd3_allowed`, written without bool arithmetic for compiled flex.

    Inductor's value-range analysis rejects ``bool == bool`` and ``int * bool`` inside a compiled
    ``mask_mod`` ("A Boolean argument can only be used in Eq and Ne"), which :func:`bd3_allowed`
    uses. Because L is a multiple of B, ``q // B == kv // B`` already means "same half, same block",
    and the clean blocks are the x_t blocks shifted by L / B, so only integer comparisons remain.
    """
    L, B = seq_len, block_size
    qb, kb = q_idx // B, kv_idx // B
    k_clean = kv_idx >= L
    block_diagonal = qb == kb
    offset_block_causal = (q_idx < L) & k_clean & (qb > (kv_idx - L) // B)
    block_causal = (q_idx >= L) & k_clean & (qb >= kb)
    return block_diagonal | offset_block_causal | block_causal


def _flex_mask_mod(spec: AttentionSpec, device: torch.device) -> tuple[Callable, Optional[torch.Tensor]]:
    """The ``mask_mod`` for ``spec``, and the [b, L] key padding it captured (None: unpadded)."""
    L, B, kind = spec.seq_len, spec.block_size, spec.kind
    kp = None if spec.key_padding is None else spec.key_padding.to(device=device, dtype=torch.bool)
    empty = empty_rows(spec)
    if empty is not None:
        empty = empty.to(device)
    # captured tensors are inputs of the compiled graphs too: their batch is dynamic like q's
    _batch_dynamic(kp, empty)

    def allowed(b, h, q_idx, kv_idx):  # noqa: ANN001 - flex calls it with scalar tensors
        if kind == "bd3":
            ok = flex_allowed(q_idx, kv_idx, L, B)
        elif kind == "causal":
            ok = kv_idx <= q_idx
        else:
            ok = q_idx >= 0
        if kp is None:
            return ok
        # both halves share the padding: key column kv of x0 is token kv - L
        key_real = kp[b, torch.where(kv_idx >= L, kv_idx - L, kv_idx)] if kind == "bd3" else kp[b, kv_idx]
        return (ok & key_real) | ((q_idx == kv_idx) & empty[b, q_idx])

    return allowed, kp


# Compiled once per process and function, with every size static except the batch (``dynamic=False``
# plus ``maybe_mark_dynamic`` on dim 0 of every input, :func:`_batch_dynamic`). So the training shape
# gets kernels specialised on heads/sequence/head_dim from its first step, and eval's smaller last
# batch (eval.padding.real_rows drops all-padding rows) reuses them instead of compiling dynamic
# ones that training would then keep using (automatic dynamic shapes, ``dynamic=None``, did that; a
# batch of 1 still gets its own static entry, which guards keep away from other batches). A padded
# BlockMask's ``mask_mod`` is a new closure each forward, but dynamo guards on its code and on the
# shapes of the captured tensors, not on their identity, so it does not recompile either.
# Each other (kind, L, B, grad mode, padded or not, batch == 1) compiles its own entry. Past dynamo's
# recompile limit torch would silently run flex eagerly, which materialises the full score matrix
# (OOM or a large slowdown): :func:`_run_compiled` raises instead, at a limit of its own.
_compiled: Dict[str, Callable] = {}
# Tests set these to run the compiled path on CPU (forward only), and to check dynamo's recompile
# decisions quickly with the "eager" backend (the guards are dynamo's, whatever the backend).
COMPILE_ON_CPU = False
COMPILE_BACKEND = "inductor"
RECOMPILE_LIMIT_ENV = "MEGABD3_FLEX_RECOMPILE_LIMIT"
DEFAULT_RECOMPILE_LIMIT = 64  # per compiled function; dynamo's global default (8) is too few
_BLOCK_MASK_CACHE_SIZE = 16
_block_mask_cache: "OrderedDict[tuple, object]" = OrderedDict()
_BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                       "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def flex_compiled(device: torch.device) -> bool:
    """Whether flex runs compiled on ``device``: always on CUDA; on CPU only when tests ask for it."""
    return device.type == "cuda" or COMPILE_ON_CPU


def _batch_dynamic(*tensors: Optional[torch.Tensor]) -> None:
    """Mark dim 0 (the batch) dynamic for the compiled flex functions; the other dims stay static
    (``dynamic=False``). ``maybe_``: a batch of 1 is specialised by dynamo instead of raising."""
    for t in tensors:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _build_block_mask(mask_mod: Callable, batch_like: Optional[torch.Tensor], S: int,
                      device: torch.device):  # noqa: ANN202
    """create_block_mask with the batch taken from a tensor's (dynamic) dim 0: a Python int batch
    would be a static constant of the compiled graph, recompiled for every batch size."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch = None if batch_like is None else batch_like.shape[0]
    return create_block_mask(mask_mod, batch, None, S, S, device=device)


def recompile_limit() -> int:
    """Compiled entries allowed per flex function (env ``MEGABD3_FLEX_RECOMPILE_LIMIT``)."""
    raw = os.environ.get(RECOMPILE_LIMIT_ENV, "")
    if not raw:
        return DEFAULT_RECOMPILE_LIMIT
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{RECOMPILE_LIMIT_ENV}={raw!r} is not a positive integer; set it to e.g. "
                        f"{DEFAULT_RECOMPILE_LIMIT} or unset it")
    return int(raw)


def _compiled_fn(name: str) -> Callable:
    from torch.nn.attention import flex_attention as fa

    key = f"{name}:{COMPILE_BACKEND}"
    if key not in _compiled:
        fn = _build_block_mask if name == "create_block_mask" else getattr(fa, name)
        _compiled[key] = torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)
    return _compiled[key]


def _run_compiled(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    """Call compiled ``name`` with dynamo's recompile limit raised to :func:`recompile_limit` and made
    a hard error, for these calls only (both settings are read when a frame compiles, and are
    excluded from dynamo's guards, so patching them per call does not itself recompile)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    limit = recompile_limit()
    try:
        with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            return _compiled_fn(name)(*args, **kwargs)
    except FailOnRecompileLimitHit as exc:
        raise UserError(
            f"flex attention hit its recompile limit compiling {name} ({RECOMPILE_LIMIT_ENV}={limit} "
            f"variants per function: distinct sequence lengths, block sizes, mask kinds, grad modes in "
            f"this process; torch would now run flex eagerly with the full score matrix: OOM or a large "
            f"slowdown); raise {RECOMPILE_LIMIT_ENV}, use fewer distinct shapes, or set "
            f"model.attention_backend=tiled"
        ) from exc


def flex_block_mask(spec: AttentionSpec, batch: int, device: torch.device):  # noqa: ANN201
    """The BlockMask for ``spec``: built by the compiled ``create_block_mask`` where flex is compiled
    (the eager one materialises a [b, S, S] boolean mask). Without padding it depends only on
    (kind, L, B, device) and is kept in a small LRU cache; with padding it is built per forward (see
    :meth:`AttentionCall.flex_block_mask`, which shares it across layers)."""
    from torch.nn.attention.flex_attention import create_block_mask

    S = spec.input_len
    key = (spec.kind, spec.seq_len, spec.block_size, str(device))
    if spec.key_padding is None and key in _block_mask_cache:
        _block_mask_cache.move_to_end(key)
        return _block_mask_cache[key]
    mask_mod, kp = _flex_mask_mod(spec, device)
    if flex_compiled(device):
        bm = _run_compiled("create_block_mask", mask_mod, kp, S, device)
    else:
        bm = create_block_mask(mask_mod, None if spec.key_padding is None else batch, None, S, S,
                               device=device)
    if spec.key_padding is None:
        _block_mask_cache[key] = bm
        while len(_block_mask_cache) > _BLOCK_MASK_CACHE_SIZE:
            _block_mask_cache.popitem(last=False)
    return bm


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                   scale: Optional[float] = None, block_mask: Optional[object] = None) -> torch.Tensor:
    """FlexAttention with the BD3 ``mask_mod``: compiled on CUDA (forward and backward), eager and
    forward-only on CPU. ``block_mask``: a prebuilt :func:`flex_block_mask` for this spec and batch."""
    from torch.nn.attention import flex_attention as fa

    if q.device.type == "cpu" and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
    ):
        raise UserError(
            "model.attention_backend=flex has no backward on CPU (torch FlexAttention limitation); "
            "set model.attention_backend to tiled or auto for CPU training"
        )
    bm = block_mask if block_mask is not None else flex_block_mask(spec, q.shape[0], q.device)
    if not flex_compiled(q.device):
        return fa.flex_attention(q, k, v, block_mask=bm, scale=scale)
    _batch_dynamic(q, k, v, *(getattr(bm, n, None) for n in _BLOCK_MASK_TENSORS))
    return _run_compiled("flex_attention", q, k, v, block_mask=bm, scale=scale)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, backend: str,
           scale: Optional[float] = None, tile: int = 128, call: Optional["AttentionCall"] = None) -> torch.Tensor:
    """Dispatch to a backend (``auto`` resolved by device). q/k/v/out: [b, h, S, d]. ``call``: the
    forward's :class:`AttentionCall`, which holds the flex BlockMask shared by all layers."""
    backend = resolve_backend(backend, q.device)
    if backend == "dense":
        return dense_attention(q, k, v, spec, scale)
    if backend == "tiled":
        return tiled_attention(q, k, v, spec, scale, tile)
    bm = call.flex_block_mask(q.shape[0], q.device) if call is not None else None
    return flex_attention(q, k, v, spec, scale, block_mask=bm)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------------------------
# megatron core-attention module


@dataclass
class AttentionCall:
    """What the core attention of every layer needs for one forward; passed through megatron's
    ``TransformerBlock``/``SelfAttention`` as the ``attention_mask`` argument (they forward it
    untouched). ``cache``/``cache_mode`` select KV-cached sampling (see :mod:`megabd3.model.kv_cache`).
    """

    spec: AttentionSpec
    backend: str = "auto"
    tile: int = 128
    cache: Optional[object] = None
    cache_mode: Optional[str] = None  # "denoise" (read only) | "store" (read, then append) | "store_denoise"
    # store_denoise: the first ``store_tokens`` tokens are a clean block to append, the rest a noisy block
    # that attends to the cache plus that clean block (one forward instead of a store and a denoise)
    store_tokens: int = 0
    # The flex BlockMask of this forward: built by the first layer, reused by the others (with
    # padding it depends on the batch, so it cannot be cached across forwards).
    _block_mask: Optional[object] = field(default=None, init=False, repr=False, compare=False)

    def flex_block_mask(self, batch: int, device: torch.device):  # noqa: ANN201
        if self._block_mask is None:
            self._block_mask = flex_block_mask(self.spec, batch, device)
        return self._block_mask


class BD3CoreAttention(torch.nn.Module):
    """SDPA-based core attention for megatron's ``SelfAttention`` (replaces ``DotProductAttention``,
    which is 2.5-3x slower than SDPA on CPU). q/k/v: [s, b, heads_per_tp, hn] -> [s, b, hp]."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",  # noqa: ANN001
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, **kwargs) -> None:  # noqa: ANN001, ANN003
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        hn = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hn)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: AttentionCall, attn_mask_type=None, attention_bias=None,  # noqa: ANN001
                packed_seq_params=None, **kwargs) -> torch.Tensor:  # noqa: ANN001, ANN003
        call = attention_mask
        if not isinstance(call, AttentionCall):
            raise TypeError("BD3CoreAttention expects an AttentionCall as attention_mask")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if call.cache is not None:
            out = call.cache.attend(self.layer_number, q, k, v, call, self.scale)
        else:
            out = attend(q, k, v, call.spec, call.backend, self.scale, call.tile, call=call)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
