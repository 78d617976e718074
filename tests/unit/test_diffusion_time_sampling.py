"""Time sampling (stratification, tuned mode) and the masking process (resampling in the reference's
order, kept positions, mask-probability bounds, degenerate intervals)."""
from __future__ import annotations

import math

import pytest
import torch

from megabd3.config.schema import Config
from megabd3.diffusion.objectives import build_objective
from megabd3.diffusion.schedules import Cosine, LogLinear
from megabd3.diffusion.time_sampling import (
    TimeSampler,
    feasible_counts,
    resample_bounds,
    resample_problem,
    sample_mask,
)
from megabd3.errors import UserError


def test_antithetic_one_draw_per_stratum():
    K, B, lo, hi = 5, 3, 0.2, 0.9
    t = TimeSampler(lo, hi).sample(K, B, torch.Generator().manual_seed(0))
    u = (t - lo) / (hi - lo) * K * B
    cell = torch.arange(K * B, dtype=torch.float64).view(K, B)  # cell (k, b) owns [k*B + b, k*B + b + 1)
    assert bool(((u >= cell) & (u < cell + 1)).all())
    t2 = TimeSampler(lo, hi).sample(K, B, torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)
    plain = TimeSampler(lo, hi, antithetic=False).sample(4000, 1, torch.Generator().manual_seed(1))
    assert float(plain.min()) >= lo and float(plain.max()) <= hi
    assert float(plain.mean()) == pytest.approx((lo + hi) / 2, abs=0.02)


def test_tuned_mode_is_explicit():
    assert torch.equal(TimeSampler(0, 1, tuned=True).sample(2, 3, None), torch.ones(2, 3, dtype=torch.float64))
    assert not TimeSampler(0.55, 1.0).tuned  # a lower bound > 0.5 is just a clip
    with pytest.raises(UserError):
        TimeSampler(0.8, 0.2)


def test_mask_rate_and_keep():
    p = torch.tensor([[0.1, 0.7]], dtype=torch.float64).expand(2000, 2)
    keep = torch.zeros(2000, 8, dtype=torch.bool)
    keep[:, 0] = True
    m = sample_mask(p, 4, torch.Generator().manual_seed(0), keep=keep)
    assert not bool(m[:, 0].any())
    assert float(m[:, 1:4].double().mean()) == pytest.approx(0.1, abs=0.01)
    assert float(m[:, 4:].double().mean()) == pytest.approx(0.7, abs=0.01)


def test_resampling_enforces_realised_fraction():
    eps = 1e-3
    bounds = resample_bounds((0.45, 0.95), eps)
    assert bounds == (0.45, 0.95)
    assert resample_bounds((eps, 0.8), eps) == (None, 0.8) and resample_bounds((0.3, 1.0), eps) == (0.3, None)
    p = TimeSampler(0.45, 0.95).sample(64, 8, torch.Generator().manual_seed(0))
    m = sample_mask(p, 4, torch.Generator().manual_seed(1), resample=bounds)
    counts = m.view(64, 8, 4).sum(-1)
    assert set(counts.unique().tolist()) <= {2, 3}  # spec example: L'=4, [0.45, 0.95] -> 2 or 3 masked
    with pytest.raises(UserError, match="resampl"):
        sample_mask(p, 4, None, resample=(0.3, 0.45))


# ---- order of operations: resample the raw draws, then force the kept positions (reference) ------------

def _reference_q_xt(p_block, block, gen, bounds, ignore_bos):
    """The reference's order written out: q_xt draws ``rand < p`` per token; _resample_q_xt redraws
    (a fresh full-size rand each round, used in the violating blocks only) while any block's
    realised fraction of those raw draws is outside the enforced bounds; only then the forward pass
    sets x_t[:, 0] = x0[:, 0] (ignore_bos)."""
    b, nb = p_block.shape
    p_tok = p_block.repeat_interleave(block, 1)
    move = torch.rand(p_tok.shape, generator=gen, dtype=torch.float64) < p_tok
    lo, hi = bounds
    while True:
        frac = move.view(b, nb, block).sum(-1).double() / block
        bad = torch.zeros_like(frac, dtype=torch.bool)
        if lo is not None:
            bad |= frac < lo
        if hi is not None:
            bad |= frac > hi
        if not bad.any():
            break
        fresh = torch.rand(p_tok.shape, generator=gen, dtype=torch.float64) < p_tok
        regen = bad.repeat_interleave(block, 1)
        move[regen] = fresh[regen]
    if ignore_bos:
        move[:, 0] = False
    return move


@pytest.mark.parametrize("block,interval", [(4, (0.45, 0.95)), (2, (0.3, 0.8)), (1, (0.5, 1.0)), (8, (1e-3, 0.5))])
def test_resampling_matches_reference_order_draw_for_draw(block, interval):
    b, nb = 64, 4
    p = TimeSampler(*interval).sample(b, nb, torch.Generator().manual_seed(3))
    keep = torch.zeros(b, nb * block, dtype=torch.bool)
    keep[:, 0] = True
    bounds = resample_bounds(interval, 1e-3)
    ours = sample_mask(p, block, torch.Generator().manual_seed(11), resample=bounds, keep=keep)
    ref = _reference_q_xt(p, block, torch.Generator().manual_seed(11), bounds, ignore_bos=True)
    assert torch.equal(ours, ref)


def test_block0_distribution_with_kept_bos_follows_reference():
    """L'=4, [0.45, 0.95], p = 0.6: the raw count k of block 0 is Bin(4, p) conditioned on k in {2, 3};
    BOS is then forced clean, and it was one of the k masked raw draws with probability k/4. So the
    masked count j of positions 1..3 is 1 w.p. P(2)/2, 2 w.p. P(2)/2 + 3 P(3)/4, 3 w.p. P(3)/4.
    (Counting the kept BOS before resampling, the old order, made j = 1 impossible.)"""
    n, p = 40_000, 0.6
    pk = {k: math.comb(4, k) * p**k * (1 - p) ** (4 - k) for k in (2, 3)}
    z = sum(pk.values())
    pk = {k: v / z for k, v in pk.items()}
    expected = {1: pk[2] / 2, 2: pk[2] / 2 + 3 * pk[3] / 4, 3: pk[3] / 4}
    keep = torch.zeros(n, 4, dtype=torch.bool)
    keep[:, 0] = True
    m = sample_mask(torch.full((n, 1), p, dtype=torch.float64), 4, torch.Generator().manual_seed(5),
                    resample=(0.45, 0.95), keep=keep)
    assert not bool(m[:, 0].any())
    j = m[:, 1:].sum(-1)
    for count, prob in expected.items():
        se = math.sqrt(prob * (1 - prob) / n)
        assert float((j == count).double().mean()) == pytest.approx(prob, abs=5 * se), count


def test_block_size_one_with_kept_bos_resamples_the_raw_draw():
    """L'=1 with a lower bound 0.5: the kept BOS block used to stay at fraction 0 forever (1000 rounds,
    then an error). Its raw draw is resampled like any other; then it is forced clean."""
    keep = torch.zeros(8, 16, dtype=torch.bool)
    keep[:, 0] = True
    p = TimeSampler(0.5, 1.0).sample(8, 16, torch.Generator().manual_seed(0))
    m = sample_mask(p, 1, torch.Generator().manual_seed(1), resample=(0.5, None), keep=keep)
    assert not bool(m[:, 0].any()) and bool(m[:, 1:].all())


def test_degenerate_or_infeasible_resampling_is_refused():
    assert feasible_counts((None, 0.5), 1) == [0] and feasible_counts((0.3, 0.8), 1) == []
    assert "identically zero" in resample_problem((None, 0.5), 1)
    assert "never finish" in resample_problem((0.3, 0.8), 1) and "never finish" in resample_problem((0.45, 0.95), 1)
    assert resample_problem((0.5, None), 1) is None and resample_problem((0.45, 0.95), 4) is None
    p = torch.full((4, 8), 0.3, dtype=torch.float64)
    with pytest.raises(UserError, match="identically zero"):
        sample_mask(p, 1, None, resample=(None, 0.5))


# ---- resampling bounds are mask probabilities [p(beta), p(omega)] ------------------------------------

def test_resample_bounds_are_mask_probabilities_of_the_clip_ends():
    eps = 1e-3
    cos_p = lambda t: 1 - (1 - eps) * math.cos(math.pi * t / 2)  # noqa: E731 - spec 2.1, independent of Cosine
    lo, hi = resample_bounds((0.3, 0.8), eps, Cosine(eps))
    assert lo == pytest.approx(cos_p(0.3), rel=1e-12) and hi == pytest.approx(cos_p(0.8), rel=1e-12)
    assert (lo, hi) != (0.3, 0.8)  # 0.110, 0.692: they really differ from the t-interval
    assert resample_bounds((0.3, 0.8), eps, LogLinear()) == (0.3, 0.8) == resample_bounds((0.3, 0.8), eps)
    assert resample_bounds((eps, 0.8), eps, Cosine(eps)) == (None, pytest.approx(cos_p(0.8)))
    assert resample_bounds((0.3, 1.0), eps, Cosine(eps)) == (pytest.approx(cos_p(0.3)), None)


def test_objective_resamples_cosine_blocks_to_p_bounds():
    """Cosine clipped to t in [0.3, 0.8], L'=4: p in [0.110, 0.692], so blocks keep k = 1 or 2 masked
    tokens (k/4 in the p-interval); the t-interval would have kept k = 2 or 3."""
    cfg = Config()
    cfg.data.seq_len = 16
    d = cfg.diffusion
    d.block_size, d.noise.type, d.clip_min, d.clip_max, d.resample = 4, "cosine", 0.3, 0.8, True
    obj = build_objective(cfg, 7, 8)
    x0 = torch.randint(0, 7, (256, 16), generator=torch.Generator().manual_seed(0))
    out = obj(lambda ids, pos, attn, sigma, rng: torch.zeros(ids.shape[0], 16, 8), x0, torch.Generator().manual_seed(1),
              train=True)
    counts = set(out.masked.view(256, 4, 4).sum(-1).unique().tolist())
    allowed = {k for k in range(5) if 1 - (1 - 1e-3) * math.cos(math.pi * 0.3 / 2) <= k / 4
               <= 1 - (1 - 1e-3) * math.cos(math.pi * 0.8 / 2)}
    assert counts == allowed == {1, 2}
