"""The flex backend: its mask rule, forward AND backward against dense, one BlockMask per forward, and
dynamo's recompile behaviour (tests/unit/test_attention_backends.py covers the forward under no_grad).

torch 2.13 on CPU has no flex backward: the public ``flex_attention`` refuses inputs that require
grad on CPU, and inductor's CPU lowering has no backward template. The flex higher-order op itself
has an eager reference implementation with autograd (the math that the GPU kernels fuse), reached
by bypassing only that public device check. These tests run our ``mask_mod``/BlockMask through it
forward and backward, so the BD3 rule, the padding handling and the block sparsity the backward
reads are exercised; the fused Triton kernels themselves run only on GPU
(benchmarks/gpu_acceptance.py checks them against dense).
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from megabd3.diffusion.masks import AttentionSpec, bd3_allowed
from megabd3.errors import UserError
from megabd3.model import attention as A


def _padding(b: int, L: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    lengths[0], lengths[-1] = L, 1  # one unpadded row; one padded beyond its first token
    return torch.arange(L)[None] < lengths[:, None]


def _qkv(b: int, S: int, dtype: torch.dtype, grad: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, S, 8, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


@pytest.fixture
def fresh_flex(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Empty module caches and dynamo state, restored afterwards."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(A, "_compiled", {})
    monkeypatch.setattr(A, "_block_mask_cache", type(A._block_mask_cache)())
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("L,B", [(16, 1), (16, 4), (16, 16), (24, 8), (64, 4)])
def test_flex_rule_equals_bd3_rule(L: int, B: int) -> None:
    idx = torch.arange(2 * L)
    q, kv = idx[:, None], idx[None, :]
    assert torch.equal(A.flex_allowed(q, kv, L, B), bd3_allowed(q, kv, L, B))


@pytest.mark.parametrize("L,B,padded", [(16, 4, False), (16, 4, True), (16, 1, True), (16, 16, True),
                                        (32, 8, False)])
def test_flex_forward_backward_equals_dense(monkeypatch: pytest.MonkeyPatch, L: int, B: int,
                                            padded: bool) -> None:
    # The only bypass: torch's "no backward on CPU" check in the public API (see the module doc).
    assert hasattr(torch_flex, "_validate_device"), "torch moved the flex device check; update this test"
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *a: None)
    b = 3
    spec = AttentionSpec("bd3", L, B, _padding(b, L) if padded else None)
    q, k, v = _qkv(b, 2 * L, torch.float64, grad=True)
    g = torch.randn(b, 2, 2 * L, 8, dtype=torch.float64)
    ref = A.attend(q, k, v, spec, "dense")
    ref_g = torch.autograd.grad(ref, (q, k, v), g)
    # A.flex_attention itself refuses CPU training; call what it calls, with the same BlockMask.
    bm = A.flex_block_mask(spec, b, q.device)
    out = torch_flex.flex_attention(q, k, v, block_mask=bm)
    out_g = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for got, want in zip(out_g, ref_g):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("tile", [4, 16])
def test_rows_with_no_allowed_key_attend_to_themselves(tile: int) -> None:
    """Query rows whose every allowed key is padding (an all-padding row; a left-padded first block)
    fall back to their own key in tiled and flex alike, as in dense: tiled's CPU kernel and its
    portable per-tile SDPA path (the GPU one, whose tile masks OR in the cached eye), run here on CPU."""
    L, B, b = 16, 4, 3
    kp = torch.ones(b, L, dtype=torch.bool)
    kp[1] = False  # all padding
    kp[2, :6] = False  # blocks 0 (and half of 1) padded: x0 rows of block 0 see no real key
    spec = AttentionSpec("bd3", L, B, kp)
    assert bool(A.empty_rows(spec).any())
    q, k, v = _qkv(b, 2 * L, torch.float64, grad=True)
    g = torch.randn(b, 2, 2 * L, 8, dtype=torch.float64)
    ref = A.attend(q, k, v, spec, "dense")
    ref_g = torch.autograd.grad(ref, (q, k, v), g)
    plan = A._tile_plan(spec, A.tile_size(L, B, tile), q.device)
    assert plan.T == tile
    for out in (A.attend(q, k, v, spec, "tiled", tile=tile), A._tiled_autograd(q, k, v, plan, None)):
        out_g = torch.autograd.grad(out, (q, k, v), g)
        for got, want in zip((out, *out_g), (ref, *ref_g)):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    flex = A.attend(q.detach(), k.detach(), v.detach(), spec, "flex")  # forward only on CPU
    torch.testing.assert_close(flex, ref, atol=1e-10, rtol=1e-10)


def test_one_block_mask_per_forward_shared_by_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer's core attention gets the BlockMask the first layer built (padding: per forward)."""
    built = []
    real = A.flex_block_mask

    def counting(spec, batch, device):  # noqa: ANN001, ANN202
        built.append(batch)
        return real(spec, batch, device)

    monkeypatch.setattr(A, "flex_block_mask", counting)
    L, B, b, heads, hn = 16, 4, 2, 2, 8
    cfg = types.SimpleNamespace(kv_channels=hn, hidden_size=heads * hn, num_attention_heads=heads)
    layers = [A.BD3CoreAttention(cfg, layer_number=i + 1) for i in range(3)]
    spec = AttentionSpec("bd3", L, B, _padding(b, L))
    with torch.no_grad():
        for forward in range(2):
            call = A.AttentionCall(spec, backend="flex")
            q, k, v = (torch.randn(2 * L, b, heads, hn) for _ in range(3))
            outs = [layer(q, k, v, call) for layer in layers]
            assert len(built) == forward + 1  # one per forward, not one per layer
            ref = A.attend(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), spec, "dense")
            torch.testing.assert_close(outs[-1], ref.permute(2, 0, 1, 3).reshape(2 * L, b, -1))


def _compiled_forward(b: int, L: int, seed: int, kind: str = "bd3", B: int = 4) -> None:
    """One compiled flex forward (no_grad, padded) checked against dense."""
    S = 2 * L if kind == "bd3" else L
    spec = AttentionSpec(kind, L, B, _padding(b, L, seed))
    q, k, v = _qkv(b, S, torch.float32, grad=False, seed=seed)
    with torch.no_grad():
        out = A.attend(q, k, v, spec, "flex", call=A.AttentionCall(spec, "flex"))
        torch.testing.assert_close(out, A.attend(q, k, v, spec, "dense"), atol=1e-5, rtol=1e-5)


def test_compiled_flex_does_not_recompile_per_forward_or_per_batch(fresh_flex,  # noqa: ANN001
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """dynamo's guards with the eager backend (fast): the batch is dynamic from the first call, so
    a new padding or a new batch size (eval's smaller last batch) reuses the graphs the training
    shape compiled, and training afterwards still runs them (no dynamic recompile it would adopt);
    only a batch of 1 (0/1 specialisation) gets its own entries, which leave the others in use."""
    counters = fresh_flex
    monkeypatch.setattr(A, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(A, "COMPILE_BACKEND", "eager")
    graphs = []
    for b, seed in ((4, 0), (4, 1), (3, 2), (5, 3), (4, 4), (1, 5), (4, 6)):
        _compiled_forward(b, 16, seed)
        graphs.append(counters["stats"]["unique_graphs"])
    # create_block_mask + flex_attention compiled once at the first shape, again only for b == 1
    assert graphs[0] >= 2 and graphs[:5] == [graphs[0]] * 5, graphs
    assert graphs[5] - graphs[4] <= 2 and graphs[6] == graphs[5], graphs


def test_flex_recompile_limit_is_a_hard_error_and_lengths_stay_static(fresh_flex,  # noqa: ANN001
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the limit dynamo would silently run flex eagerly (the full score matrix); instead a
    UserError names the cause and fix, at every later call too. Every size but the batch is static:
    a third sequence length needs a third entry (automatic dynamic shapes would have reused the
    second, symbolic one), while a known length reuses its entry at any batch size. The limit is
    scoped to our calls: dynamo's global config is unchanged."""
    monkeypatch.setattr(A, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(A, "COMPILE_BACKEND", "eager")
    monkeypatch.setenv(A.RECOMPILE_LIMIT_ENV, "2")
    before = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit)
    _compiled_forward(2, 16, 0)
    _compiled_forward(3, 32, 1)
    _compiled_forward(5, 16, 2)  # known length, new batch: no new entry, no error
    for _ in range(2):
        with pytest.raises(UserError, match=A.RECOMPILE_LIMIT_ENV):
            _compiled_forward(2, 24, 3)
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before
    monkeypatch.setenv(A.RECOMPILE_LIMIT_ENV, "0")
    with pytest.raises(UserError, match="positive integer"):
        A.recompile_limit()


@pytest.mark.slow
def test_inductor_compiled_flex_with_padding_equals_dense(fresh_flex,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The real inductor lowering of our mask_mod (it rejected bool arithmetic in the BD3 rule) and
    of the padded BlockMask, on CPU: equal to dense, and neither a new padding nor a new batch size
    recompiles (the kernels are compiled with a symbolic batch from the first call)."""
    counters = fresh_flex
    monkeypatch.setattr(A, "COMPILE_ON_CPU", True)
    L, B = 32, 4
    graphs = []
    with torch.no_grad():
        for b, seed in ((2, 0), (2, 1), (3, 2)):
            spec = AttentionSpec("bd3", L, B, _padding(b, L, seed))
            q, k, v = _qkv(b, 2 * L, torch.float32, grad=False, seed=seed)
            out = A.attend(q, k, v, spec, "flex", call=A.AttentionCall(spec, "flex"))
            torch.testing.assert_close(out, A.attend(q, k, v, spec, "dense"), atol=1e-5, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2 and graphs == [graphs[0]] * 3, graphs
