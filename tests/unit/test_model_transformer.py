"""The megatron-core BD3 transformer against an independent plain-torch DDiT forward, the KV cache
against the full 2L forward, and the build-time rejections (single process, TP = PP = 1)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megabd3.config.schema import Config
from megabd3.diffusion.masks import AttentionSpec, attention_mask
from megabd3.errors import UserError
from megabd3.model.export import gather_full_state_dict, load_full_state_dict
from megabd3.model.kv_cache import KVCache
from megabd3.model.transformer import build_model, check_model_config
from megabd3.parallel.init import init_distributed

V, L, B = 40, 16, 4


def _cfg(**model) -> Config:
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.cond_dim = 2, 32, 4, 16
    cfg.model.dropout = 0.0
    cfg.model.make_vocab_size_divisible_by = 16
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(_cfg())


def _random_model(**model):  # noqa: ANN003, ANN202
    m = build_model(_cfg(**model), V)
    sd = gather_full_state_dict(m)
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(t.shape, generator=g) * 0.3 for k, t in sd.items()}
    load_full_state_dict(m, sd)
    return m.eval(), sd


def _reference_forward(sd, cfg, ids, pos, mask, sigma):  # noqa: ANN001, ANN202
    """The reference DDiT written from the spec (section 4) over the full state dict."""
    d, nh = cfg.model.hidden_size, cfg.model.num_heads
    hn = d // nh
    ln = lambda x, w: F.layer_norm(x, (d,)) * w  # noqa: E731
    lin = lambda x, n: x @ sd[n + ".weight"].t() + (sd[n + ".bias"] if n + ".bias" in sd else 0)  # noqa: E731
    x = sd["embedding.weight"][ids]
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    s = (sigma if cfg.model.time_conditioning else torch.zeros_like(sigma))[:, None] * freqs
    c = torch.cat([s.cos(), s.sin()], -1)
    c = F.silu(lin(F.silu(lin(c, "sigma_map.mlp.0")), "sigma_map.mlp.2"))
    inv = 1.0 / (cfg.model.rope_base ** (torch.arange(0, hn, 2).double() / hn))
    ang = pos.double()[..., None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1).float()[:, :, None], torch.cat([ang.sin()] * 2, -1).float()[:, :, None]
    rot = lambda t: t * cos + torch.cat([-t[..., hn // 2:], t[..., :hn // 2]], -1) * sin  # noqa: E731
    for i in range(cfg.model.num_layers):
        p = f"decoder.layers.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(c, p + "adaLN_modulation")[:, None].chunk(6, -1)
        h = ln(x, sd[p + "norm1.weight"]) * (1 + sc1) + sh1
        # megatron's fused qkv: per head [q; k; v] rows of hn each
        qkv = lin(h, p + "self_attention.linear_qkv").view(*h.shape[:2], nh, 3, hn)
        q, k, v = rot(qkv[..., 0, :]), rot(qkv[..., 1, :]), qkv[..., 2, :]
        sc = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hn)
        a = sc.masked_fill(~mask, float("-inf")).softmax(-1)
        a = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(*h.shape)
        x = x + g1 * lin(a, p + "self_attention.linear_proj")
        h = ln(x, sd[p + "norm2.weight"]) * (1 + sc2) + sh2
        m = lin(F.gelu(lin(h, p + "mlp.linear_fc1"), approximate="tanh"), p + "mlp.linear_fc2")
        x = x + g2 * m
    shift, scale = lin(c, "final_adaLN")[:, None].chunk(2, -1)
    return lin(ln(x, sd["final_norm.weight"]) * (1 + scale) + shift, "output_layer")


def _bd3_batch(b: int = 2, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V - 1, (b, L), generator=g)
    xt = torch.where(torch.rand(b, L, generator=g) < 0.5, V - 1, x0)
    pos = torch.arange(L).repeat(2)[None].expand(b, -1)
    return x0, xt, torch.cat([xt, x0], 1), pos


@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_matches_reference_backbone(backend: str, time_conditioning: bool) -> None:
    model, sd = _random_model(attention_backend=backend, time_conditioning=time_conditioning)
    cfg = model.cfg
    _, _, ids, pos = _bd3_batch()
    sigma = torch.tensor([0.3, 2.0])
    spec = AttentionSpec("bd3", L, B)
    with torch.no_grad():
        got = model(ids, pos, spec, sigma=sigma, logits_range=(0, L))
        want = _reference_forward(sd, cfg, ids, pos, attention_mask(spec), sigma)[:, :L]
    assert got.shape == (2, L, model.padded_vocab_size) and got.dtype == torch.float32
    torch.testing.assert_close(got[..., :V], want, atol=1e-4, rtol=1e-4)
    assert (got[..., V:] < -1e29).all()  # padded vocabulary rows are never predicted


def test_sigma_only_matters_with_time_conditioning() -> None:
    _, _, ids, pos = _bd3_batch()
    spec = AttentionSpec("bd3", L, B)
    for tc in (False, True):
        model, _ = _random_model(time_conditioning=tc)
        with torch.no_grad():
            a = model(ids, pos, spec, sigma=torch.zeros(2))
            b = model(ids, pos, spec, sigma=torch.ones(2))
        assert torch.equal(a, b) != tc


def test_fresh_model_starts_at_zero_logits_and_trains() -> None:
    model = build_model(_cfg(), V)
    _, _, ids, pos = _bd3_batch()
    out = model(ids, pos, AttentionSpec("bd3", L, B), logits_range=(0, L))
    assert torch.equal(out[..., :V], torch.zeros_like(out[..., :V]))  # zero-init head (reference)
    out[..., :V].sum().backward()
    assert model.output_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_kv_cached_denoising_equals_full_forward(backend: str) -> None:
    model, _ = _random_model(attention_backend=backend)
    x0, xt, ids, pos = _bd3_batch()
    with torch.no_grad():
        full = model(ids, pos, AttentionSpec("bd3", L, B), logits_range=(0, L))
        cache = KVCache()
        for k in range(L // B):
            s = k * B
            denoised = model.denoise_block(cache, xt[:, s:s + B], s)
            torch.testing.assert_close(denoised, full[:, s:s + B], atol=1e-5, rtol=1e-5)
            assert len(cache) == s  # denoising leaves the cache alone
            model.store_block(cache, x0[:, s:s + B], s)
        assert len(cache) == L


def test_kv_cache_window_equals_shifted_context() -> None:
    """A window of 2 blocks equals a fresh forward of (last clean block, noisy block) at positions
    starting from 0: RoPE is relative, so the absolute positions kept in the cache do not matter.
    One layer, so a stored block's K/V do not depend on what it attended to."""
    model, _ = _random_model(num_layers=1)
    x0, xt, _, _ = _bd3_batch()
    with torch.no_grad():
        cache = KVCache(window=2 * B)
        for k in range(3):
            model.store_block(cache, x0[:, k * B:(k + 1) * B], k * B)
        windowed = model.denoise_block(cache, xt[:, 3 * B:4 * B], 3 * B)
        fresh = KVCache()
        model.store_block(fresh, x0[:, 2 * B:3 * B], 0)
        shifted = model.denoise_block(fresh, xt[:, 3 * B:4 * B], B)
    torch.testing.assert_close(windowed, shifted, atol=1e-5, rtol=1e-5)


def test_causal_model_cache_equals_full_forward() -> None:
    model, _ = _random_model(adaln=False)
    ids = torch.randint(0, V, (2, L))
    pos = torch.arange(L)[None].expand(2, -1)
    with torch.no_grad():
        full = model(ids, pos, AttentionSpec("causal", L))
        cache = KVCache()
        first = model.store_block(cache, ids[:, :5], 0, kind="causal")  # a prompt, causal inside
        steps = [model.store_block(cache, ids[:, i:i + 1], i, kind="causal") for i in range(5, L)]
    torch.testing.assert_close(torch.cat([first] + steps, 1), full, atol=1e-5, rtol=1e-5)


def test_padding_composes_with_mask() -> None:
    """Padded keys change nothing for real rows when those keys are replaced by other tokens."""
    model, _ = _random_model(attention_backend="tiled")
    _, _, ids, pos = _bd3_batch()
    kp = torch.ones(2, L, dtype=torch.bool)
    kp[1, 10:] = False
    other = ids.clone()
    other[1, 10:L] = 3
    other[1, L + 10:] = 5
    spec = AttentionSpec("bd3", L, B, kp)
    with torch.no_grad():
        a = model(ids, pos, spec, logits_range=(0, L))
        b = model(other, pos, spec, logits_range=(0, L))
    torch.testing.assert_close(a[1, :8], b[1, :8])  # blocks 0-1 are fully real
    torch.testing.assert_close(a[0], b[0])


def test_flex_with_gradients_rejected_at_forward_on_cpu() -> None:
    model = build_model(_cfg(attention_backend="flex"), V)
    _, _, ids, pos = _bd3_batch()
    with pytest.raises(UserError, match="no backward on CPU"):
        model(ids, pos, AttentionSpec("bd3", L, B))
    with torch.no_grad():
        model(ids, pos, AttentionSpec("bd3", L, B))


@pytest.mark.parametrize("section,key,value,match", [
    ("parallel", "sequence_parallel", True, "sequence_parallel"),
    ("parallel", "tensor_parallel", 3, "num_heads"),
    ("model", "tie_embeddings", True, "tie_embeddings"),
    ("model", "num_layers", 3, "num_layers"),
])
def test_build_time_rejections(section: str, key: str, value, match: str) -> None:  # noqa: ANN001
    cfg = _cfg()
    cfg.parallel.pipeline_parallel = 2 if key in ("tie_embeddings", "num_layers") else 1
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(UserError, match=match):
        check_model_config(cfg)
