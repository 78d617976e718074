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
    """Per-layer clean K/V, [b, heads_per_tp, tokens, head_dim] each."""

    def __init__(self, window: Optional[int] = None) -> None:
        if window is not None and window < 1:
            raise UserError(f"sampling.cache_window: expected a positive token count, found {window}")
        self.window = window
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}
        self.next_position = 0  # absolute position of the next block to store
        self.shift_carry: Optional[tuple] = None  # (position, clean state) for shifted logits (model/shift.py)

    def __len__(self) -> int:
        return next(iter(self.k.values())).shape[2] if self.k else 0

    def reset(self) -> None:
        self.k.clear()
        self.v.clear()
        self.next_position = 0
        self.shift_carry = None

    def _context(self, layer: int, new: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        ck, cv = self.k.get(layer), self.v.get(layer)
        if ck is None or self.window is None:
            return ck, cv
        keep = max(self.window - new, 0)  # the window holds the cached tokens plus the current block
        return ck[:, :, ck.shape[2] - min(keep, ck.shape[2]):], cv[:, :, cv.shape[2] - min(keep, cv.shape[2]):]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call,  # noqa: ANN001
               scale: float) -> torch.Tensor:
        """Attention of the new block (q/k/v [b, h, n, d]) to the cache plus itself."""
        n = q.shape[2]
        ck, cv = self._context(layer, n)
        keys = k if ck is None else torch.cat([ck, k], dim=2)
        vals = v if cv is None else torch.cat([cv, v], dim=2)
        mask = None
        if call.spec.kind == "causal" and n > 1:
            ctx = keys.shape[2] - n
            mask = torch.ones(n, ctx + n, dtype=torch.bool, device=q.device)
            mask[:, ctx:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)
        if call.cache_mode == "store":
            self.k[layer] = keys.detach() if self.window is None else keys[:, :, -self.window:].detach()
            self.v[layer] = vals.detach() if self.window is None else vals[:, :, -self.window:].detach()
        return out
