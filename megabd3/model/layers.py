"""Transformer layer of the reference DDiT backbone on megatron-core parallel linears (spec section 4).

Per layer (adaLN on): ``c`` is the conditioning vector of each sequence,

    (sh1, sc1, g1, sh2, sc2, g2) = adaLN(c)                      # Linear(cond, 6d), zero-init
    x = x + g1 * dropout(W_o attn(RoPE(W_qkv (LN1(x)(1+sc1)+sh1))))
    x = x + g2 * dropout(W2 gelu_tanh(W1 (LN2(x)(1+sc2)+sh2) + b1) + b2)

Without adaLN (AR) the modulation is absent (shift 0, scale 0, gate 1). W_qkv/W_o are megatron's
Column/RowParallelLinear without bias inside ``SelfAttention``, the MLP megatron's ``MLP`` with bias.

Pipeline stages exchange one tensor, so the conditioning travels inside it: with adaLN the hidden
state is ``[R cond rows ; S token rows]`` ([R+S, b, d], R = ceil(cond_dim / d)) and every layer reads
``c`` from the first R rows and passes them on untouched. Gradients reach the first stage's sigma
embedder through the normal pipeline backward, with no extra synchronisation.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer, get_transformer_layer_offset
from torch import nn


def cond_rows(cond_dim: int, hidden: int) -> int:
    """Rows of the hidden tensor that carry the conditioning vector."""
    return math.ceil(cond_dim / hidden)


def pack_cond(c: torch.Tensor, hidden: int) -> torch.Tensor:
    """[b, cond] -> [R, b, hidden] (zero-padded)."""
    b, cond = c.shape
    R = cond_rows(cond, hidden)
    padded = F.pad(c, (0, R * hidden - cond))
    return padded.view(b, R, hidden).transpose(0, 1).contiguous()


def unpack_cond(rows: torch.Tensor, cond_dim: int) -> torch.Tensor:
    """[R, b, hidden] -> [b, cond]."""
    R, b, h = rows.shape
    return rows.transpose(0, 1).reshape(b, R * h)[:, :cond_dim]


class FP32LayerNorm(nn.Module):
    """LayerNorm with weight and no bias, computed in float32 (the reference's custom LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()
        return y.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """sigma [b] -> [b, cond]: 256-d sinusoidal features -> Linear -> SiLU -> Linear (reference)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


@dataclass
class BD3LayerSubmodules:
    self_attention: Union[ModuleSpec, type]
    mlp: Union[ModuleSpec, type]


class BD3Layer(MegatronModule, BaseTransformerLayer):
    """One DDiT block; built by megatron's ``TransformerBlock`` from a layer spec.

    ``config`` carries our extra attributes set by the model builder: ``bd3_adaln``,
    ``bd3_cond_dim``, ``bd3_recompute``.
    """

    def __init__(self, config: TransformerConfig, submodules: BD3LayerSubmodules, layer_number: int = 1,
                 pg_collection: Any = None, vp_stage: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(config=config)
        from megatron.core.parallel_state import get_pipeline_model_parallel_rank

        # Global 1-based layer number, as megatron's TransformerLayer computes it.
        self.layer_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, get_pipeline_model_parallel_rank())
        d = config.hidden_size
        self.adaln = config.bd3_adaln
        self.cond_dim = config.bd3_cond_dim
        self.norm1 = FP32LayerNorm(d)
        self.norm2 = FP32LayerNorm(d)
        self.self_attention = build_module(submodules.self_attention, config=config,
                                           layer_number=self.layer_number)
        mlp_config = copy.copy(config)
        mlp_config.add_bias_linear = True  # the reference MLP has biases, attention has none
        self.mlp = build_module(submodules.mlp, config=mlp_config)
        self.adaLN_modulation = nn.Linear(self.cond_dim, 6 * d) if self.adaln else None
        self.dropout = config.hidden_dropout

    def _forward(self, hidden_states: torch.Tensor, attention_mask: Any,
                 rotary_pos_emb: Optional[torch.Tensor]) -> torch.Tensor:
        if self.adaln:
            R = cond_rows(self.cond_dim, self.config.hidden_size)
            rows, x = hidden_states[:R], hidden_states[R:]
            mods = self.adaLN_modulation(unpack_cond(rows, self.cond_dim))[None]  # [1, b, 6d]
            sh1, sc1, g1, sh2, sc2, g2 = mods.chunk(6, dim=-1)
        else:
            x = hidden_states
        h = self.norm1(x)
        if self.adaln:
            h = h * (1 + sc1) + sh1
        a, a_bias = self.self_attention(h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        if a_bias is not None:
            a = a + a_bias
        a = F.dropout(a, self.dropout, self.training)
        x = x + (g1 * a if self.adaln else a)
        h = self.norm2(x)
        if self.adaln:
            h = h * (1 + sc2) + sh2
        m, m_bias = self.mlp(h)
        if m_bias is not None:
            m = m + m_bias
        m = F.dropout(m, self.dropout, self.training)
        x = x + (g2 * m if self.adaln else m)
        return torch.cat([rows, x], dim=0) if self.adaln else x

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, context: Any = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, **kwargs: Any) -> tuple:
        if self.config.bd3_recompute and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing keeps the (non-tensor) attention call object and restores
            # the CPU/CUDA RNG so dropout masks are identical in the recomputation.
            out = torch.utils.checkpoint.checkpoint(self._forward, hidden_states, attention_mask,
                                                    rotary_pos_emb, use_reentrant=False)
        else:
            out = self._forward(hidden_states, attention_mask, rotary_pos_emb)
        return out, context
