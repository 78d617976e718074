"""Clip search: the candidate set (with float32 values) and the choice on a case with a known answer."""
from __future__ import annotations

import math

import pytest
import torch

from megabd3.config.schema import Config
from megabd3.diffusion.clip_search import candidate_intervals, search_clip_interval
from megabd3.diffusion.objectives import build_objective

V, MASK = 9, 8


def test_candidates():
    c = candidate_intervals([0.5, 0.6, 0.7, 0.8, 0.9], 0.05, 1e-3, block_size=4)
    assert len(c) == 11 + 9 + 7 + 5 + 3 + 1
    assert c[-1] == (1e-3, 1.0) and c[0] == (0.0010000000474974513, 0.5)  # float32 max(0, eps), as the reference
    starts = {lo for lo, _ in c}
    assert 0.30000001192092896 in starts  # float32 arange, as the reference
    assert candidate_intervals([0.5], 0.05, 1e-3, block_size=1) == [(1e-3, 1.0), (1.0, 1.0)]


def uniform_model(ids, pos, attn, sigma, logits_range):
    """Constant logits: CE = log(V - 1) at every masked token (mask logit is suppressed by SUBS)."""
    n = ids.shape[1] if logits_range is None else logits_range[1] - logits_range[0]
    return torch.zeros(ids.shape[0], n, V)


def test_search_picks_known_lowest_variance_interval():
    # per-block mean = c k / (L' t) with k ~ Bin(L', t): E = c, Var = c^2 E[(1 - t)/(L' t)], which
    # over t ~ U[lo, hi] is c^2 (ln(hi/lo) - (hi - lo)) / (L' (hi - lo)): smallest for [0.5, 1].
    cfg = Config()
    cfg.diffusion.block_size, cfg.data.seq_len = 4, 16
    obj = build_objective(cfg, MASK, V)
    cands = candidate_intervals([0.5, 0.7], 0.1, 1e-3, block_size=4)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 8, (64, 16), generator=gen)} for _ in range(12)]
    res = search_clip_interval(obj, uniform_model, batches, torch.Generator().manual_seed(1), candidates=cands, num_batches=10)
    assert res.batches == 10
    assert res.interval == pytest.approx((0.5, 1.0))
    assert min(res.table.values()) == res.table[res.interval] and len(res.table) == len(cands)
    assert obj.train_interval == res.interval
    c2 = math.log(V - 1) ** 2
    for (lo, hi), v in res.table.items():
        if lo < 0.05:
            continue  # 1/t makes the sample variance heavy-tailed there; only the ranking is checked
        expected = c2 * (math.log(hi / lo) - (hi - lo)) / (4 * (hi - lo))
        assert v == pytest.approx(expected, rel=0.15), ((lo, hi), v, expected)
    obj2 = build_objective(cfg, MASK, V)
    res2 = search_clip_interval(obj2, uniform_model, batches, None, candidates=cands, num_batches=2, fix=True)
    assert obj2.train_interval == (1e-3, 1.0) and res2.interval == pytest.approx((0.5, 1.0))


def test_unclipped_candidate_uses_the_schedules_full_interval():
    """The candidate (eps, 1) means "unclipped": for the importance schedules (full interval u in (0, 1))
    it must not re-truncate u to [eps, 1), which would drop the p-range below the eps-quantile."""
    eps = 1e-3
    for kind, full in (("gaussian", (0.0, 1.0)), ("bimodal_gaussian", (0.0, 1.0)), ("loglinear", (eps, 1.0))):
        cfg = Config()
        cfg.diffusion.block_size, cfg.data.seq_len, cfg.diffusion.noise.type = 4, 16, kind
        obj = build_objective(cfg, MASK, V)
        assert (eps, 1.0) in candidate_intervals([0.5], 0.05, eps, block_size=4)
        x0 = torch.randint(0, 8, (256, 16), generator=torch.Generator().manual_seed(0))  # 1024 strata of width < eps
        out = obj(uniform_model, x0, torch.Generator().manual_seed(2), train=False, interval=(eps, 1.0))
        # independent: the stratified draw the objective must make, on the full interval
        expected = full[0] + (full[1] - full[0]) * (
            torch.rand(256, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            + torch.arange(1024, dtype=torch.float64).view(256, 4)) / 1024
        torch.testing.assert_close(out.t, expected, rtol=0, atol=1e-15)
        if kind != "loglinear":
            assert float(out.t.min()) < eps  # the first stratum lies below eps: not re-truncated
        # a search that picks it, and set_train_interval, keep the full interval too
        obj.set_train_interval((eps, 1.0))
        assert obj.train_interval == full
        res = search_clip_interval(obj, uniform_model, [{"input_ids": x0}], None, candidates=[(eps, 1.0)], num_batches=1)
        assert res.interval == (eps, 1.0) and obj.train_interval == full
