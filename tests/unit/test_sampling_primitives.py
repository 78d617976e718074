"""Nucleus semantics, float64 Gumbel-max, uniform position choice, stop rules on constructed streams."""
import math

import pytest
import torch

from megabd3.sampling.categorical import gumbel_argmax, uniform_choice
from megabd3.sampling.nucleus import nucleus_hf, nucleus_reference
from megabd3.sampling.stopping import check_stop, unigram_entropy

PROBS = torch.tensor([[0.15, 0.5, 0.05, 0.3]], dtype=torch.float64)


def test_nucleus_reference_hand_example():
    # sorted: 0.5, 0.3, 0.15, 0.05; inclusive cumsum 0.5, 0.8, 0.95, 1.0
    out = nucleus_reference(PROBS, 0.85)  # keeps cum <= 0.85: {0.5, 0.3}; drops the crossing 0.15
    assert torch.allclose(out, torch.tensor([[0.0, 0.625, 0.0, 0.375]], dtype=torch.float64))
    out = nucleus_reference(PROBS, 0.4)  # nothing has cum <= 0.4 -> top-1 only
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(nucleus_reference(PROBS, 1.0), PROBS)


def test_nucleus_hf_hand_example_and_transformers():
    out = nucleus_hf(PROBS, 0.85)  # mass before 0.15 is 0.8 < 0.85 -> kept; HF keeps the crossing token
    assert torch.allclose(out, torch.tensor([[0.15, 0.5, 0.0, 0.3]], dtype=torch.float64) / 0.95)
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    for p in (0.3, 0.7, 0.9, 0.99):
        probs = torch.softmax(torch.randn(5, 50, generator=g, dtype=torch.float64) * 2, -1)
        warped = TopPLogitsWarper(p)(None, probs.log())
        ref = torch.softmax(warped, -1)
        assert torch.allclose(nucleus_hf(probs, p), ref, atol=1e-12), p


def _nucleus_by_full_sort(probs, p, hf):
    """Independent brute force: argsort the vocabulary, cut the cumulative sum, scatter back."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(-1)
    keep_sorted = (cum - sorted_probs < p) if hf else (cum <= p)
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    out = probs * keep
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("hf", [False, True])
def test_nucleus_matches_full_sort_on_batched_rows(hf):
    """The values-only prefix cut equals an argsort + scatter on [b, B, V] and 1-D inputs."""
    fn = nucleus_hf if hf else nucleus_reference
    g = torch.Generator().manual_seed(3)
    for scale in (0.3, 2.0, 8.0):  # near-flat (large nucleus) to peaked (a few tokens)
        probs = torch.softmax(torch.randn(3, 4, 2000, generator=g, dtype=torch.float64) * scale, -1)
        for p in (0.1, 0.5, 0.9, 0.999):
            got = fn(probs, p)
            assert torch.equal(got > 0, _nucleus_by_full_sort(probs, p, hf) > 0), (scale, p)
            assert torch.allclose(got, _nucleus_by_full_sort(probs, p, hf), rtol=1e-12, atol=0)
    row = probs[0, 0].float()  # float32, one row
    assert torch.allclose(fn(row, 0.5), _nucleus_by_full_sort(row, 0.5, hf), atol=1e-6)


def test_nucleus_ties_keep_exactly_the_prefix_length():
    flat = torch.full((2, 4), 0.25, dtype=torch.float64)
    # reference: cumsum 0.25, 0.5, 0.75 -> two of the four tied tokens (lowest index first)
    assert torch.equal(nucleus_reference(flat, 0.6), torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 2, dtype=torch.float64))
    # hf: masses before are 0, 0.25, 0.5 < 0.6, 0.75 -> three tokens
    third = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]] * 2, dtype=torch.float64)
    assert torch.allclose(nucleus_hf(flat, 0.6), third, atol=1e-15)
    # a tie straddling the cut next to a strictly larger token: 0.4 kept, one of the two 0.3s
    mixed = torch.tensor([[0.3, 0.4, 0.3]], dtype=torch.float64)
    assert torch.allclose(nucleus_reference(mixed, 0.75), torch.tensor([[3 / 7, 4 / 7, 0.0]], dtype=torch.float64))


def test_gumbel_argmax_matches_distribution():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    draws = gumbel_argmax(p.expand(200_000, 3), g)
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    assert torch.allclose(freq, p, atol=4e-3)
    # unnormalised weights give the same law; zero weight is never drawn
    draws = gumbel_argmax(torch.tensor([0.0, 2.0, 6.0], dtype=torch.float64).expand(50_000, 3), g)
    assert (draws != 0).all() and abs((draws == 2).double().mean().item() - 0.75) < 0.01


def test_uniform_choice_only_valid_and_uniform():
    g = torch.Generator().manual_seed(2)
    valid = torch.tensor([[False, True, False, True, True]]).expand(30_000, 5)
    pick = uniform_choice(valid, g)
    assert valid[torch.arange(30_000), pick].all()
    freq = torch.bincount(pick, minlength=5).double() / 30_000
    assert torch.allclose(freq[[1, 3, 4]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015)


def test_unigram_entropy_values():
    assert unigram_entropy([7] * 10) == 0.0
    assert math.isclose(unigram_entropy(list(range(256))), math.log(256))
    assert math.isclose(unigram_entropy([1, 1, 2, 2]), math.log(2))


EOD = 0


def diverse(n, start=1):
    return [start + (i % 300) for i in range(n)]  # 300 distinct ids: entropy log(256) over 256


def test_stop_rules_short_samples_never_stop():
    ids = [EOD] + [5] * 200 + [EOD]
    assert not check_stop(ids, EOD, True, 4.0).stop  # <= 256 tokens: rules not checked yet


def test_stop_second_eos_truncates_after_it():
    ids = [EOD] + diverse(299) + [EOD] + diverse(40)
    d = check_stop(ids, EOD, var_length=True, entropy_threshold=4.0)
    assert d.stop and d.reason == "eos" and d.keep == 301
    assert ids[: d.keep][-1] == EOD and ids[: d.keep].count(EOD) == 2
    # fixed-length mode ignores EOS entirely
    assert not check_stop(ids, EOD, var_length=False, entropy_threshold=4.0).stop


def test_stop_low_entropy_truncates_last_256_or_rejects():
    ids = [EOD] + diverse(400) + [3, 4] * 128  # last 256 tokens: entropy log 2 < 4
    d = check_stop(ids, EOD, var_length=True, entropy_threshold=4.0)
    assert d.stop and d.reason == "entropy" and d.keep == len(ids) - 256 and not d.reject
    d = check_stop(ids, EOD, var_length=False, entropy_threshold=4.0)
    assert d.stop and d.reject
    # log(256) = 5.55 > 4: no stop; threshold 6 makes the same stream stop
    healthy = [EOD] + diverse(600)
    assert not check_stop(healthy, EOD, True, 4.0).stop
    assert check_stop(healthy, EOD, True, 6.0).stop


def test_stop_tracker_matches_check_stop_incrementally():
    from megabd3.sampling.common import SamplerOptions, StopTracker

    opts = SamplerOptions(length=1024, mask_id=99, bos_id=EOD, eod_id=EOD, vocab_size=400, var_length=True)
    streams = [[EOD] + diverse(299) + [EOD] + diverse(300), [EOD] + diverse(300) + [3, 4] * 150, [EOD] + diverse(600)]
    x = torch.tensor(streams)
    tracker = StopTracker(3, opts)
    for n in range(16, x.shape[1] + 1, 16):
        tracker.update(x[:, :n], nfe=n, fills=0)
    res = tracker.results(x, nfe=x.shape[1], fills=0, wall_s=1.0)
    assert res[0].stop_reason == "eos" and res[0].tokens == streams[0][:301] and res[0].nfe == 304
    # entropy fires at the first check whose last 256 tokens are below 4 nats, then drops those 256
    n_stop = next(n for n in range(16, x.shape[1] + 1, 16) if check_stop(streams[1][:n], EOD, True, 4.0).stop)
    assert res[1].stop_reason == "entropy" and res[1].tokens == streams[1][: n_stop - 256]
    assert res[2].stop_reason == "max_length" and res[2].tokens == streams[2]


@pytest.mark.parametrize("rule", ["reference", "hf"])
def test_nucleus_topk_first_path_equals_full_sort(rule: str) -> None:
    """The top-k-first cut (nucleus.TOPK_FIRST) against a cut written here from a full torch.sort: identical
    outputs on peaked rows (cut inside the top k), flat rows (falls back to the full sort), mixed batches,
    ties straddling the cut, and p exactly on a cumulative sum."""
    from megabd3.sampling import nucleus as nuc

    def full(probs: torch.Tensor, p: float) -> torch.Tensor:
        s = probs.sort(dim=-1, descending=True).values
        c = s.cumsum(-1)
        m = ((c <= p) if rule == "reference" else ((c - s) < p)).sum(-1).clamp(min=1)
        out = torch.zeros_like(probs)
        for r in range(probs.shape[0]):  # keep the m largest, ties by lowest index (the documented rule)
            order = sorted(range(probs.shape[1]), key=lambda j: (-float(probs[r, j]), j))[: int(m[r])]
            out[r, order] = probs[r, order]
        return out / out.sum(-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    V = 4096
    peaked = torch.softmax(torch.randn(3, V, generator=g, dtype=torch.float64) * 6, -1)
    flat = torch.softmax(torch.randn(2, V, generator=g, dtype=torch.float64) * 0.3, -1)
    tied = torch.full((1, V), 1e-9, dtype=torch.float64)
    tied[0, :20] = 0.03
    tied[0, 20:300] = 0.001
    tied = tied / tied.sum()
    fn = nuc.NUCLEUS[rule]
    for probs in (peaked, flat, torch.cat([peaked, flat]), tied):
        for p in (0.5, 0.9, 0.99):
            assert torch.equal(fn(probs, p), full(probs, p)), (rule, p)
    # p exactly equal to a cumulative sum of the sorted values (the <= / < boundary)
    s = peaked[:1].sort(dim=-1, descending=True).values
    p_exact = float(s.cumsum(-1)[0, 5])
    assert torch.equal(fn(peaked[:1], p_exact), full(peaked[:1], p_exact))
