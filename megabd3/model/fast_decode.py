"""KV-cached sampling forwards of the DiT backbone without megatron's per-call machinery (issue 13, item 4).

A denoising call of a 4-token block does about 0.3 ms of arithmetic per layer on CPU; through megatron's
``TransformerLayer`` -> ``SelfAttention`` -> ``ColumnParallelLinear`` -> autograd ``Function`` stack it
took 1.4 ms. This module runs the same layers with the same torch operations, in the same order, on the
same parameter tensors, so its hidden states and cached keys/values are bitwise equal to the megatron
path's (tested with ``torch.equal``; the logits to ~1e-7, see the output head below), and it removes what
is not compute:

- the adaLN modulations of an untimed model (BD3-LM/MDLM zero sigma) are constant: computed once per
  sampling run by the modules themselves and reused, as is the final layer's shift/scale;
- the rotary cos/sin table is built once for a range of positions and sliced per call (megatron recomputes
  cos/sin of the angles in every layer of every call);
- linears are ``torch.matmul(x, W.t())`` (+ bias) exactly as megatron's TP=1 linear ``Function`` computes
  them, without the autograd ``Function``/TP-group dispatch around it;
- on CPU the output head (V x d, the largest read of a one-row call) multiplies a contiguous transposed
  copy, which a CPU GEMV streams 2.4x faster; only its summation order differs.

Weight-derived values are kept per KV cache (one sampling run), never across runs, so weights loaded into
the same model object later are always used.

Used only where it is exact: TP = PP = 1, eval mode with autograd off, the DiT backbone (not the llama
layers, which are megatron's own ``TransformerLayer``), no time conditioning, no module hooks or ZeRO-3
partitioned parameters, our ``KVCache``. Everything else, or ``MEGABD3_FAST_DECODE=0``, takes the megatron
path. CUDA-graph capture of the step is not implemented (no GPU was available to test it).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from megabd3.model.layers import unpack_cond

ENV = "MEGABD3_FAST_DECODE"


def _static_ok(model: Any, cache: Any) -> bool:
    """The parts of :func:`eligible` fixed for a sampling run (checked once per KV cache)."""
    from megabd3.model.layers import BD3Layer

    ok = cache.__dict__.get("_fast_decode_ok")
    if ok is None:
        # hooks (ZeRO-3 parameter gathering, quantisers, user hooks) would be skipped by the direct matmuls
        hooked = any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        ok = (not hooked and not any(hasattr(p, "ds_tensor") for p in model.parameters())
              and not model.time_conditioning and not model.config.sequence_parallel
              and model.config.tensor_model_parallel_size == 1 and model.pre_process and model.post_process
              and all(type(layer) is BD3Layer for layer in model.decoder.layers)
              and model.decoder.final_layernorm is None)
        cache.__dict__["_fast_decode_ok"] = ok
    return ok


def eligible(model: Any, cache: Any) -> bool:
    """Whether :func:`cached_forward` computes exactly what the megatron path computes for this call."""
    from megabd3.model.kv_cache import KVCache

    if os.environ.get(ENV, "1") == "0" or torch.is_grad_enabled() or model.training:
        return False
    return isinstance(cache, KVCache) and _static_ok(model, cache)


class _Constants:
    """Per (batch size, dtype, device): cond rows, per-layer modulations, final shift/scale."""

    def __init__(self, model: Any, b: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows: Optional[torch.Tensor] = None
        self.mods: list = []
        self.final: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if not model.adaln:
            return
        ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        R = model.n_cond_rows
        self.rows = model._embed(ids, None)[:R].to(dtype)  # the conditioning rows every call prepends
        c = unpack_cond(self.rows, model.cond_dim)
        for layer in model.decoder.layers:
            self.mods.append(layer.adaLN_modulation(c)[None].chunk(6, dim=-1))
        shift, scale = model.final_adaLN(c)[None].chunk(2, dim=-1)
        self.final = (shift, scale)


class _Rope:
    """cos/sin of megatron's rotary angles for positions [0, n), grown on demand and sliced per call."""

    def __init__(self) -> None:
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None

    def get(self, start: int, n: int, head_dim: int, base: float, dtype: torch.dtype,
            device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        from megabd3.model.rope import rotary_freqs

        need = start + n
        if self.cos is None or self.cos.shape[0] < need or self.cos.dtype != dtype or self.cos.device != device:
            size = max(need, 2 * (self.cos.shape[0] if self.cos is not None else 256))
            freqs = rotary_freqs(torch.arange(size, device=device)[None], head_dim, base)  # [P, 1, 1, hd]
            # megatron: (torch.cos(freqs) * mscale).to(t.dtype) with mscale = 1, elementwise per position
            self.cos, self.sin = (torch.cos(freqs) * 1.0).to(dtype), (torch.sin(freqs) * 1.0).to(dtype)
        return self.cos[start:need], self.sin[start:need]


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # megatron's _apply_rotary_pos_emb_bshd (non-interleaved rotate-half; the pass-through part is empty)
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return (t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)


def _linear(x: torch.Tensor, layer: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """megatron's TP=1 linear forward: matmul with the transposed weight; the bias is added by the linear
    itself unless the module returns it for the caller to add (skip_bias_add), as megatron does."""
    # torch.matmul of [s, b, d] by W^T folds the leading dims and calls mm: doing that here is bitwise the same
    # and skips matmul's shape dispatch
    out = torch.mm(x.reshape(-1, x.shape[-1]), layer.weight.t()).view(*x.shape[:-1], -1)
    bias = getattr(layer, "bias", None)
    if bias is not None and not layer.skip_bias_add:
        return out + bias, None
    return out, bias


def _norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return norm.forward(x)  # layers.FP32LayerNorm itself, without nn.Module.__call__'s hook dispatch


def _layer(layer: Any, x: torch.Tensor, mods: Optional[tuple], cos: torch.Tensor, sin: torch.Tensor,
           call: Any) -> torch.Tensor:
    """BD3Layer._forward with SelfAttention/MLP inlined (same operations, same order)."""
    attn, mlp = layer.self_attention, layer.mlp
    h = _norm(layer.norm1, x)
    if mods is not None:
        sh1, sc1, g1, sh2, sc2, g2 = mods
        h = h * (1 + sc1) + sh1
    s, b = h.shape[0], h.shape[1]
    mixed, _ = _linear(h, attn.linear_qkv)
    groups = attn.num_query_groups_per_partition
    per_group = attn.num_attention_heads_per_partition // groups
    hn = attn.hidden_size_per_attention_head
    mixed = mixed.view(s, b, groups, (per_group + 2) * hn)
    q, k, v = torch.split(mixed, [per_group * hn, hn, hn], dim=3)
    q = q.reshape(s, b, -1, hn)
    # megatron then concatenates the (empty) non-rotary part: a copy with the same values and layout
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    core = attn.core_attention
    qp, kp, vp = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    ctx = call.cache.attend(core.layer_number, qp, kp, vp, call, core.scale)
    ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, -1)
    a, a_bias = _linear(ctx, attn.linear_proj)
    if a_bias is not None:
        a = a + a_bias
    x = x + (g1 * a if mods is not None else a)
    h = _norm(layer.norm2, x)
    if mods is not None:
        h = h * (1 + sc2) + sh2
    inter, b1 = _linear(h, mlp.linear_fc1)
    if b1 is not None:
        inter = inter + b1
    inter = mlp.config.activation_func(inter)
    m, m_bias = _linear(inter, mlp.linear_fc2)
    if m_bias is not None:
        m = m + m_bias
    return x + (g2 * m if mods is not None else m)


def cached_forward(model: Any, cache: Any, ids: torch.Tensor, position_start: int, mode: str, kind: str,
                   positions: Optional[torch.Tensor] = None, store_tokens: int = 0) -> torch.Tensor:
    """What ``BD3Transformer._cached_forward`` returns, for an :func:`eligible` model and cache."""
    from megabd3.diffusion.masks import AttentionSpec
    from megabd3.model.attention import AttentionCall

    # Weight-derived values (adaLN constants, the head copy) live with the cache, i.e. one sampling run: weights
    # changed between runs (a checkpoint loaded into the same object, an EMA swap through p.data) are always
    # re-read. Only the rotary table, a function of positions alone, is kept on the model.
    state: Dict[str, Any] = cache.__dict__.setdefault("_fast_decode", {"const": {}})
    rope: _Rope = model.__dict__.setdefault("_fast_decode_rope", _Rope())
    b, n = ids.shape
    x = model.embedding(ids).transpose(0, 1).contiguous()  # [n, b, d], as _embed
    key = (b, x.dtype, x.device)
    if key not in state["const"]:
        state["const"] = {key: _Constants(model, b, x.dtype, x.device)}  # one batch size at a time
    const = state["const"][key]
    cos, sin = rope.get(position_start, n, model.head_dim, model.rope_base, x.dtype, x.device)
    call = AttentionCall(AttentionSpec("causal" if kind == "causal" else "full", n), model.backend, model.tile,
                         cache, mode, store_tokens)
    for i, layer in enumerate(model.decoder.layers):
        x = _layer(layer, x, const.mods[i] if const.mods else None, cos, sin, call)
    if store_tokens:  # store_denoise: logits of the noisy rows only
        x = x[store_tokens:]
    if positions is not None and positions.shape[-1] == 0:  # a store call whose logits nobody reads
        return x.new_zeros(b, 0, model.output_layer.weight.shape[0], dtype=torch.float32)
    if positions is not None:
        x = x.transpose(0, 1)[torch.arange(b, device=x.device)[:, None], positions].transpose(0, 1)
    h = _norm(model.final_norm, x)
    if const.final is not None:
        shift, scale = const.final
        h = h * (1 + scale) + shift
    layer = model.output_layer
    if h.device.type == "cpu":
        # the head as a contiguous [d, V] copy (per sampling run): a one-row GEMV over V rows reads it 2.4x
        # faster on CPU than megatron's transposed view (summation order differs: ~1e-7 in the logits, so the
        # logits are allclose, not bitwise, to the megatron path's; the trunk and the cache stay exact).
        # cuBLAS gains nothing from it, so GPUs keep megatron's operation and memory.
        w_t = state.get("head_t")
        if w_t is None:
            w_t = state["head_t"] = layer.weight.detach().t().contiguous()
        logits = torch.mm(h.reshape(-1, h.shape[-1]), w_t).view(*h.shape[:-1], -1)
        if layer.bias is not None:
            logits = logits + layer.bias
    else:
        logits, _ = _linear(h, layer)
    return model._mask_padded_vocab(logits.transpose(0, 1).float())
