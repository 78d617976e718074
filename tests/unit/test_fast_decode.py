"""The fast KV-cached decoding path (megabd3/model/fast_decode.py) and the preallocated KV cache: bitwise
equal to the megatron path (logits and cached keys/values) for BD3/MDLM-style adaLN models and AR models,
with sliding windows, batch > 1 and row selection; the cache against an independent attention over the
explicitly kept tokens; the fallbacks."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megabd3.config.schema import Config
from megabd3.model import fast_decode
from megabd3.model.kv_cache import KVCache
from megabd3.model.transformer import build_model
from megabd3.parallel.init import init_distributed

V = 300


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


def _model(adaln: bool = True, time_conditioning: bool = False, cond_dim: int = 48):  # noqa: ANN202
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_heads, m.num_layers, m.cond_dim, m.dropout = 32, 4, 2, cond_dim, 0.0
    m.adaln, m.time_conditioning, m.attention_backend, m.make_vocab_size_divisible_by = adaln, time_conditioning, "dense", 64
    model = build_model(cfg, V).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the reference init zeroes adaLN and the head: randomise so every term matters
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _calls(model, window, flag: str):  # noqa: ANN001, ANN202
    os.environ[fast_decode.ENV] = flag
    try:
        with torch.no_grad():
            B = 4
            ids = torch.randint(0, V - 1, (2, 6 * B), generator=torch.Generator().manual_seed(1))
            cache, outs, used = KVCache(window=window), [], []
            for s in range(0, 5 * B, B):
                used.append(fast_decode.eligible(model, cache))
                outs.append(model.denoise_block(cache, ids[:, s:s + B], s))
                outs.append(model.denoise_block(cache, ids[:, s:s + B], s, positions=torch.tensor([[0, 3], [2, 2]])))
                outs.append(model.store_block(cache, ids[:, s:s + B], s, kind="causal" if s % 8 else "bd3"))
                outs.append(model.store_block(KVCache(), ids[:, s:s + 1], 0, positions=torch.zeros(2, 0, dtype=torch.long)))
            return outs, cache, used
    finally:
        os.environ.pop(fast_decode.ENV, None)


@pytest.mark.parametrize("adaln, cond_dim, window", [(True, 48, None), (True, 80, 10), (False, 48, 7)],
                         ids=["adaln", "adaln-2-cond-rows-window", "ar-window"])
def test_fast_path_is_bitwise_the_megatron_path(adaln: bool, cond_dim: int, window) -> None:  # noqa: ANN001
    model = _model(adaln=adaln, cond_dim=cond_dim)
    fast, fc, used = _calls(model, window, "1")
    slow, sc, unused = _calls(model, window, "0")
    assert all(used) and not any(unused)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and torch.equal(a, b)
    assert fast[-1].shape[1] == 0  # positions [b, 0]: no head rows
    assert sorted(fc.k) == sorted(sc.k) and all(torch.equal(fc.k[i], sc.k[i]) and torch.equal(fc.v[i], sc.v[i]) for i in fc.k)


def test_fallbacks() -> None:
    model = _model()
    with torch.no_grad():
        assert fast_decode.eligible(model, KVCache())
        assert not fast_decode.eligible(model, object())  # a test model's own cache type
        model.train()
        assert not fast_decode.eligible(model, KVCache())
        model.eval()
    assert not fast_decode.eligible(model, KVCache())  # autograd on
    with torch.no_grad():
        assert not fast_decode.eligible(_model(time_conditioning=True), KVCache())


def _reference_attention(keys, vals, q, causal: bool):  # noqa: ANN001, ANN202
    n = q.shape[2]
    mask = None
    if causal and n > 1:
        ctx = keys.shape[2] - n
        mask = torch.ones(n, ctx + n, dtype=torch.bool)
        mask[:, ctx:] = torch.ones(n, n, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=0.5)


@pytest.mark.parametrize("window", [None, 5, 12])
def test_kv_cache_against_explicit_kept_tokens(window) -> None:  # noqa: ANN001
    """Store/denoise sequences of varying block sizes: every call attends to exactly the last `window - n`
    stored tokens (all of them without a window) plus its own block, and the cache keeps the last `window`."""
    from megabd3.diffusion.masks import AttentionSpec
    from megabd3.model.attention import AttentionCall

    g = torch.Generator().manual_seed(0)
    cache, stored_k, stored_v = KVCache(window=window), [], []
    for step, n in enumerate([3, 4, 1, 4, 4, 2, 4, 4, 4, 3, 4, 4, 4, 4]):
        q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
        mode = "store" if step % 3 != 1 else "denoise"
        causal = step % 2 == 0
        call = AttentionCall(AttentionSpec("causal" if causal else "full", n), cache=cache, cache_mode=mode)
        out = cache.attend(0, q, k, v, call, 0.5)
        ks = torch.cat(stored_k, 2) if stored_k else k[:, :, :0]
        vs = torch.cat(stored_v, 2) if stored_v else v[:, :, :0]
        if window is not None:
            keep = max(window - n, 0)
            ks, vs = ks[:, :, ks.shape[2] - min(keep, ks.shape[2]):], vs[:, :, vs.shape[2] - min(keep, vs.shape[2]):]
        ref = _reference_attention(torch.cat([ks, k], 2), torch.cat([vs, v], 2), q, causal)
        assert torch.allclose(out, ref, atol=1e-6), step
        if mode == "store":
            stored_k.append(k)
            stored_v.append(v)
        all_k = torch.cat(stored_k, 2)
        kept = all_k if window is None else all_k[:, :, -window:]
        assert torch.equal(cache.k[0], kept) and len(cache) == kept.shape[2]
    cache.reset()
    assert len(cache) == 0 and cache.k == {}
