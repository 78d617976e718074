"""Shifted logits (megabd3/model/shift.py, model.shift_logits) on the llama backbone, against independent
computations: the rule written out row by row from the unshifted trunk, the causal LM at L' = 1, and the
KV-cached sampling path against the uncached 2L forward."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megabd3.config.load import config_from_dict, config_to_dict  # noqa: E402
from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.masks import AttentionSpec  # noqa: E402
from megabd3.config.load import ConfigError  # noqa: E402
from megabd3.errors import UserError  # noqa: E402
from megabd3.model.kv_cache import KVCache  # noqa: E402
from megabd3.parallel.init import init_distributed  # noqa: E402
from tests.unit._hf_common import llama_from_hf, tiny_llama_hf  # noqa: E402

V, L = 96, 16


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


@pytest.fixture(scope="module")
def hf():  # noqa: ANN201
    return tiny_llama_hf(V, 64)


def _model(hf, shift: bool, block: int):  # noqa: ANN001, ANN202
    return llama_from_hf(hf, V, L, block, shift)[1]


def _ids(b: int = 2, n: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V - 1, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block", [1, 4, L])
def test_shifted_bd3_rows_follow_the_rule(hf, block: int) -> None:  # noqa: ANN001
    """Row i of the shifted 2L output = the unshifted head applied to the state the rule names, computed
    here from the unshifted model's full 2L logits (x_t half and x0 half) with a plain Python loop."""
    plain, shifted = _model(hf, False, block), _model(hf, True, block)
    x0 = _ids()
    xt = x0.clone()
    xt[:, ::3] = V - 1  # some masked positions (the id is only an input here)
    ids = torch.cat([xt, x0], 1)
    pos = torch.arange(L).repeat(2).expand(2, 2 * L)
    spec = AttentionSpec("bd3", L, block)
    with torch.no_grad():
        both = plain(ids, pos, spec, None, (0, 2 * L))  # unshifted logits of all 2L rows
        out = shifted(ids, pos, spec, None, (0, L))
        part = shifted(ids, pos, spec, None, (5, 11))
    for i in range(L):
        src = 0 if i == 0 else (L + i - 1 if i % block == 0 else i - 1)
        assert torch.equal(out[:, i], both[:, src]), (i, src)
    assert torch.equal(part, out[:, 5:11])


def test_shift_at_block_size_one_is_the_causal_lm(hf) -> None:  # noqa: ANN001
    """At L' = 1 every position reads the clean stream's previous state: the causal LM's next-token logits
    (transformers' LlamaForCausalLM on the same weights), whatever the noisy half holds."""
    model = _model(hf, True, 1)
    x0 = _ids()
    ids = torch.cat([torch.full_like(x0, V - 1), x0], 1)
    pos = torch.arange(L).repeat(2).expand(2, 2 * L)
    with torch.no_grad():
        out = model(ids, pos, AttentionSpec("bd3", L, 1), None, (0, L))
        ref = hf(input_ids=x0).logits.float()
    assert (out[:, 1:, :V] - ref[:, :-1]).abs().max().item() <= 1e-5


def test_causal_calls_are_not_shifted(hf) -> None:  # noqa: ANN001
    a, b = _model(hf, False, 4), _model(hf, True, 4)
    x = _ids()
    pos = torch.arange(L).expand(2, L)
    with torch.no_grad():
        assert torch.equal(a(x, pos, AttentionSpec("causal", L)), b(x, pos, AttentionSpec("causal", L)))


def test_cached_denoise_equals_uncached_bd3_forward(hf) -> None:  # noqa: ANN001
    """The sampler's two paths: store clean blocks in the KV cache then denoise the next block, vs the
    uncached [x_t ; x0] forward over the whole prefix (sampling/backend.py denoise_bd3_uncached)."""
    from megabd3.sampling.backend import ModelBackend

    B = 4
    model = _model(hf, True, B)
    backend = ModelBackend(model, V, window=0)
    x = _ids(n=3 * B, seed=3)
    noisy = x[:, 2 * B:].clone()
    noisy[:, [0, 2]] = V - 1
    cache = KVCache()
    for s in (0, B):
        backend.store(cache, x[:, s:s + B], s)
    cached = backend.denoise_cached(cache, noisy, 2 * B)
    uncached = backend.denoise_bd3_uncached(x[:, :2 * B], noisy)
    assert (cached - uncached).abs().max().item() <= 1e-5
    fused_cache = KVCache()  # the sampler's fused store of block 1 + first denoise of block 2 (one forward)
    backend.store(fused_cache, x[:, :B], 0, logits=False)
    fused = backend.denoise_cached(fused_cache, noisy, 2 * B, store=(x[:, B:2 * B], B))
    assert (fused - uncached).abs().max().item() <= 1e-5 and fused_cache.shift_carry[0] == 2 * B - 1
    rows = torch.tensor([[0, 3], [1, 2]])
    assert torch.allclose(backend.denoise_cached(cache, noisy, 2 * B, positions=rows),
                          cached[torch.arange(2)[:, None], rows], atol=1e-6)
    # the first block has no carry: it uses its own state at position 0, as the 2L forward does
    first = backend.denoise_cached(KVCache(), noisy, 0)
    assert (first - backend.denoise_bd3_uncached(x[:, :0], noisy)).abs().max().item() <= 1e-5
    with pytest.raises(UserError, match="store blocks in order"):
        backend.denoise_cached(KVCache(), noisy, B)


def test_shift_logits_config_rules() -> None:
    base = config_to_dict(Config())
    with pytest.raises(ConfigError, match="model.shift_logits=true needs model.arch=llama"):
        config_from_dict(base, overrides=["model.shift_logits=true"])
    llama = ["model.arch=llama", "model.adaln=false", "model.shift_logits=true"]
    with pytest.raises(ConfigError, match="applies to bd3lm/mdlm"):
        config_from_dict(base, overrides=llama + ["diffusion.objective=ar", "diffusion.block_size=1"])
    assert config_from_dict(base, overrides=llama).model.shift_logits
