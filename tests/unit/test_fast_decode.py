"""The fast KV-cached decoding path (megabd3/model/fast_decode.py) and the preallocated KV cache: logits and
cached keys/values equal to the megatron path's to 1e-5 (the folded weights round differently),
for BD3/MDLM-style adaLN models and AR models,
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
from megabd3.parallel.init import init_distributed
from tests.unit._hf_common import random_dit

V = 300


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


def _model(adaln: bool = True, time_conditioning: bool = False, cond_dim: int = 48):  # noqa: ANN202
    return random_dit(V, adaln=adaln, time_conditioning=time_conditioning, cond_dim=cond_dim)


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
def test_fast_path_computes_the_megatron_path(adaln: bool, cond_dim: int, window) -> None:  # noqa: ANN001
    model = _model(adaln=adaln, cond_dim=cond_dim)
    fast, fc, used = _calls(model, window, "1")
    slow, sc, unused = _calls(model, window, "0")
    assert all(used) and not any(unused)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):  # folded weights (float64 folds, rounded once): allclose, not equal
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a < -1e29, b < -1e29)  # the same padded rows masked
    assert fast[-1].shape[1] == 0  # positions [b, 0]: no head rows
    assert sorted(fc.k) == sorted(sc.k)
    for i in fc.k:
        assert torch.allclose(fc.k[i], sc.k[i], rtol=1e-5, atol=1e-5) and torch.allclose(fc.v[i], sc.v[i], rtol=1e-5, atol=1e-5)
        assert not torch.equal(fc.k[i], sc.k[i]) or not adaln  # the folds are really in use (adaLN scales q/k)


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


def test_new_weights_are_used_by_the_next_sampling_run() -> None:
    """Weight-derived values (adaLN constants, head copy) live per KV cache: weights loaded into the same model
    object between runs -- load_state_dict, or writes through p.data that do not bump the version counter --
    are used by the next run."""
    model = _model()
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    ids = torch.randint(0, V - 1, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model.denoise_block(KVCache(), ids, 0)
        model.load_state_dict(other.state_dict())
        model.output_layer.weight.data.mul_(2.0)
        after = model.denoise_block(KVCache(), ids, 0)
        os.environ[fast_decode.ENV] = "0"
        try:
            ref = model.denoise_block(KVCache(), ids, 0)
        finally:
            os.environ.pop(fast_decode.ENV, None)
    assert not torch.allclose(before, after) and torch.allclose(after, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag, window", [("1", None), ("0", None), ("1", 10), ("0", 6)])
def test_store_and_denoise_equals_store_then_denoise(flag: str, window) -> None:  # noqa: ANN001
    """One forward of [clean block ; noisy block] (the sampler's store + next first denoising call) gives the
    logits and the cache of the two separate calls, on both decoding paths and with sliding windows."""
    model = _model()
    B = 4
    ids = torch.randint(0, V - 1, (2, 5 * B), generator=torch.Generator().manual_seed(5))
    os.environ[fast_decode.ENV] = flag
    try:
        with torch.no_grad():
            a, b = KVCache(window=window), KVCache(window=window)
            for s in range(0, 3 * B, B):
                model.store_block(a, ids[:, s:s + B], s)
                model.store_block(b, ids[:, s:s + B], s)
            clean, noisy = ids[:, 3 * B:4 * B], ids[:, 4 * B:5 * B]
            model.store_block(a, clean, 3 * B)
            sep = model.denoise_block(a, noisy, 4 * B, positions=torch.tensor([[1], [3]]))
            fused = model.store_and_denoise(b, clean, noisy, 4 * B, positions=torch.tensor([[1], [3]]))
            assert torch.allclose(fused, sep, rtol=1e-5, atol=1e-5)
            assert len(a) == len(b) and b.next_position == 4 * B
            for i in a.k:
                assert torch.allclose(a.k[i], b.k[i], atol=1e-5) and torch.allclose(a.v[i], b.v[i], atol=1e-5)
            # the fused cache then serves the next calls like the separate one
            nxt = ids[:, :B]
            assert torch.allclose(model.denoise_block(b, nxt, 4 * B), model.denoise_block(a, nxt, 4 * B), atol=1e-5)
    finally:
        os.environ.pop(fast_decode.ENV, None)


def test_sampler_fuses_stores_into_denoising_forwards() -> None:
    """The megatron model's BD3 sampler stores each finished block inside the next block's first forward: no
    separate cache forwards, the same NFE, and the tokens of the sampler without a cache."""
    from megabd3.sampling.backend import ModelBackend
    from megabd3.sampling.block import BD3Sampler
    from megabd3.sampling.common import SamplerOptions

    model = _model()
    o = SamplerOptions(length=32, mask_id=V - 1, bos_id=0, eod_id=-1, vocab_size=V, block_size=4, window=32,
                       top_p=0.9, entropy_threshold=0.0)
    with torch.no_grad():
        cached = BD3Sampler(ModelBackend(model, V, 32), o).sample(2, torch.Generator().manual_seed(0))
        plain = BD3Sampler(ModelBackend(model, V, 32), SamplerOptions(**{**o.__dict__, "kv_cache": False})).sample(
            2, torch.Generator().manual_seed(0))
    assert [r.tokens for r in cached] == [r.tokens for r in plain]
    assert all(r.cache_forwards == 0 and r.nfe == 31 for r in cached)


def test_cache_refuses_a_batch_change() -> None:
    from megabd3.errors import UserError

    model = _model()
    with torch.no_grad():
        cache = KVCache()
        model.store_block(cache, torch.zeros(1, 4, dtype=torch.long), 0)
        with pytest.raises(UserError, match="reset"):
            model.denoise_block(cache, torch.zeros(3, 4, dtype=torch.long), 4)


def test_hooked_models_take_the_megatron_path() -> None:
    model = _model()
    handle = model.decoder.layers[0].mlp.linear_fc1.register_forward_hook(lambda *a: None)
    try:
        with torch.no_grad():
            assert not fast_decode.eligible(model, KVCache())
    finally:
        handle.remove()
