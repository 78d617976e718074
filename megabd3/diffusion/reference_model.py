"""A small pure-torch transformer implementing the ``model_fn`` interface (docs/interfaces.md).

    model(input_ids[b, S], position_ids[b, S], attn: AttentionSpec, sigma: Tensor[b] | None,
          logits_range: (start, end) | None) -> float32 logits [b, S_out, V]

Dense attention with the boolean mask of :func:`megabd3.diffusion.masks.attention_mask` (the rule
every real backend is tested against), rotary embeddings from the explicit position ids (so the two
halves of a BD3 input get positions 0..L-1 each, as invariant 2 requires), optional sigma
conditioning (a learned shift of every layer's input, enough to make the output depend on sigma).
It exists so the objectives, samplers and training loop can be tested without megatron.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megabd3.diffusion.masks import AttentionSpec, attention_mask


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Apply RoPE to x [b, h, S, d] at integer positions [b, S] (rotate-half convention)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    angles = positions.float()[:, None, :, None] * inv_freq  # [b, 1, S, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, rope_base: float) -> None:
        super().__init__()
        self.heads, self.rope_base = heads, rope_base
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return h + self.mlp(self.norm2(h))


class ReferenceTransformer(nn.Module):
    """Tiny dense-attention transformer with the model_fn call signature."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 32,
        layers: int = 2,
        heads: int = 2,
        time_conditioning: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.time_conditioning = time_conditioning
        self.embed = nn.Embedding(vocab_size, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, heads, rope_base) for _ in range(layers))
        self.sigma_proj = nn.Linear(1, hidden) if time_conditioning else None
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn: AttentionSpec,
        sigma: Optional[torch.Tensor] = None,
        logits_range: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        if input_ids.shape[1] != attn.input_len:
            raise ValueError(f"input length {input_ids.shape[1]} != attention spec length {attn.input_len}")
        h = self.embed(input_ids)
        if self.sigma_proj is not None and sigma is not None:
            # log1p keeps the conditioning input O(1) over sigma in [0, sigma_max].
            h = h + self.sigma_proj(torch.log1p(sigma.float())[:, None])[:, None, :]
        mask = attention_mask(attn, device=h.device)
        for block in self.blocks:
            h = block(h, position_ids, mask)
        if logits_range is not None:
            h = h[:, logits_range[0] : logits_range[1]]
        return self.head(self.norm(h)).float()


def init_reference_model(vocab_size: int, seed: int = 0, **kw) -> ReferenceTransformer:
    """A deterministic reference model (weights from ``seed``), in eval mode."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = ReferenceTransformer(vocab_size, **kw)
    finally:
        torch.random.set_rng_state(gen_state)
    # Default init gives near-uniform logits; scale the head so tests see a peaked, input-dependent model.
    with torch.no_grad():
        model.head.weight.mul_(4.0)
    return model.eval()
