"""A tiny dense-attention transformer implementing both model interfaces the samplers use.

- ``forward(input_ids, position_ids, attn, sigma, logits_range)`` (the ``model_fn`` of
  docs/interfaces.md), with the dense boolean mask from :func:`megabd3.diffusion.masks.attention_mask`;
- the KV-cache API of ``megabd3/model/kv_cache.py``: ``new_cache(batch, window)``,
  ``denoise_block(cache, ids, position_start)`` (reads the cache), ``store_block(cache, ids,
  position_start)`` (appends clean K/V).

It exists so the sampler tests do not depend on the megatron model; the same tests also run against
the real model when it is importable. Rotary embeddings make positions matter, so a wrong position in
either path shows up as different tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megabd3.diffusion.masks import AttentionSpec, attention_mask


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [b, h, n, dh], pos [b, n]."""
    dh = x.shape[-1]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dh // 2, dtype=torch.float32) / (dh // 2))
    ang = pos[:, None, :, None].float() * freqs
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@dataclass
class ToyCache:
    window: int
    keys: List[torch.Tensor] = field(default_factory=list)  # per layer [b, h, n, dh], post-RoPE
    values: List[torch.Tensor] = field(default_factory=list)

    def context(self, layer: int, block_len: int):
        if len(self.keys) <= layer:
            return None, None
        keep = self.window - block_len  # the noisy block + the most recent clean tokens fit the window
        return self.keys[layer][:, :, -keep:], self.values[layer][:, :, -keep:]


class ToyLM(nn.Module):
    def __init__(self, vocab_size: int, d: int = 32, heads: int = 2, layers: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.heads, self.d = vocab_size, heads, d
        self.emb = nn.Embedding(vocab_size, d)
        self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(layers)])
        self.out = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(layers)])
        self.head = nn.Linear(d, vocab_size)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / math.sqrt(p.shape[-1])))
        self.eval()

    # -- shared layer math -------------------------------------------------------------------
    def _split(self, i: int, h: torch.Tensor, pos: torch.Tensor):
        b, n, _ = h.shape
        q, k, v = self.qkv[i](F.layer_norm(h, (self.d,))).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return _rope(q, pos), _rope(k, pos), v

    def _finish(self, i: int, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = a.shape
        h = h + self.out[i](a.transpose(1, 2).reshape(b, n, self.d))
        return h + self.mlp[i](F.layer_norm(h, (self.d,)))

    def forward(self, input_ids, position_ids, attn: AttentionSpec, sigma=None, logits_range=None):
        mask = attention_mask(attn, device=input_ids.device)
        h = self.emb(input_ids)
        for i in range(len(self.qkv)):
            q, k, v = self._split(i, h, position_ids)
            h = self._finish(i, h, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        if logits_range is not None:
            h = h[:, logits_range[0] : logits_range[1]]
        return self.head(F.layer_norm(h, (self.d,))).float()

    # -- KV cache ------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, window: int) -> ToyCache:
        return ToyCache(window=window)

    def _block(self, cache: ToyCache, ids: torch.Tensor, position_start: int, store: bool):
        b, n = ids.shape
        pos = torch.arange(position_start, position_start + n).expand(b, n)
        h = self.emb(ids)
        for i in range(len(self.qkv)):
            q, k, v = self._split(i, h, pos)
            ck, cv = cache.context(i, n)
            kk = k if ck is None else torch.cat([ck, k], 2)
            vv = v if cv is None else torch.cat([cv, v], 2)
            if store:
                if len(cache.keys) <= i:
                    cache.keys.append(k)
                    cache.values.append(v)
                else:
                    cache.keys[i] = torch.cat([cache.keys[i], k], 2)[:, :, -cache.window :]
                    cache.values[i] = torch.cat([cache.values[i], v], 2)[:, :, -cache.window :]
            h = self._finish(i, h, F.scaled_dot_product_attention(q, kk, vv))
        return h

    def denoise_block(self, cache: ToyCache, ids: torch.Tensor, position_start: int, kind: str = "bd3",
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert kind == "causal" and ids.shape[1] == 1 or kind == "bd3"  # the toy needs no causal mask inside a block
        h = self._block(cache, ids, position_start, store=False)
        if positions is not None:  # only these rows [b, k] of the block
            h = h[torch.arange(h.shape[0])[:, None], positions]
        return self.head(F.layer_norm(h, (self.d,))).float()

    def store_block(self, cache: ToyCache, ids: torch.Tensor, position_start: int, kind: str = "bd3") -> torch.Tensor:
        assert kind == "causal" and ids.shape[1] == 1 or kind == "bd3"
        h = self._block(cache, ids, position_start, store=True)
        return self.head(F.layer_norm(h, (self.d,))).float()
