"""KV cache of clean blocks for block-diffusion (and AR) sampling.

Per layer the cache holds the post-RoPE keys/values of the clean tokens generated so far, each rotated
with its absolute position. Positions never change, and RoPE scores depend only on position
differences, so dropping the oldest entries (the sliding ``window``) is the same as the reference's
re-based positions, without re-rotating anything.

A denoising call of the current block attends to the cached clean blocks plus its own block
(bidirectionally for BD3/MDLM, causally for AR) -- exactly the x_t rows of the training mask
(M_OBC + M_BD). A store call runs the finished clean block the same way (the x0 rows: M_BC) and
appends its keys/values. Works with tensor parallelism: each rank caches its own heads.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from megabd3.errors import UserError


class KVCache:
    """Per-layer clean K/V in preallocated buffers [b, heads_per_tp, capacity, head_dim].

    A call writes its block's keys/values into the buffer right after the cached tokens and attends over
    a view of the buffer: no per-call concatenation of the whole cache (at 1024 cached tokens that copy
    cost more than the attention). A denoising call leaves that scratch region uncommitted; a store call
    commits it. With a sliding ``window`` the committed region is [base, length) with at most ``window``
    tokens; the buffer is compacted (the kept tokens moved to the front) only when it is full.
    """

    def __init__(self, window: Optional[int] = None) -> None:
        if window is not None and window < 1:
            raise UserError(f"sampling.cache_window: expected a positive token count, found {window}")
        self.window = window
        self._k: Dict[int, torch.Tensor] = {}
        self._v: Dict[int, torch.Tensor] = {}
        self._base: Dict[int, int] = {}  # first kept token (window) per layer
        self._len: Dict[int, int] = {}  # committed tokens written per layer (kept ones are [base, len))
        self.next_position = 0  # absolute position of the next block to store
        self.shift_carry: Optional[tuple] = None  # (position, clean state) for shifted logits (model/shift.py)
        self._mask_memo: tuple = (None, None)  # (layout, mask) of the last store_denoise call

    @property
    def k(self) -> Dict[int, torch.Tensor]:
        """The kept keys per layer, [b, h, tokens, d]: views of buffers that later calls overwrite (clone to keep)."""
        return {i: kb[:, :, self._base[i]:self._len[i]] for i, kb in self._k.items()}

    @property
    def v(self) -> Dict[int, torch.Tensor]:
        return {i: vb[:, :, self._base[i]:self._len[i]] for i, vb in self._v.items()}

    def __len__(self) -> int:
        i = next(iter(self._k), None)
        return 0 if i is None else self._len[i] - self._base[i]

    def reset(self) -> None:
        self._k.clear()
        self._v.clear()
        self._base.clear()
        self._len.clear()
        self.next_position = 0
        self.shift_carry = None
        self.__dict__.pop("_fast_decode", None)  # megabd3.model.fast_decode's per-run values
        self.__dict__.pop("_fast_decode_ok", None)

    def _room(self, layer: int, k: torch.Tensor, n: int) -> None:
        """Make the buffers of ``layer`` hold the kept tokens plus ``n`` more (compact or grow)."""
        kb = self._k.get(layer)
        base, length = self._base.get(layer, 0), self._len.get(layer, 0)
        kept = length - base
        if kb is not None and kept and (kb.shape[0], kb.shape[1], kb.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            raise UserError(f"KV cache holds batch/heads/head_dim {tuple(kb.shape[i] for i in (0, 1, 3))} but the call "
                            f"has {tuple(k.shape[i] for i in (0, 1, 3))}; reset() the cache or use a new one per batch")
        if kb is not None and kb.shape[:2] == k.shape[:2] and kb.dtype == k.dtype and kb.device == k.device:
            if length + n <= kb.shape[2]:
                return
            if kept + n <= kb.shape[2] and self.window is not None:  # full: move the kept tokens to the front
                for buf in (self._k[layer], self._v[layer]):
                    buf[:, :, :kept] = buf[:, :, base:length].clone()
                self._base[layer], self._len[layer] = 0, kept
                return
        cap = max(2 * (kept + n), 64)
        if self.window is not None:
            cap = max(min(cap, 2 * (self.window + n)), kept + n)
        b, h, _, d = k.shape
        new_k, new_v = k.new_empty(b, h, cap, d), k.new_empty(b, h, cap, d)
        if kb is not None and kept:
            new_k[:, :, :kept] = kb[:, :, base:length]
            new_v[:, :, :kept] = self._v[layer][:, :, base:length]
        self._k[layer], self._v[layer], self._base[layer], self._len[layer] = new_k, new_v, 0, kept

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call,  # noqa: ANN001
               scale: float) -> torch.Tensor:
        """Attention of the new block (q/k/v [b, h, n, d]) to the cache plus itself."""
        n = q.shape[2]
        self._room(layer, k, n)
        kb, vb = self._k[layer], self._v[layer]
        base, length = self._base[layer], self._len[layer]
        kb[:, :, length:length + n] = k
        vb[:, :, length:length + n] = v
        if call.cache_mode == "store_denoise":
            return self._store_denoise(layer, q, call.store_tokens, scale)
        start = base
        if self.window is not None:  # the window holds the cached tokens plus the current block
            start = max(base, length - max(self.window - n, 0))
        keys, vals = kb[:, :, start:length + n], vb[:, :, start:length + n]
        mask = None
        if call.spec.kind == "causal" and n > 1:
            ctx = keys.shape[2] - n
            mask = torch.ones(n, ctx + n, dtype=torch.bool, device=q.device)
            mask[:, ctx:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)
        if call.cache_mode == "store":
            self._len[layer] = length + n
            if self.window is not None:
                self._base[layer] = max(base, length + n - self.window)
        return out

    def _store_denoise(self, layer: int, q: torch.Tensor, n1: int, scale: float) -> torch.Tensor:
        """A store of the first ``n1`` tokens and a denoising call of the rest, in one attention: every row
        sees exactly the keys it would see in the two separate calls (same window rule), via a mask."""
        n = q.shape[2]
        n2 = n - n1
        kb, vb = self._k[layer], self._v[layer]
        base, length = self._base[layer], self._len[layer]
        start1 = base if self.window is None else max(base, length - max(self.window - n1, 0))
        base2 = base if self.window is None else max(base, length + n1 - self.window)
        start2 = base2 if self.window is None else max(base2, length + n1 - max(self.window - n2, 0))
        keys, vals = kb[:, :, start1:length + n], vb[:, :, start1:length + n]
        key = (start1, start2, length, n1, n2, q.device)
        if self._mask_memo[0] != key:  # every layer of a call has the same layout: built once per call
            pos = torch.arange(start1, length + n, device=q.device)
            self._mask_memo = (key, torch.cat([((pos >= start1) & (pos < length + n1))[None].expand(n1, -1),
                                               (pos >= start2)[None].expand(n2, -1)], 0))
        mask = self._mask_memo[1]
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)
        self._len[layer], self._base[layer] = length + n1, base2
        return out
