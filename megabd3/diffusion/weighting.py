"""Training-only loss weightings of the masked-diffusion NELBO (Extension 2, reproduction report Table 12).

Each weighting is a function of the log-SNR lambda = log(alpha / (1 - alpha)) with alpha = 1 - p
(p = mask probability of the token's block), multiplied onto the NELBO term
``loss_scaling(t) * log p_theta(x0)``:

    none     1
    edm      N(lambda; 2.4, 2.4^2) * (exp(-lambda) + 0.5^2) / 0.5^2      (Kingma & Gao's EDM weighting)
    iddpm    sech(lambda / 2)                       = 2 sqrt(alpha (1 - alpha))
    sigmoid  sigmoid(-lambda + k)                   = (1 - alpha) / (1 - (1 - e^-k) alpha)
    fm       exp(-lambda / 2)                       = sqrt((1 - alpha) / alpha)
    simple   -1 / loss_scaling(t)                   so weight * (-loss_scaling) = 1: plain masked CE

(Table 12 of the report prints the t-space column shifted by one row and the EDM factor as
e^{-lambda + 0.5^2}; the forms above are the ones the fork codes and the ones the tests check.)
``simple`` is computed from each block's own t; the fork built it from the first block's noise level,
so for every other block its weight was odds(p_block)/odds(p_first) instead of 1.

Weightings change the training loss only. Evaluation (:mod:`megabd3.eval.nelbo`) never applies them.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from megabd3.errors import UserError

# lambda is clamped to a finite range so p -> 0 or 1 gives a finite weight (edm would be inf - inf).
LAMBDA_CLAMP = 40.0


def log_snr(p: torch.Tensor) -> torch.Tensor:
    """lambda = log((1 - p) / p), computed with log1p for accuracy near p = 0."""
    p = p.double()
    return (torch.log1p(-p) - torch.log(p)).clamp(-LAMBDA_CLAMP, LAMBDA_CLAMP)


def _edm(lam: torch.Tensor, k: float) -> torch.Tensor:
    mean, std, s2 = 2.4, 2.4, 0.25
    log_normal = -0.5 * ((lam - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))
    # log(e^{-lambda} + s2) via logaddexp: no overflow at lambda = -40.
    return torch.exp(log_normal + torch.logaddexp(-lam, torch.full_like(lam, math.log(s2))) - math.log(s2))


def _iddpm(lam: torch.Tensor, k: float) -> torch.Tensor:
    return 1.0 / torch.cosh(lam / 2)


def _sigmoid(lam: torch.Tensor, k: float) -> torch.Tensor:
    return torch.sigmoid(-lam + k)


def _fm(lam: torch.Tensor, k: float) -> torch.Tensor:
    return torch.exp(-lam / 2)


def _on_log_snr(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> "Weighting":
    return lambda p, loss_scaling, k: fn(log_snr(p), float(k))


Weighting = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

#: name -> w(p, loss_scaling, k): one weight per (sequence, block).
WEIGHTINGS: Dict[str, Weighting] = {
    "none": lambda p, loss_scaling, k: torch.ones_like(p, dtype=torch.float64),
    "simple": lambda p, loss_scaling, k: -1.0 / loss_scaling.double(),
    "edm": _on_log_snr(_edm),
    "iddpm": _on_log_snr(_iddpm),
    "sigmoid": _on_log_snr(_sigmoid),
    "fm": _on_log_snr(_fm),
}


def check_weighting(name: str) -> None:
    if name not in WEIGHTINGS:
        raise UserError(f"diffusion.weighting: expected one of {list(WEIGHTINGS)}, found {name!r}")


def loss_weight(name: str, p: torch.Tensor, loss_scaling: torch.Tensor, k: float = 0.0) -> torch.Tensor:
    """The weight w (same shape as p; one value per (sequence, block)) for weighting ``name``."""
    check_weighting(name)
    return WEIGHTINGS[name](p, loss_scaling, k)
