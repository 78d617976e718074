"""The fixed-shape ring-buffer KV cache behind CUDA-graph decoding (megabd3/model/static_cache.py), run eagerly
on CPU: every call equals the same call on the plain KVCache (denoise, store, causal store, fused store +
denoise, row selection, sliding windows that wrap the ring), denoising calls leave it unchanged, samplers
on it give the plain cache's tokens, and the graph switch refuses what it cannot do with one line."""
from __future__ import annotations

import pytest
import torch

from megabd3.config.schema import Config
from megabd3.errors import UserError
from megabd3.model.kv_cache import KVCache
from megabd3.model.static_cache import StaticKVCache, use_graphs
from megabd3.model.transformer import build_model
from megabd3.parallel.init import init_distributed

V = 300
B = 4


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_heads, m.num_layers, m.cond_dim, m.dropout = 32, 4, 2, 48, 0.0
    m.attention_backend, m.make_vocab_size_divisible_by = "dense", 64
    net = build_model(cfg, V).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the reference init zeroes adaLN and the head: randomise so every term matters
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 8, 12])
def test_every_call_equals_the_plain_cache(model, window) -> None:  # noqa: ANN001
    """A sampler-like sequence over 10 blocks (window 8 = two blocks: the ring of 8 + 8 slots wraps 2.5 times):
    denoise calls (all rows and selected rows), fused store + denoise, plain and causal stores."""
    ids = torch.randint(0, V - 1, (2, 11 * B), generator=torch.Generator().manual_seed(1))
    plain, static = KVCache(window=window), StaticKVCache(11 * B, window=window, max_call=2 * B)
    rows = torch.tensor([[0, 3], [2, 2]])
    with torch.no_grad():
        for s in range(0, 10 * B, B):
            blk, nxt = ids[:, s:s + B], ids[:, s + B:s + 2 * B]
            for c in (plain, static):
                c.out = [model.denoise_block(c, blk, s), model.denoise_block(c, blk, s, positions=rows)]
                if s % (3 * B) == 0:
                    c.out.append(model.store_and_denoise(c, blk, nxt, s + B, positions=rows[:, :1]))
                else:
                    c.out.append(model.store_block(c, blk, s, kind="causal" if s % (2 * B) else "bd3"))
            assert all(_close(a, b) for a, b in zip(plain.out, static.out)), s
            assert len(plain) == len(static)
            for i in plain.k:
                assert _close(plain.k[i], static.k[i]) and _close(plain.v[i], static.v[i])


def test_denoising_calls_leave_the_cache_unchanged(model) -> None:  # noqa: ANN001
    """A denoising call's keys are scratch: a later call at a further position (no store between) must not see
    them, exactly as with KVCache, whose denoising calls never commit."""
    ids = torch.randint(0, V - 1, (1, 4 * B), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = []
        for c in (KVCache(), StaticKVCache(4 * B)):
            model.store_block(c, ids[:, :B], 0)
            before = len(c)
            model.denoise_block(c, ids[:, B:2 * B], B)
            assert len(c) == before
            outs.append(model.denoise_block(c, ids[:, 2 * B:3 * B], 2 * B))
    assert _close(*outs)


def test_samplers_give_the_plain_caches_tokens(model, monkeypatch) -> None:  # noqa: ANN001
    """BD3 (fused stores, a window that wraps the ring) and AR sampling on the static cache: the tokens of the
    plain cache for the same seed."""
    from megabd3.sampling.ar import ARSampler
    from megabd3.sampling.backend import ModelBackend
    from megabd3.sampling.block import BD3Sampler
    from megabd3.sampling.common import SamplerOptions

    o = SamplerOptions(length=40, mask_id=V - 1, bos_id=0, eod_id=-1, vocab_size=V, block_size=B, window=16,
                       top_p=0.9, entropy_threshold=0.0)
    made = []

    def static_cache(self, batch, length=None, cuda_graphs="off", max_call=None):  # noqa: ANN001, ANN202
        made.append(StaticKVCache(length, window=self.window or None, max_call=max_call))
        return made[-1]

    def run(cls, opts):  # noqa: ANN001, ANN202
        with torch.no_grad():
            return [r.tokens for r in cls(ModelBackend(model, V, opts.window), opts).sample(2, torch.Generator().manual_seed(0))]

    for cls, opts in ((BD3Sampler, o), (ARSampler, SamplerOptions(**{**o.__dict__, "block_size": 1}))):
        plain = run(cls, opts)
        with monkeypatch.context() as mp:
            mp.setattr(ModelBackend, "new_cache", static_cache)
            assert run(cls, opts) == plain
        assert made and made[-1].capacity == 16 + (2 * B if cls is BD3Sampler else 1)


def test_bad_use_is_refused_with_one_line(model) -> None:  # noqa: ANN001
    ids = torch.zeros(1, B, dtype=torch.long)
    with torch.no_grad():
        c = StaticKVCache(2 * B, max_call=B)
        with pytest.raises(UserError, match="exceeds the 8 positions"):
            model.denoise_block(c, ids, 2 * B)
        with pytest.raises(UserError, match="max_call"):
            model.denoise_block(c, torch.zeros(1, B + 1, dtype=torch.long), 0)
        model.store_block(c, ids, 0)
        with pytest.raises(UserError, match="reset"):
            model.denoise_block(c, torch.zeros(3, B, dtype=torch.long), B)
    cpu = torch.device("cpu")
    assert not use_graphs(model, cpu, "auto") and not use_graphs(model, cpu, "off")
    with pytest.raises(UserError, match="needs a CUDA device"):
        use_graphs(model, cpu, "on")
    with pytest.raises(UserError, match="cuda_graphs must be one of"):
        use_graphs(model, cpu, "sometimes")


def test_config_checks_the_graph_mode() -> None:
    from megabd3.config.validate import validate

    cfg = Config()
    assert not any("cuda_graphs" in p for p in validate(cfg))
    cfg.sampling.cuda_graphs = "yes"
    assert any(p.startswith("sampling.cuda_graphs='yes' is not one of") for p in validate(cfg))


def test_the_static_cache_refuses_what_the_fast_path_cannot_serve(model) -> None:  # noqa: ANN001
    ids = torch.zeros(1, B, dtype=torch.long)
    with pytest.raises(UserError, match="autograd is on"):
        model.denoise_block(StaticKVCache(2 * B), ids, 0)
    handle = model.decoder.layers[0].mlp.linear_fc1.register_forward_hook(lambda *a: None)
    try:
        with torch.no_grad(), pytest.raises(UserError, match="module hooks"):
            model.denoise_block(StaticKVCache(2 * B), ids, 0)
    finally:
        handle.remove()
