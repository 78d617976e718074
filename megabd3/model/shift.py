"""Shifted logits (``model.shift_logits``): the Fast-dLLM v2 idea for adapting a causal LM to block diffusion.

A pretrained causal LM's hidden state at position i predicts token i + 1. An unshifted denoiser must
instead predict the masked token i from the state at i, which throws the pretrained head's meaning
away. With the shift, the denoiser's distribution for position i is read from the hidden state of
position i - 1, so on the first step the adapted model already denoises with its next-token head:

- inside a block (i not a block start): the noisy stream's state at i - 1, which sees the noisy block
  bidirectionally and the clean earlier blocks;
- at a block start i = kB (megabd3's own rule for the [x_t ; x0] layout, not copied from Fast-dLLM v2's
  code): the clean stream's state at i - 1 (the last token of the previous clean
  block), which sees exactly the clean prefix. That is a valid conditional of x_i (it ignores the
  unmasked tokens of its own block), so the NELBO stays an upper bound. At L' = 1 every position is a
  block start and the model is exactly the causal LM: the BD3 NELBO equals the AR NLL.
- position 0 has no predecessor and uses its own noisy-stream state.

With the KV cache the block-start state is the last row of the previous ``store_block`` call (the
same clean-stream state), kept on the cache as ``shift_carry``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.errors import UserError


def shift_sources(spec: AttentionSpec, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """Row of the trunk output ([2L] rows for bd3, [L] otherwise) whose state predicts each output position
    lo..hi-1 (positions in the noisy half)."""
    i = torch.arange(lo, hi, device=device)
    src = i - 1
    if spec.kind == "bd3":
        src = torch.where(i % spec.block_size == 0, spec.seq_len + i - 1, src)
    return torch.where(i == 0, i, src)


class ShiftedLogitsMixin:
    """Overrides ``forward`` and ``_cached_forward`` of a :class:`BD3Transformer` without conditioning rows
    (the llama backbone) when ``cfg.model.shift_logits`` is set; causal calls are never shifted."""

    @property
    def shift(self) -> bool:
        return bool(getattr(self.cfg.model, "shift_logits", False))

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: torch.Tensor, attn: AttentionSpec,
                sigma: Optional[torch.Tensor] = None, logits_range: Optional[tuple] = None,
                cache: Any = None, cache_mode: Optional[str] = None) -> torch.Tensor:
        if not self.shift or attn.kind == "causal":
            return super().forward(input_ids, position_ids, attn, sigma, logits_range, cache, cache_mode)  # type: ignore[misc]
        if cache is not None:  # cached calls go through _cached_forward, which carries the block-start state
            raise ValueError("shifted logits: call denoise_block/store_block for KV-cached forwards, not forward(cache=...)")
        if attn.kind == "bd3" and position_ids.shape[-1] != 2 * attn.seq_len:
            raise ValueError(f"bd3 input must have 2L = {2 * attn.seq_len} tokens, found {position_ids.shape[-1]}")
        h = self._trunk(input_ids, position_ids, attn, sigma, None, None)  # type: ignore[attr-defined]
        if not self.post_process:  # type: ignore[attr-defined]
            return h
        lo, hi = logits_range if logits_range is not None else (0, attn.seq_len)
        if not 0 <= lo <= hi <= attn.seq_len:  # only the noisy half has (shifted) denoiser logits
            raise ValueError(f"shifted logits: logits_range {logits_range} must lie in [0, {attn.seq_len}]")
        return self._head(h.index_select(0, shift_sources(attn, lo, hi, h.device)), None)  # type: ignore[attr-defined]

    def _cached_forward(self, cache: Any, ids: torch.Tensor, position_start: int, mode: str,
                        kind: str, positions: Optional[torch.Tensor] = None, store_tokens: int = 0) -> torch.Tensor:
        if not self.shift or kind == "causal":
            return super()._cached_forward(cache, ids, position_start, mode, kind, positions,  # type: ignore[misc]
                                           store_tokens)
        if not (self.pre_process and self.post_process):  # type: ignore[attr-defined]
            raise UserError("KV-cached sampling needs the whole model on one stage; load the checkpoint "
                            "with parallel.pipeline_parallel=1")
        b, n = ids.shape
        pos = torch.arange(position_start, position_start + n, device=ids.device).expand(b, n)
        h = self._trunk(ids, pos, AttentionSpec("full", n), None, cache, mode, store_tokens)  # type: ignore[attr-defined]
        if store_tokens:  # store_denoise: the clean rows' last state is the noisy block's block-start state
            n1 = store_tokens
            cache.shift_carry = (position_start + n1 - 1, h[n1 - 1:n1].detach())
            return self._head(h[n1 - 1:-1], None, positions)  # type: ignore[attr-defined]
        if position_start == 0:
            first = h[:1]
        else:
            carry = getattr(cache, "shift_carry", None)
            if carry is None or carry[0] != position_start - 1:
                raise UserError(f"shifted logits at position {position_start} need the clean state of position "
                                f"{position_start - 1} from the previous store_block call; store blocks in order")
            first = carry[1]
        if mode == "store":
            cache.shift_carry = (position_start + n - 1, h[-1:].detach())
        return self._head(torch.cat([first, h[:-1]], 0), None, positions)  # type: ignore[attr-defined]
