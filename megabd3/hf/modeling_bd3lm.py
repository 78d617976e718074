"""BD3-LM / MDLM / AR DiT backbone in plain torch + SDPA (remote code shipped with exported checkpoints).

Parameter names and the order of operations follow the released BD3-LM checkpoints, so this file loads
those checkpoints and ours strictly. No flash-attn, no flex, no megabd3 import.

Calls, as the released sampler makes them:
- training layout (cross_attn): ``model([x_t ; x0], timesteps)`` under the BD3 mask, logits of x_t;
- ``sample_mode=True`` on the plain sequence: the block-causal rule of the x0 stream (block b sees blocks
  <= b), all rows' logits;
- KV cache: ``reset_kv_cache(batch)``, then per block ``model(noisy_block, sample_mode=True)`` (reads the
  cache) and ``model(clean_block, sample_mode=True, store_kv=True)`` (appends it); the context slides
  once it reaches model_length, as released.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

try:  # package-relative inside a transformers remote-code module, plain import when vendored
    from .configuration_bd3lm import BD3LMConfig
except ImportError:  # pragma: no cover
    from configuration_bd3lm import BD3LMConfig


def bd3_mask(n: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[2n, 2n] bool, True = allowed: the block-diffusion rule over [x_t ; x0]."""
    idx = torch.arange(2 * n, device=device)
    q, k = idx[:, None], idx[None, :]
    qc, kc = q >= n, k >= n
    qb, kb = (q - n * qc) // block_size, (k - n * kc) // block_size
    return ((qb == kb) & (qc == kc)) | ((qb > kb) & ~qc & kc) | ((qb >= kb) & qc & kc)


def block_causal_mask(n: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[n, n] bool: the x0-x0 quadrant of :func:`bd3_mask` (a token of block b sees blocks <= b). The
    released sampler runs a BD3 model on the plain sequence with it (``sample_mode=True``, no KV cache)."""
    blk = torch.arange(n, device=device) // block_size
    return blk[:, None] >= blk[None, :]


class LayerNorm(nn.Module):
    """LayerNorm with weight, no bias, computed in fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.layer_norm(x.float(), (self.dim,)) * self.weight.float()).to(x.dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        a = sigma.float()[:, None] * f[None]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], -1).to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        # the released layout's buffer (kept for strict loading); the angles use a float64 inv_freq
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)))
        self.head_dim, self.base = head_dim, float(base)

    def forward(self, n: int, device: torch.device):
        # angles from a float64 inv_freq, positions >= 2**14 reduced mod 2*pi, then cast: the training code's
        # fp32 cos/sin to the last bit (an fp32 inv_freq moves cos by ~6e-5 at position 1024)
        inv = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim))
        pos = torch.arange(n, device=device, dtype=torch.float64)[:, None]
        ang = pos * inv[None]
        ang = torch.where(pos >= (1 << 14), torch.remainder(ang, 2.0 * math.pi), ang)
        emb = torch.cat([ang, ang], -1).float()
        return emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class DDiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float, adaln: bool) -> None:
        super().__init__()
        self.n_heads, self.dropout, self.adaln = n_heads, dropout, adaln
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def _qkv(self, h: torch.Tensor):
        """q, k, v before rotary, [b, n, heads, hd] each."""
        b, n, d = h.shape
        return self.attn_qkv(h).view(b, n, 3, self.n_heads, d // self.n_heads).unbind(2)

    def _attention(self, h: torch.Tensor, rot, mask: Optional[torch.Tensor], causal: bool, cross_attn: bool,
                   cache: Optional[dict]) -> torch.Tensor:
        cos, sin = rot
        if cache is not None:  # this call's tokens follow the cached clean tokens (pre-rotary k/v, as released)
            q, k, v = self._qkv(h)
            if cache.get("k") is not None:
                k, v = torch.cat([cache["k"], k], 1), torch.cat([cache["v"], v], 1)
            if cache.get("store"):
                cache["k"], cache["v"] = k, v
            m, total = q.shape[1], k.shape[1]
            q, k = apply_rotary(q, cos[:, total - m:], sin[:, total - m:]), apply_rotary(k, cos, sin)
            if causal:  # the new rows see every cached token and the new tokens up to themselves
                mask = torch.ones(m, total, dtype=torch.bool, device=h.device).tril(total - m)
            causal = False
        elif cross_attn:  # each half gets positions 0..n-1
            n = h.shape[1] // 2
            parts = [self._qkv(h[:, :n]), self._qkv(h[:, n:])]
            q, k, v = (torch.cat([parts[0][i], parts[1][i]], 1) for i in range(3))
            q = torch.cat([apply_rotary(q[:, :n], cos, sin), apply_rotary(q[:, n:], cos, sin)], 1)
            k = torch.cat([apply_rotary(k[:, :n], cos, sin), apply_rotary(k[:, n:], cos, sin)], 1)
        else:
            q, k, v = self._qkv(h)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=1.0 / math.sqrt(q.shape[-1]))
        return a.transpose(1, 2).reshape(h.shape)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor], rot, mask: Optional[torch.Tensor],
                causal: bool, cross_attn: bool, cache: Optional[dict] = None) -> torch.Tensor:
        if self.adaln:
            sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        h = self.norm1(x)
        if self.adaln:
            h = h * (1 + sc1) + sh1
        a = self.attn_out(self._attention(h, rot, mask, causal, cross_attn, cache))
        a = F.dropout(a, self.dropout, self.training)
        x = x + (g1 * a if self.adaln else a)
        h = self.norm2(x)
        if self.adaln:
            h = h * (1 + sc2) + sh2
        m = F.dropout(self.mlp(h), self.dropout, self.training)
        return x + (g2 * m if self.adaln else m)


class DDiTFinalLayer(nn.Module):
    def __init__(self, dim: int, vocab: int, cond_dim: int, adaln: bool) -> None:
        super().__init__()
        self.adaln = adaln
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab)
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.norm_final(x)
        if self.adaln:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)
            x = x * (1 + scale) + shift
        return self.linear(x)


class DIT(nn.Module):
    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.vocab_embed = EmbeddingLayer(d, config.vocab_size)
        if config.adaln:
            self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(d // config.n_heads)
        self.blocks = nn.ModuleList([DDiTBlock(d, config.n_heads, config.cond_dim, config.dropout, config.adaln)
                                     for _ in range(config.n_blocks)])
        self.output_layer = DDiTFinalLayer(d, config.vocab_size, config.cond_dim, config.adaln)
        # KV cache of clean tokens (reset_kv_cache): one {"k", "v"} per layer, pre-rotary, as released
        self.kv_cache: Optional[list] = None
        self.kv_batch = 0

    def _cond(self, ids: torch.Tensor, sigma: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        cfg = self.config
        if not cfg.adaln:
            return None
        if not cfg.time_conditioning:  # BD3-LM/MDLM: sigma is zeroed, whatever the caller passes
            sigma = torch.zeros(ids.shape[0], device=ids.device)
        elif sigma is None:
            raise ValueError("this model is time-conditioned (config.time_conditioning=true): pass timesteps, "
                             "the noise level sigma of each sequence, shape [batch]")
        sigma = torch.as_tensor(sigma, device=ids.device)
        sigma = sigma.reshape(-1).expand(ids.shape[0]) if sigma.numel() == 1 else sigma.reshape(ids.shape[0])
        return F.silu(self.sigma_map(sigma))

    def _cached_call(self, ids: torch.Tensor, store: bool) -> tuple:
        """Per-layer cache dicts and rotary angles for a call that follows the cached tokens."""
        if ids.shape[0] != self.kv_batch:
            raise ValueError(f"the KV cache was reset for batch size {self.kv_batch}, this call has "
                             f"{ids.shape[0]} sequences; call reset_kv_cache(eval_batch_size={ids.shape[0]})")
        cached = 0 if self.kv_cache[0].get("k") is None else self.kv_cache[0]["k"].shape[1]
        for layer in self.kv_cache:
            layer["store"] = store
        # positions 0..cached+m-1 every call: after the window slides they are re-based, as released
        return self.kv_cache, self.rotary_emb(cached + ids.shape[1], ids.device)

    def _slide(self) -> None:
        """Keep the context within model_length: once the stored tokens reach it, drop the oldest block
        (the released sliding window)."""
        n, blk = self.config.model_length, self.config.block_size
        for layer in self.kv_cache:
            layer["store"] = False
            if layer.get("k") is not None and layer["k"].shape[1] >= n:
                keep = max(n - blk, 0)
                layer["k"], layer["v"] = layer["k"][:, layer["k"].shape[1] - keep:], layer["v"][:, layer["v"].shape[1] - keep:]

    def forward(self, ids: torch.Tensor, sigma: Optional[torch.Tensor], sample_mode: bool = False,
                store_kv: bool = False, output_hidden_states: bool = False) -> tuple:
        cfg = self.config
        c = self._cond(ids, sigma)
        x = self.vocab_embed(ids)
        hidden = [x] if output_hidden_states else []
        s = ids.shape[1]
        cross = cfg.cross_attn and not sample_mode
        caches = None
        if self.kv_cache is not None and not cross:
            caches, rot = self._cached_call(ids, bool(store_kv))
            mask = None
        elif store_kv:
            raise ValueError("store_kv=True needs the KV cache: call reset_kv_cache(eval_batch_size) first, then "
                             "run the sampler's blocks with sample_mode=True" if self.kv_cache is None else
                             "the KV cache holds clean tokens of the plain sequence: call with sample_mode=True, "
                             "not with the [x_t ; x0] training input")
        elif self.kv_cache is not None:
            raise ValueError("the KV cache is active (reset_kv_cache was called): a [x_t ; x0] training forward "
                             "cannot use it; pass sample_mode=True or call disable_kv_cache() first")
        elif cross:
            mask, rot = bd3_mask(s // 2, cfg.block_size, ids.device), self.rotary_emb(s // 2, ids.device)
        elif cfg.cross_attn:  # sample_mode on the plain sequence: the x0 stream's block-causal rule
            mask, rot = block_causal_mask(s, cfg.block_size, ids.device), self.rotary_emb(s, ids.device)
        else:
            mask, rot = None, self.rotary_emb(s, ids.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, rot, mask, bool(cfg.causal), cross, None if caches is None else caches[i])
            if output_hidden_states:
                hidden.append(x)
        if caches is not None and store_kv:
            self._slide()
        if cross:  # only the x_t half's rows are returned
            x, hidden = x[:, : s // 2], [h[:, : s // 2] for h in hidden]
        return self.output_layer(x, c), hidden


class BD3LM(PreTrainedModel):
    config_class = BD3LMConfig
    base_model_prefix = "bd3lm"

    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__(config)
        self.backbone = DIT(config)
        if config.var_min:
            self.register_buffer("sampling_eps_min", torch.tensor(float(config.sampling_eps_min)))
            self.register_buffer("sampling_eps_max", torch.tensor(float(config.sampling_eps_max)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # weights come from the checkpoint
        pass

    def reset_kv_cache(self, eval_batch_size: int = 1) -> None:
        """Start an empty KV cache (the released sampler's API). While it is active, every call with
        ``sample_mode=True`` attends to the cached clean tokens plus its own tokens (bidirectionally, or
        causally for the AR model) at the positions that follow them; ``store_kv=True`` appends the call's
        keys/values (the finished clean block). The context slides once it reaches ``model_length``."""
        self.backbone.kv_cache = [{} for _ in self.backbone.blocks]
        self.backbone.kv_batch = int(eval_batch_size)

    def disable_kv_cache(self) -> None:
        self.backbone.kv_cache = None

    def forward(self, input_ids: torch.LongTensor, timesteps: Optional[torch.Tensor] = None,
                sample_mode: Optional[bool] = None, store_kv: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None):
        """Raw logits (before SUBS: the caller sets the mask logit to -inf). With cross_attn the input is
        [x_t ; x0] (2L tokens, BD3 mask) and only the x_t half's logits are returned; with
        ``sample_mode=True`` it is the plain sequence under the block-causal mask (all rows returned).
        ``return_dict=False`` returns what the released model returns: the logits tensor, or
        ``(logits, hidden_states)`` with ``output_hidden_states``."""
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        logits, hidden = self.backbone(input_ids, timesteps, bool(sample_mode), bool(store_kv),
                                       bool(output_hidden_states))
        if return_dict:
            return MaskedLMOutput(logits=logits, hidden_states=tuple(hidden) if output_hidden_states else None)
        return (logits, hidden) if output_hidden_states else logits
