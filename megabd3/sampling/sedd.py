"""SEDD's analytic sampler for the absorbing (mask) graph: Tweedie tau-leaping (spec 5.2, 6).

x starts all MASK with BOS at position 0. On the grid t_0 = 1 > ... > t_T = eps (``linspace``), T
analytic updates from t_k to t_{k+1}, then one final denoiser step at t_T that forbids the mask token.
Every step is a forward of the time-conditioned model (sigma changes), so NFE = T + 1 (the reference
reports T; the extra denoiser forward is counted here because it is one).

The model outputs SEDD log-scores through the parameterization of spec section 6:
``log s = logits - log(expm1(sigma)) - log(V - 1)`` with 0 at the x_t index. For the absorbing graph
the staggered-score x transposed-transition product reduces, for a masked position, to

    w_y = s_y (e^{dsigma} - 1)          (y != MASK)
    w_MASK = 1 - (e^{dsigma} - 1) sum_{y != MASK} s_y

and unmasked positions stay. With the exact score s_y = p(x0 = y | x_t) / (e^{sigma} - 1) and the
loglinear sigma this is the MDLM reverse step: reveal w.p. (t - s)/t with token p(y). Nucleus
truncation (if top_p < 1) acts on *which* token is revealed, not on whether one is.
"""
from __future__ import annotations

import math
import time
from typing import List, Optional

import torch

from megabd3.sampling.backend import ModelBackend
from megabd3.sampling.categorical import gumbel_argmax
from megabd3.sampling.common import SampleResult, SamplerOptions, StopTracker, with_retries


def loglinear_sigma(t: float, eps: float) -> float:
    """Total noise sigma(t) = -log(1 - (1 - eps) t) of SEDD's loglinear schedule."""
    return -math.log1p(-(1.0 - eps) * t)


def sedd_log_score(logits: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SEDD parameterization: logits [b, n, V] -> log-scores, 0 at the x_t index (float64)."""
    logits = logits.to(torch.float64)
    sigma = sigma.to(torch.float64)
    esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()
    score = logits - esigm1_log[:, None, None] - math.log(logits.shape[-1] - 1)
    return score.scatter(-1, xt[..., None], torch.zeros_like(score[..., :1]))


def analytic_weights(log_score: torch.Tensor, xt: torch.Tensor, dsigma: float, mask_id: int) -> torch.Tensor:
    """Unnormalised transition weights [b, n, V] of one analytic step of size ``dsigma``."""
    score = log_score.exp()
    masked = (xt == mask_id)[..., None]
    k = math.expm1(dsigma)
    not_mask = torch.ones(score.shape[-1], dtype=torch.bool, device=score.device)
    not_mask[mask_id] = False
    w = score * k * not_mask
    stay = (1.0 - k * (score * not_mask).sum(-1, keepdim=True)).clamp(min=0.0)
    w[..., mask_id] = stay[..., 0]
    keep = torch.nn.functional.one_hot(xt, score.shape[-1]).to(w.dtype)
    return torch.where(masked, w, keep)


class SEDDSampler:
    name = "sedd"

    def __init__(self, backend: ModelBackend, opts: SamplerOptions):
        self.backend, self.opts = backend, opts

    def _step(self, x: torch.Tensor, t: float, s: Optional[float], generator) -> torch.Tensor:
        o = self.opts
        sig_t = loglinear_sigma(t, o.noise_eps)
        sigma = torch.full((x.shape[0],), min(sig_t, o.sigma_max), device=x.device)
        log_score = sedd_log_score(self.backend.full(x, sigma), x, sigma)
        dsigma = sig_t - loglinear_sigma(s, o.noise_eps) if s is not None else sig_t
        w = analytic_weights(log_score, x, dsigma, o.mask_id)
        if s is None:  # final denoiser step: MASK is not an allowed outcome
            w[..., o.mask_id] = 0.0
        masked = x == o.mask_id
        stay = w[..., o.mask_id]
        tokens = w.clone()
        tokens[..., o.mask_id] = 0.0
        mass = tokens.sum(-1)
        tokens = o.truncate(tokens / mass.clamp(min=1e-300)[..., None])
        # first decide reveal vs stay, then which token: equal to one categorical over w when top_p = 1
        choice = torch.cat([stay[..., None], mass[..., None]], -1)
        reveal = gumbel_argmax(choice, generator) == 1
        cand = gumbel_argmax(tokens, generator)
        return torch.where(masked & reveal, cand, x)

    def _generate(self, batch: int, generator) -> List[Optional[SampleResult]]:
        o, dev = self.opts, self.backend.device
        t0 = time.perf_counter()
        x = torch.full((batch, o.length), o.mask_id, dtype=torch.long, device=dev)
        x[:, 0] = o.bos_id
        grid = torch.linspace(1.0, o.sedd_eps, o.steps + 1, dtype=torch.float64).tolist()
        for k in range(o.steps):
            x = self._step(x, grid[k], grid[k + 1], generator)
        x = self._step(x, grid[-1], None, generator)
        stops = StopTracker(batch, o)
        stops.update(x, o.steps + 1, 0)
        return stops.results(x, o.steps + 1, 0, time.perf_counter() - t0)

    def sample(self, batch: int, generator) -> List[SampleResult]:
        return with_retries(lambda n: self._generate(n, generator), batch, self.opts.max_tries)
