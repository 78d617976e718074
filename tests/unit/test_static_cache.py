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
from megabd3.parallel.init import init_distributed
from tests.unit._hf_common import random_dit

V = 300
B = 4


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return _build()


def _build():  # noqa: ANN202
    return random_dit(V)


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


def test_samplers_give_the_plain_caches_tokens(model) -> None:  # noqa: ANN001
    """BD3 (fused stores, a window that wraps the ring) and AR sampling on the static cache: the tokens of the
    plain cache for the same seed."""
    from megabd3.sampling.ar import ARSampler
    from megabd3.sampling.backend import ModelBackend
    from megabd3.sampling.block import BD3Sampler
    from megabd3.sampling.common import SamplerOptions

    o = SamplerOptions(length=40, mask_id=V - 1, bos_id=0, eod_id=-1, vocab_size=V, block_size=B, window=16,
                       top_p=0.9, entropy_threshold=0.0)

    def run(cls, opts, backend):  # noqa: ANN001, ANN202
        with torch.no_grad():
            return [r.tokens for r in cls(backend, opts).sample(2, torch.Generator().manual_seed(0))]

    for cls, opts in ((BD3Sampler, o), (ARSampler, SamplerOptions(**{**o.__dict__, "block_size": 1}))):
        plain = run(cls, opts, ModelBackend(model, V, opts.window))
        fixed = ModelBackend(model, V, opts.window, fixed_shape=True)  # the same cache, eager on CPU
        assert run(cls, opts, fixed) == plain
        made = fixed._graph_cache[1]
        assert isinstance(made, StaticKVCache) and not made.graphs
        assert made.capacity == 16 + (2 * B if cls is BD3Sampler else 1)


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


# ---- the graph branch, on CPU: torch.cuda's graph API replaced by one with a graph's semantics
@pytest.fixture
def fake_graphs(monkeypatch):  # noqa: ANN201
    """Capture records the call on its static tensors; replay re-runs it on whatever they then hold and writes
    the captured output (what a CUDA graph does with device tensors; host values stay as captured).
    ``fail=True`` makes the next capture raise."""
    import contextlib

    state = {"capture": 0, "replay": 0, "fail": False}
    run = StaticKVCache._run

    class Graph:
        def replay(self) -> None:
            state["replay"] += 1
            self.out.copy_(run(*self.args))

    @contextlib.contextmanager
    def graph(g, pool=None):  # noqa: ANN001, ANN202
        if state["fail"]:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

        def record(*args):  # noqa: ANN002, ANN202
            state["capture"] += 1
            g.args, g.out = args, run(*args)  # a real capture records without running; the call is idempotent
            return g.out

        monkeypatch.setattr(StaticKVCache, "_run", record)
        try:
            yield
        finally:
            monkeypatch.setattr(StaticKVCache, "_run", run)

    class Stream:
        def wait_stream(self, other) -> None:  # noqa: ANN001
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(StaticKVCache, "_use_graphs", lambda self, ids: self.graphs)
    return state


@pytest.mark.parametrize("window", [None, 8])
def test_graph_replays_equal_the_plain_cache(model, fake_graphs, window) -> None:  # noqa: ANN001
    """Each call shape captured once, then replayed with new ids, starts and rows: the plain cache's logits."""
    ids = torch.randint(0, V - 1, (2, 11 * B), generator=torch.Generator().manual_seed(1))
    plain, static = KVCache(window=window), StaticKVCache(11 * B, window=window, graphs=True, max_call=2 * B)
    with torch.no_grad():
        for s in range(0, 10 * B, B):
            blk, nxt = ids[:, s:s + B], ids[:, s + B:s + 2 * B]
            rows = torch.tensor([[s % 4, 3], [2, (s // 4) % 4]])
            out = []
            for c in (plain, static):
                out.append([model.denoise_block(c, blk, s), model.denoise_block(c, blk, s, positions=rows),
                            model.store_and_denoise(c, blk, nxt, s + B, positions=rows[:, :1]) if s % (3 * B) == 0
                            else model.store_block(c, blk, s, kind="causal" if s % (2 * B) else "bd3")])
            assert all(_close(a, b) for a, b in zip(*out)), s
    assert fake_graphs["capture"] == len(static._graphs) == 5 and fake_graphs["replay"] == 30


def test_a_failed_capture_says_so_and_decodes_eagerly(model, fake_graphs, capsys) -> None:  # noqa: ANN001
    ids = torch.randint(0, V - 1, (1, 2 * B), generator=torch.Generator().manual_seed(3))
    fake_graphs["fail"] = True
    with torch.no_grad():
        want = model.denoise_block(KVCache(), ids[:, :B], 0)
        cache = StaticKVCache(2 * B, graphs=True)
        assert _close(model.denoise_block(cache, ids[:, :B], 0), want)
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["sampling: CUDA graph capture failed (operation not permitted when stream is capturing); "
                       "decoding runs eagerly"] and not cache.graphs
        with pytest.raises(UserError, match=r"^sampling.cuda_graphs=on: capturing a decoding step failed"):
            model.denoise_block(StaticKVCache(2 * B, graphs=True, strict=True), ids[:, :B], 0)


def test_backend_keeps_its_graphs_across_runs_with_fresh_weights(model, fake_graphs, monkeypatch) -> None:  # noqa: ANN001
    """ModelBackend keeps the graph cache of a shape: the second sampling run captures nothing and replays, and
    weights changed between runs are used (folded again into the same tensors), as the plain cache's tokens
    under the new weights show."""
    from megabd3.model import static_cache
    from megabd3.sampling.backend import ModelBackend
    from megabd3.sampling.block import BD3Sampler
    from megabd3.sampling.common import SamplerOptions

    net = _build()
    o = SamplerOptions(length=24, mask_id=V - 1, bos_id=0, eod_id=-1, vocab_size=V, block_size=B, window=16,
                       top_p=0.9, entropy_threshold=0.0)
    backend = ModelBackend(net, V, 16)

    def sample(opts):  # noqa: ANN001, ANN202
        with torch.no_grad():
            return [r.tokens for r in BD3Sampler(backend, opts).sample(2, torch.Generator().manual_seed(0))]

    eager = SamplerOptions(**{**o.__dict__, "cuda_graphs": "off"})
    with monkeypatch.context() as mp:
        mp.setattr(static_cache, "use_graphs", lambda model, device, mode: mode != "off")
        first = sample(o)
        captured = fake_graphs["capture"]
        cache = backend._graph_cache[1]
        assert captured == len(cache._graphs) >= 2 and first == sample(eager)
        with torch.no_grad():
            net.output_layer.weight.mul_(3.0)  # in place, as load_state_dict and EMA swaps do
            net.decoder.layers[0].adaLN_modulation.bias.add_(0.5)
        second = sample(o)
        assert backend._graph_cache[1] is cache and fake_graphs["capture"] == captured  # replays only
        assert second == sample(eager) and second != first


def test_the_graph_switch_refuses_with_one_line(model) -> None:  # noqa: ANN001
    from megabd3.config.validate import validate

    with pytest.raises(UserError, match="max_call=9 exceeds the window 8"):
        StaticKVCache(64, window=8, max_call=9)
    cuda = torch.device("cuda")  # use_graphs only reads the device type
    model.train()
    try:
        with pytest.raises(UserError, match="training mode"):
            use_graphs(model, cuda, "on")
    finally:
        model.eval()
    assert use_graphs(model, cuda, "on") and use_graphs(model, cuda, "auto")
    cfg = Config()
    cfg.sampling.cuda_graphs = "on"
    cfg.diffusion.objective = "mdlm"
    assert any(p.startswith("sampling.cuda_graphs=on captures KV-cached decoding steps") for p in validate(cfg))
    cfg.diffusion.objective, cfg.sampling.kv_cache = "bd3lm", True
    assert not any("cuda_graphs" in p for p in validate(cfg))
