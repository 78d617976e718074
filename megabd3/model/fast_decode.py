"""KV-cached sampling forwards of the DiT backbone without megatron's per-call machinery (issue 13, item 4).

A denoising call of a 4-token block does about 0.3 ms of arithmetic per layer on CPU; through megatron's
``TransformerLayer`` -> ``SelfAttention`` -> ``ColumnParallelLinear`` -> autograd ``Function`` stack it
took 1.4 ms. At that size a forward is a chain of small kernels, so the cost is the number of kernels,
not their arithmetic. This module computes the same function with about a third of the kernels:

- **Folded weights (per sampling run).** An untimed model (BD3-LM/MDLM zero sigma) has constant adaLN
  modulations, so ``W (LN(x) w (1 + scale) + shift)`` is ``LN0(x) W'^T + b'`` with the LayerNorm weight,
  scale and shift folded into ``W'``/``b'``, and the gates ``g * (x W^T + b)`` fold into the linear's
  rows. The folds are computed in float64 and rounded once; the result differs from the megatron path by
  rounding only (~1e-6 relative in the logits, tested) -- the same function, not the same bits.
- **Fewer kernels.** ``addmm`` carries biases and residual adds; RoPE runs on q and k at once. Weights
  are stored [in, out] contiguous (a CPU GEMV of a few rows streams them up to 1.3x faster than
  megatron's transposed view). Folding RoPE's rotate-half into the q/k rows as well was tried and was
  slower: on CPU a small model's step is bound by the bytes it streams (weights + cached keys), not the
  kernel count, once the kernels are this few.
- **The rotary table** is built once per run for a range of positions and sliced per call.

Two caches serve it (both per sampling run; weights loaded into the model object later are always used):

- :class:`~megabd3.model.kv_cache.KVCache` (default): attention over exactly the kept keys, the least
  arithmetic -- the CPU path.
- :class:`~megabd3.model.static_cache.StaticKVCache`: a ring buffer of fixed shape whose call reads only
  device tensors, so a call is capturable in a **CUDA graph**. With ``graphs=True`` (the default on CUDA,
  ``sampling.cuda_graphs``) each call shape is captured once and replayed: one launch per denoising step
  instead of ~60 kernel launches. On CPU the same static forward runs eagerly (that is how it is tested).

Used only where it is exact: TP = PP = 1, eval mode with autograd off, the DiT backbone (not the llama
layers, which are megatron's own ``TransformerLayer``), no time conditioning, no module hooks or ZeRO-3
partitioned parameters. Everything else, or ``MEGABD3_FAST_DECODE=0``, takes the megatron path (and a
:class:`StaticKVCache` is then refused when the cache is made, see :func:`static_reason`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megabd3.model.layers import unpack_cond

ENV = "MEGABD3_FAST_DECODE"


def static_reason(model: Any) -> Optional[str]:
    """Why the fast path cannot serve ``model`` (None when it can); the parts fixed for a sampling run."""
    from megabd3.model.layers import BD3Layer

    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()):
        return "module hooks are registered (they would be skipped)"
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        return "ZeRO-3 partitioned parameters"
    if getattr(model, "time_conditioning", True):
        return "a time-conditioned model"
    cfg = model.config
    if cfg.sequence_parallel or cfg.tensor_model_parallel_size != 1 or not (model.pre_process and model.post_process):
        return "tensor/pipeline/sequence parallelism"
    if not all(type(layer) is BD3Layer for layer in model.decoder.layers) or model.decoder.final_layernorm is not None:
        return "not the DiT backbone"
    if any(layer.mlp.config.gated_linear_unit for layer in model.decoder.layers):
        return "a gated MLP"
    return None


def eligible(model: Any, cache: Any) -> bool:
    """Whether :func:`cached_forward` serves this call (the fixed parts are checked once per cache)."""
    from megabd3.model.kv_cache import KVCache
    from megabd3.model.static_cache import StaticKVCache

    if isinstance(cache, StaticKVCache):  # no megatron fallback exists for it: refuse instead
        reason = cache.__dict__.get("_fast_decode_reason", ...)
        if reason is ...:
            reason = cache.__dict__["_fast_decode_reason"] = static_reason(model)
        if reason is None and torch.is_grad_enabled():
            reason = "autograd is on"
        if reason is None and model.training:
            reason = "the model is in training mode"
        if reason is not None:
            from megabd3.errors import UserError

            raise UserError(f"the fixed-shape (CUDA-graph) KV cache needs the fast decoding path, but {reason}: "
                            f"sample under torch.no_grad() in eval mode, or set sampling.cuda_graphs=off")
        return True
    if torch.is_grad_enabled() or model.training:
        return False
    if not isinstance(cache, KVCache):
        return False
    ok = cache.__dict__.get("_fast_decode_ok")
    if ok is None:
        ok = cache.__dict__["_fast_decode_ok"] = static_reason(model) is None
    return ok


@dataclass
class _Layer:
    """One layer's folded weights, [in, out] contiguous; biases None when absent."""

    eps1: float
    eps2: float
    w_in: torch.Tensor  # -> [q (H heads), k (G), v (G)]
    b_in: torch.Tensor
    w_proj: torch.Tensor
    b_proj: Optional[torch.Tensor]
    w_fc1: torch.Tensor
    b_fc1: torch.Tensor
    w_fc2: torch.Tensor
    b_fc2: Optional[torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    layer_number: int
    scale: float


class Folded:
    """The trunk and head of ``model`` with the constant modulations, norms and gates folded in
    (float64 folds, rounded once to the model dtype)."""

    def __init__(self, model: Any, dtype: torch.dtype, device: torch.device) -> None:
        f64 = torch.float64
        d = model.config.hidden_size
        self.d, self.dtype = d, dtype
        mods: List[Optional[Tuple[torch.Tensor, ...]]] = [None] * len(model.decoder.layers)
        final: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if model.adaln:
            # the conditioning every call prepends: sigma = 0 for an untimed model, the same for every row
            rows = model._embed(torch.zeros(1, 1, dtype=torch.long, device=device), None)[:model.n_cond_rows]
            c = unpack_cond(rows, model.cond_dim)
            mods = [tuple(m[0].to(f64) for m in layer.adaLN_modulation(c).chunk(6, dim=-1))
                    for layer in model.decoder.layers]
            final = tuple(m[0].to(f64) for m in model.final_adaLN(c).chunk(2, dim=-1))
        zero, one = torch.zeros(d, dtype=f64, device=device), torch.ones(d, dtype=f64, device=device)

        def out(w: torch.Tensor) -> torch.Tensor:
            return w.t().to(dtype).contiguous()

        def vec(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if v is None else v.to(dtype).contiguous()

        self.layers: List[_Layer] = []
        for layer, mod in zip(model.decoder.layers, mods):
            sh1, sc1, g1, sh2, sc2, g2 = mod if mod is not None else (zero, zero, one, zero, zero, one)
            attn, mlp = layer.self_attention, layer.mlp
            H, G = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
            hn = attn.hidden_size_per_attention_head
            per = H // G
            w = attn.linear_qkv.weight.to(f64).view(G, (per + 2) * hn, d)  # megatron: per group [q heads, k, v]
            wq, wk, wv = w[:, :per * hn].reshape(-1, d), w[:, per * hn:(per + 1) * hn].reshape(-1, d), w[:, (per + 1) * hn:].reshape(-1, d)
            bias = getattr(attn.linear_qkv, "bias", None)
            if bias is not None:
                b = bias.to(f64).view(G, (per + 2) * hn)
                bq, bk, bv = b[:, :per * hn].reshape(-1), b[:, per * hn:(per + 1) * hn].reshape(-1), b[:, (per + 1) * hn:].reshape(-1)
            else:
                bq, bk, bv = (torch.zeros(x.shape[0], dtype=f64, device=device) for x in (wq, wk, wv))
            w_all = torch.cat([wq, wk, wv])
            b_all = torch.cat([bq, bk, bv])
            scale_in = layer.norm1.weight.to(f64) * (1 + sc1)
            w_p = attn.linear_proj.weight.to(f64)
            b_p = getattr(attn.linear_proj, "bias", None)
            w1, b1 = mlp.linear_fc1.weight.to(f64), mlp.linear_fc1.bias
            w2, b2 = mlp.linear_fc2.weight.to(f64), mlp.linear_fc2.bias
            scale_mlp = layer.norm2.weight.to(f64) * (1 + sc2)
            b1 = (b1.to(f64) if b1 is not None else torch.zeros(w1.shape[0], dtype=f64, device=device)) + w1 @ sh2
            self.layers.append(_Layer(
                eps1=layer.norm1.eps, eps2=layer.norm2.eps,
                w_in=out(w_all * scale_in), b_in=vec(b_all + w_all @ sh1),
                w_proj=out(g1[:, None] * w_p), b_proj=vec(None if b_p is None else g1 * b_p.to(f64)),
                w_fc1=out(w1 * scale_mlp), b_fc1=vec(b1),
                w_fc2=out(g2[:, None] * w2), b_fc2=vec(None if b2 is None else g2 * b2.to(f64)),
                act=mlp.config.activation_func, layer_number=attn.core_attention.layer_number,
                scale=attn.core_attention.scale))
            self.heads, self.groups, self.head_dim = H, G, hn
        shift, scale = final if final is not None else (zero, zero)
        w_h = model.output_layer.weight.to(f64)
        b_h = model.output_layer.bias
        self.eps_f = model.final_norm.eps
        self.w_head = out(w_h * (model.final_norm.weight.to(f64) * (1 + scale)))
        self.b_head = vec((b_h.to(f64) if b_h is not None else 0.0) + w_h @ shift)
        self.embedding = model.embedding.weight  # TP = 1: the whole table

    def tensors(self) -> List[Optional[torch.Tensor]]:
        out: List[Optional[torch.Tensor]] = []
        for L in self.layers:
            out += [L.w_in, L.b_in, L.w_proj, L.b_proj, L.w_fc1, L.b_fc1, L.w_fc2, L.b_fc2]
        return out + [self.w_head, self.b_head]

    def update(self, other: "Folded") -> bool:
        """Copy ``other``'s values into these tensors (their addresses, which captured graphs read, stay);
        False when the layouts differ or the embedding is another tensor."""
        mine, theirs = self.tensors(), other.tensors()
        if (len(mine) != len(theirs) or self.embedding.data_ptr() != other.embedding.data_ptr()
                or any((a is None) != (b is None) or (a is not None and a.shape != b.shape) for a, b in zip(mine, theirs))):
            return False
        for a, b in zip(mine, theirs):
            if a is not None:
                a.copy_(b)
        return True

    def norm(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """FP32LayerNorm without its weight (folded into the next linear)."""
        if x.dtype == torch.float32:
            return F.layer_norm(x, (self.d,), eps=eps)
        return F.layer_norm(x.float(), (self.d,), eps=eps).to(x.dtype)

    def trunk(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              attend: Callable[[_Layer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states [n, b, d] of ``ids`` [b, n]; ``attend(layer, q, k, v)`` ([b, heads, n, hn]) is the
        cache's attention; ``cos``/``sin`` [n, 1, 1, hn] the rotary factors of the n positions."""
        b, n = ids.shape
        H, G, hn = self.heads, self.groups, self.head_dim
        half = hn // 2
        x = F.embedding(ids.t(), self.embedding).reshape(n * b, self.d)
        for L in self.layers:
            y = torch.addmm(L.b_in, self.norm(x, L.eps1), L.w_in).view(n, b, H + 2 * G, hn)
            qk = y[:, :, :H + G]  # q and k heads side by side: RoPE on both at once (rotate-half)
            qk = torch.addcmul(qk * cos, torch.cat([-qk[..., half:], qk[..., :half]], -1), sin)
            q, k = qk[:, :, :H].permute(1, 2, 0, 3), qk[:, :, H:].permute(1, 2, 0, 3)
            ctx = attend(L, q, k, y[:, :, H + G:H + 2 * G].permute(1, 2, 0, 3))
            x = torch.addmm(x, ctx.permute(2, 0, 1, 3).reshape(n * b, H * hn), L.w_proj)  # x + g1 * attn
            if L.b_proj is not None:
                x = x + L.b_proj
            inter = L.act(torch.addmm(L.b_fc1, self.norm(x, L.eps2), L.w_fc1))
            x = torch.addmm(x, inter, L.w_fc2)  # x + g2 * mlp
            if L.b_fc2 is not None:
                x = x + L.b_fc2
        return x.view(n, b, self.d)

    def head(self, x: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits [b, k, V] (model dtype) of the hidden rows x [m, b, d] (all m, or ``positions`` [b, k])."""
        xb = x.transpose(0, 1)
        if positions is not None:
            xb = xb[torch.arange(xb.shape[0], device=xb.device)[:, None], positions]
        b, k = xb.shape[0], xb.shape[1]
        h = self.norm(xb.reshape(b * k, self.d), self.eps_f)
        return torch.addmm(self.b_head, h, self.w_head).view(b, k, -1)


class RopeTable:
    """cos/sin of megatron's rotary angles for positions [0, n), grown on demand (a function of positions
    alone, so it is kept on the model across runs)."""

    def __init__(self) -> None:
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None

    def ensure(self, need: int, head_dim: int, base: float, dtype: torch.dtype, device: torch.device) -> None:
        from megabd3.model.rope import rotary_freqs

        if self.cos is None or self.cos.shape[0] < need or self.cos.dtype != dtype or self.cos.device != device:
            size = max(need, 2 * (self.cos.shape[0] if self.cos is not None else 256))
            freqs = rotary_freqs(torch.arange(size, device=device)[None], head_dim, base)  # [P, 1, 1, hd]
            self.cos, self.sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)

    def get(self, start: int, n: int, head_dim: int, base: float, dtype: torch.dtype,
            device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        self.ensure(start + n, head_dim, base, dtype, device)
        return self.cos[start:start + n], self.sin[start:start + n]


def rope_table(model: Any) -> RopeTable:
    return model.__dict__.setdefault("_fast_decode_rope", RopeTable())


def folded(model: Any, cache: Any, dtype: torch.dtype, device: torch.device) -> Folded:
    """The run's folded weights, kept with the cache (one sampling run): weights changed between runs (a
    checkpoint loaded into the same object, an EMA swap through p.data) are always re-read. A restarted
    StaticKVCache (its graphs reused by the next run) gets them refreshed into the same tensors."""
    state: Dict[str, Any] = cache.__dict__.setdefault("_fast_decode", {})
    key = (dtype, device)
    if state.get("key") != key:
        state["key"], state["fold"] = key, Folded(model, dtype, device)
    elif cache.__dict__.pop("_refold", False):
        fresh = Folded(model, dtype, device)
        if not state["fold"].update(fresh):  # another layout: new tensors, so the graphs are captured anew
            state["fold"] = fresh
            getattr(cache, "_graphs", {}).clear()
    return state["fold"]


def cached_forward(model: Any, cache: Any, ids: torch.Tensor, position_start: int, mode: str, kind: str,
                   positions: Optional[torch.Tensor] = None, store_tokens: int = 0) -> torch.Tensor:
    """What ``BD3Transformer._cached_forward`` returns, for an :func:`eligible` model and cache."""
    from megabd3.diffusion.masks import AttentionSpec
    from megabd3.model.attention import AttentionCall
    from megabd3.model.static_cache import StaticKVCache

    dtype = model.embedding.weight.dtype
    fold = folded(model, cache, dtype, ids.device)
    if isinstance(cache, StaticKVCache):
        logits = cache.forward(model, fold, ids, position_start, mode, kind, positions, store_tokens)
        return model._mask_padded_vocab(logits.float())
    b, n = ids.shape
    cos, sin = rope_table(model).get(position_start, n, fold.head_dim, model.rope_base, dtype, ids.device)
    call = AttentionCall(AttentionSpec("causal" if kind == "causal" else "full", n), model.backend, model.tile,
                         cache, mode, store_tokens)
    x = fold.trunk(ids, cos, sin, lambda L, q, k, v: cache.attend(L.layer_number, q, k, v, call, L.scale))
    if store_tokens:  # store_denoise: logits of the noisy rows only
        x = x[store_tokens:]
    if positions is not None and positions.shape[-1] == 0:  # a store call whose logits nobody reads
        return x.new_zeros(b, 0, fold.w_head.shape[1], dtype=torch.float32)
    return model._mask_padded_vocab(fold.head(x, positions).float())
