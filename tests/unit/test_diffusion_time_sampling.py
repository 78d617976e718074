"""Time sampling (stratification, tuned mode) and the masking process (resampling, keep)."""
from __future__ import annotations

import pytest
import torch

from megabd3.diffusion.time_sampling import TimeSampler, resample_bounds, sample_mask
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
