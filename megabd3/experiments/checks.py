"""Tables 9 and 12 are formula tables; the suite fills them with checks computed here (in-process, exact).

Table 9: for each reference schedule, our p(t) against the report's printed p(t); our loss_scaling
against the exact -p'(t)/p(t) by autograd; and unbiasedness: ``integral_eps^1 -loss_scaling(t) f(p(t)) dt``
against ``integral_{p(eps)}^{p(1)} f(p)/p dp`` by scipy quadrature for f(p) = p (relative error).
Table 12: each weighting against the spec's closed forms in alpha = 1 - p, and E_{p~U[0,1]}[w] (the
factor that turns the honest NELBO into the fork's weighted "PPL": ln PPL_w ~ E[w] ln PPL).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

EPS = 1e-3


def _report_p(name: str, t: torch.Tensor) -> torch.Tensor:
    return {"loglinear": t, "square": t**2, "square_root": t**0.5, "log": torch.log1p(t) / math.log(2.0),
            "cosine": 1 - (1 - EPS) * torch.cos(math.pi * t / 2)}[name]


def schedule_checks() -> Dict[str, float]:
    from scipy.integrate import quad

    from megabd3.diffusion.schedules import Cosine, Logarithmic, LogLinear, Power

    scheds = {"loglinear": LogLinear(), "square": Power(2.0, EPS), "square_root": Power(0.5, EPS),
              "log": Logarithmic(), "cosine": Cosine(EPS)}
    out: Dict[str, float] = {}
    # the clamp of square/square_root (p >= eps) only acts below t = sqrt(eps) / eps^2; compare above it
    t = torch.linspace(0.05, 1.0, 200, dtype=torch.float64, requires_grad=True)
    for name, s in scheds.items():
        p = s.mask_prob(t)
        (dp,) = torch.autograd.grad(p.sum(), t)
        exact = (-dp / p).detach()
        out[f"{name}/p_err"] = float((p.detach() - _report_p(name, t.detach())).abs().max())
        out[f"{name}/ls_err"] = float((s.loss_scaling(t.detach()) - exact).abs().max())
        lo = 0.05
        f = lambda x: float(-s.loss_scaling(torch.tensor(x, dtype=torch.float64)) * s.mask_prob(torch.tensor(x, dtype=torch.float64)))
        lhs = quad(f, lo, 1.0, limit=200)[0]
        p_lo, p_hi = float(s.mask_prob(torch.tensor(lo, dtype=torch.float64))), float(s.mask_prob(torch.tensor(1.0, dtype=torch.float64)))
        out[f"{name}/unbiased_err"] = abs(lhs - (p_hi - p_lo)) / (p_hi - p_lo)
    return out


def weighting_checks() -> Dict[str, float]:
    from scipy.integrate import quad

    from megabd3.diffusion.weighting import loss_weight

    p = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    a = 1 - p
    lam = torch.log(a / (1 - a))
    closed = {
        "iddpm": 2 * torch.sqrt(a * (1 - a)),
        "sigmoid": 1 - a,
        "fm": torch.sqrt((1 - a) / a),
        "edm": torch.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) / (2.4 * math.sqrt(2 * math.pi)) * (torch.exp(-lam) + 0.25) / 0.25,
        "simple": p,  # loglinear: loss_scaling = -1/t = -1/p, so w = -1/loss_scaling = p
    }
    out: Dict[str, float] = {}
    for name, ref in closed.items():
        w = loss_weight(name, p, -1.0 / p, 0.0)
        out[f"{name}/w_err"] = float((w - ref).abs().max())
        g = lambda x, n=name: float(loss_weight(n, torch.tensor([x], dtype=torch.float64),
                                                torch.tensor([-1.0 / x], dtype=torch.float64), 0.0)[0])
        out[f"{name}/mean_w"] = quad(g, 1e-6, 1 - 1e-6, limit=200)[0]
    return out


CHECKS = {"schedules": schedule_checks, "weightings": weighting_checks}
