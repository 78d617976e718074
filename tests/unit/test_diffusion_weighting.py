"""Weightings at spot values against the closed forms of Table 12 (scipy's normal pdf for EDM), and
``simple`` giving weight * (-loss_scaling) = 1 for every schedule and block."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from megabd3.config.schema import NoiseConfig
from megabd3.diffusion.schedules import SCHEDULES, build_schedule
from megabd3.diffusion.weighting import WEIGHTINGS, log_snr, loss_weight

P = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64)
ALPHA = (1 - P).numpy()
LAM = np.log(ALPHA / (1 - ALPHA))


def test_log_snr():
    np.testing.assert_allclose(log_snr(P).numpy(), LAM, rtol=1e-12)


def test_spot_values_match_table12():
    ls = -1 / P
    np.testing.assert_allclose(loss_weight("iddpm", P, ls).numpy(), 2 * np.sqrt(ALPHA * (1 - ALPHA)), rtol=1e-12)
    np.testing.assert_allclose(loss_weight("fm", P, ls).numpy(), np.sqrt((1 - ALPHA) / ALPHA), rtol=1e-12)
    for k in (0.0, 1.5, -2.0):
        expected = (1 - ALPHA) / (1 - (1 - math.exp(-k)) * ALPHA)
        np.testing.assert_allclose(loss_weight("sigmoid", P, ls, k).numpy(), expected, rtol=1e-12)
    edm = norm.pdf(LAM, loc=2.4, scale=2.4) * (np.exp(-LAM) + 0.25) / 0.25
    np.testing.assert_allclose(loss_weight("edm", P, ls).numpy(), edm, rtol=1e-10)
    assert float(loss_weight("iddpm", torch.tensor([0.5], dtype=torch.float64), ls[:1])) == pytest.approx(1.0)
    np.testing.assert_array_equal(loss_weight("none", P, ls).numpy(), np.ones(6))
    # finite at the ends (the fork's fm/edm gave inf/NaN at p = 1)
    ends = torch.tensor([1e-12, 1.0], dtype=torch.float64)
    for name in WEIGHTINGS:
        assert bool(torch.isfinite(loss_weight(name, ends, -1 / ends)).all()), name


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_simple_cancels_loss_scaling(name):
    schedule = build_schedule(NoiseConfig(type=name))
    t = torch.rand(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.9 + 0.05
    ls, p = schedule(t)
    w = loss_weight("simple", p, ls)
    torch.testing.assert_close(w * (-ls), torch.ones_like(w))
