"""The exported remote code (modeling_bd3lm.py) beyond the training forward, as the released sampler calls it:
``sample_mode=True`` on the plain sequence (block-causal, equal to megabd3's x0-stream and cached-store
logits), the KV cache (reset_kv_cache / store_kv: cached == uncached == megabd3's KVCache, also after the
context window slides), timesteps of a time-conditioned model, and ``return_dict=False``."""
from __future__ import annotations

import pytest
import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.hf.export import export_state_dict
from megabd3.model.kv_cache import KVCache
from tests.unit._hf_common import V, L, random_model

transformers = pytest.importorskip("transformers")
B = 4  # L'


def _export(tmp_path, objective: str = "bd3lm", block: int = B, **model):  # noqa: ANN001, ANN003, ANN202
    m, sd, cfg = random_model(objective, block, **model)
    out = export_state_dict(sd, cfg, tmp_path / objective)
    return m, _load(out)


def _load(out):  # noqa: ANN001, ANN202
    return transformers.AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True).eval()


def _clean(n: int = L, b: int = 2, seed: int = 6) -> torch.Tensor:
    return torch.randint(0, V - 1, (b, n), generator=torch.Generator().manual_seed(seed))


def _x0_stream(model, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """megabd3's logits of the x0 half of the training layout [filler ; x] (the M_BC quadrant)."""
    b, n = x.shape
    ids = torch.cat([torch.full_like(x, V - 1), x], 1)
    pos = torch.arange(n).repeat(2)[None].expand(b, -1)
    return model(ids, pos, AttentionSpec("bd3", n, B), logits_range=(n, 2 * n))[..., :V]


@torch.no_grad()
def test_sample_mode_is_block_causal_and_matches_megabd3(tmp_path) -> None:  # noqa: ANN001
    model, hf = _export(tmp_path)
    x = _clean()
    got = hf(input_ids=x, sample_mode=True).logits
    assert got.shape == (2, L, V)
    later = x.clone()
    later[:, 2 * B:] = (later[:, 2 * B:] + 1) % (V - 1)  # change blocks 2.. only
    moved = hf(input_ids=later, sample_mode=True).logits
    assert torch.equal(moved[:, : 2 * B], got[:, : 2 * B]), "a prefix's logits depend on later blocks"
    assert (moved[:, 2 * B:] - got[:, 2 * B:]).abs().max() > 1e-3  # (the test can see a change)
    assert (got - _x0_stream(model, x)).abs().max().item() <= 1e-5
    cache = KVCache()  # megabd3's cached sampling path: each clean block stored after the ones before it
    stored = torch.cat([model.store_block(cache, x[:, s:s + B], s)[..., :V] for s in range(0, L, B)], 1)
    assert (got - stored).abs().max().item() <= 1e-5


@torch.no_grad()
def test_kv_cache_matches_uncached_and_megabd3_across_the_window(tmp_path) -> None:  # noqa: ANN001
    """Two training lengths of blocks: the cache fills, then slides (the released window of model_length
    tokens, positions re-based). Every call equals megabd3's KVCache with window = L; until the window
    slides it also equals the uncached forward (after, the kept keys/values were computed with the dropped
    tokens in context: the sliding window is an approximation, in the released model as in megabd3)."""
    model, hf = _export(tmp_path)
    plain = _load(tmp_path / "bd3lm")  # no cache: the uncached references
    x = _clean(2 * L)
    hf.reset_kv_cache(eval_batch_size=2)
    ours = KVCache(window=L)
    g = torch.Generator().manual_seed(2)
    for s in range(0, 2 * L, B):
        noisy = torch.where(torch.rand(2, B, generator=g) < 0.5, V - 1, x[:, s:s + B])
        window = x[:, max(0, s - (L - B)):s]  # the context a model_length window leaves for this block
        uncached = plain(input_ids=torch.cat([window, noisy], 1), sample_mode=True).logits[:, -B:]
        cached = hf(input_ids=noisy, sample_mode=True).logits  # denoising call: cache unchanged
        theirs = model.denoise_block(ours, noisy, s)[..., :V]
        if s < L:
            assert (cached - uncached).abs().max().item() <= 1e-5, s
        assert (cached - theirs).abs().max().item() <= 1e-5, s
        again = hf(input_ids=noisy, sample_mode=True).logits
        assert torch.equal(again, cached)  # a denoising call did not touch the cache
        st = hf(input_ids=x[:, s:s + B], sample_mode=True, store_kv=True).logits
        ref = plain(input_ids=torch.cat([window, x[:, s:s + B]], 1), sample_mode=True).logits[:, -B:]
        if s < L:
            assert (st - ref).abs().max().item() <= 1e-5, s
        slid = s >= L
        model.store_block(ours, x[:, s:s + B], s)
    assert slid and (cached - uncached).abs().max() > 1e-4  # (the window did slide)
    # the cache reset starts over: the first block again sees nothing before it
    hf.reset_kv_cache(eval_batch_size=2)
    first = hf(input_ids=x[:, :B], sample_mode=True).logits
    assert (first - plain(input_ids=x[:, :B], sample_mode=True).logits).abs().max().item() <= 1e-5
    hf.disable_kv_cache()
    assert torch.equal(hf(input_ids=torch.cat([x[:, :L], x[:, :L]], 1)).logits,
                       plain(input_ids=torch.cat([x[:, :L], x[:, :L]], 1)).logits)


@torch.no_grad()
def test_kv_cache_ar_token_by_token(tmp_path) -> None:  # noqa: ANN001
    """The AR baseline (causal, L' = 1): feeding tokens one at a time (and three at once, causal inside)
    through the cache gives the full causal forward's rows."""
    _, hf = _export(tmp_path, "ar", 1, adaln=False)
    x = _clean()
    full = _load(tmp_path / "ar")(input_ids=x).logits
    hf.reset_kv_cache(2)
    rows = [hf(input_ids=x[:, i:i + 1], sample_mode=True, store_kv=True).logits for i in range(5)]
    rows.append(hf(input_ids=x[:, 5:8], sample_mode=True, store_kv=True).logits)
    assert (torch.cat(rows, 1) - full[:, :8]).abs().max().item() <= 1e-5


def test_kv_cache_misuse_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    _, hf = _export(tmp_path)
    x = _clean()
    with pytest.raises(ValueError, match=r"store_kv=True needs the KV cache: call reset_kv_cache"):
        hf(input_ids=x[:, :B], sample_mode=True, store_kv=True)
    hf.reset_kv_cache(eval_batch_size=2)
    with pytest.raises(ValueError, match="a \\[x_t ; x0\\] training forward cannot use it"):
        hf(input_ids=torch.cat([x, x], 1))
    with pytest.raises(ValueError, match="reset for batch size 2, this call has 1"):
        hf(input_ids=x[:1, :B], sample_mode=True)


@torch.no_grad()
def test_timesteps_required_only_when_time_conditioned(tmp_path) -> None:  # noqa: ANN001
    _, timed = _export(tmp_path, "mdlm", L, time_conditioning=True)
    x = _clean()
    with pytest.raises(ValueError, match="time-conditioned .* pass timesteps"):
        timed(input_ids=x)
    a, b = timed(input_ids=x, timesteps=torch.tensor([0.2, 0.2])).logits, timed(input_ids=x, timesteps=torch.tensor([2.0, 2.0])).logits
    assert (a - b).abs().max() > 1e-3  # sigma is used
    _, untimed = _export(tmp_path, "bd3lm")
    ids = torch.cat([x, x], 1)
    none = untimed(input_ids=ids).logits
    assert torch.equal(none, untimed(input_ids=ids, timesteps=torch.tensor([0.0, 0.0])).logits)
    assert torch.equal(none, untimed(input_ids=ids, timesteps=torch.tensor([3.0, 1.0])).logits)  # zeroed


@torch.no_grad()
def test_return_dict_false_matches_the_released_return(tmp_path) -> None:  # noqa: ANN001
    """The released BD3LM.forward returns the bare logits tensor with return_dict=False (its sampler uses
    the output as a tensor) and (logits, hidden_states) when hidden states are asked for."""
    _, hf = _export(tmp_path)
    x = _clean()
    ids = torch.cat([x, x], 1)
    ref = hf(input_ids=ids).logits
    bare = hf(input_ids=ids, return_dict=False)
    assert isinstance(bare, torch.Tensor) and torch.equal(bare, ref)
    logits, hidden = hf(input_ids=ids, return_dict=False, output_hidden_states=True)
    assert torch.equal(logits, ref) and len(hidden) == hf.config.n_blocks + 1
    assert all(h.shape == (2, L, hf.config.hidden_dim) for h in hidden)  # the x_t half, as the logits
    assert torch.equal(hidden[0], hf.backbone.vocab_embed.embedding[x])
    out = hf(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == hf.config.n_blocks + 1 and torch.equal(out.hidden_states[-1], hidden[-1])
