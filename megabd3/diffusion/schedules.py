"""Noise schedules: the mask probability p(t) and loss_scaling(t) = -p'(t)/p(t).

Every schedule turns a time variate t (drawn by :mod:`megabd3.diffusion.time_sampling`) into the
probability p that a token is masked, and gives the NELBO weight. With t ~ U[lo, hi] and a monotone
p(t), ``E_t[-loss_scaling(t) * f(p(t))] * (hi - lo) = integral_{p(lo)}^{p(hi)} f(p)/p dp`` — the
masked-diffusion NELBO with E[CE | p] = f(p). Sign convention (the reference's): loss_scaling is
negative and multiplies log p_theta(x0), so the per-token loss ``loss_scaling * log p`` is >= 0.

Reference schedules (spec section 2.1), t in [eps, 1]:
    loglinear    p = t                        square       p = max(t^2, eps)
    square_root  p = max(sqrt t, eps)         log          p = log(1 + t) / log 2
    cosine       p = 1 - (1 - eps) cos(pi t / 2)
loss_scaling is the exact -p'/p everywhere (autograd-tested). One deliberate difference: the
reference's cosine divides by (p + eps) instead of p; the exact form keeps the estimator unbiased
(the two differ by a factor p/(p + eps), i.e. < 0.1% for p > 1).

Importance-sampling schedules (Extension 1 of the reproduction report). Here t is read as a uniform
variate u on (0, 1) and p is drawn from a density q on (0, 1) by inverse CDF, so
``-loss_scaling = (dp/du)/p = 1/(p q(p))`` and ``E_u[f(p)/(p q(p))] = integral_0^1 f(p)/p dp``: the
same NELBO, unbiased, with a different variance.
    gaussian          q = Normal(mu, sigma) truncated to [0, 1]        (sigma = standard deviation)
    bimodal_gaussian  q = w1 q1 + (1 - w1) q2, q_i truncated Normal(mu_i, sigma_i) on [0, 1]
Differences from the student fork (spec section 9.1-9.2), all of which made its estimator biased:
  * the fork fed u from the reference t-sampler, u in [1e-3, 1], and clamped p to [1e-5, 1 - 1e-5]:
    with mu=0.5, sigma=0.1 p only covered [0.19, 0.97], so the NELBO lost the tails. Here the full,
    unclipped interval of these schedules is u in (0, 1) (see :meth:`NoiseSchedule.full_interval`),
    u is only clamped to [1e-12, 1 - 1e-12] (a dropped p-range of order 1e-7) and everything is in
    float64;
  * the fork's bimodal split u at w1 into two branches that each sweep p over [0, 1], giving twice
    the NELBO (and with its clamps, overlapping partial integrals). Here u -> p inverts the mixture CDF
    Q(p) = w1 F1(p) + w2 F2(p) (monotone, by bisection), so p ~ q exactly and the weight uses the
    mixture density q(p), not a per-branch one;
  * the fork's time-varying mu2 is kept: mu2(tau) = mu2 + (mu2_end - mu2)(1 - exp(-tau)) with
    tau = tau_scale * progress, set through :meth:`NoiseSchedule.set_progress`.

Defensive importance sampling (Hesterberg 1995), ``diffusion.noise.uniform_mix`` = rho. Unbiased is
not enough: with a light-tailed q the weight 1/(p q(p)) explodes where q is tiny. The default bimodal
puts ~1e-7 of its mass on p > 0.8, which carries ~25% of the NELBO, so weights reach ~1e16 and a
finite-sample mean is usually ~25% low with rare huge spikes. Both importance schedules therefore
sample from q_mix(p) = (1 - rho) q(p) + rho (a rho-fraction of U[0, 1]) and weigh by 1/(p q_mix(p)),
which is <= 1/(rho p): still unbiased, now with bounded variance. rho = 0 is exactly the report's q.
The config default is rho = 0.1 (:data:`megabd3.config.schema.DEFAULT_UNIFORM_MIX`): with E[CE | p] =
c p a draw's term is c/q_mix(p) <= c/rho, so a step's estimate is at most 1/rho = 10 times its mean and
its relative std is at most sqrt((1/rho - 1)/n) for n draws (stratified draws only lower it); the
price is a second moment at most 1/(1 - rho) = 1.11 times that of q alone. The constructors below
default to rho = 0 (the report's exact density) so that they state the mathematics, not the policy.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Dict, Tuple

import torch

from megabd3.errors import UserError

# Inverse-CDF schedules clamp u away from exactly 0/1 (torch.rand can return 0.0; p = 0 has weight inf).
U_EPS = 2.0**-54
_SQRT2 = math.sqrt(2.0)


def sigma_from_p(p: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Total noise sigma = -log(1 - p), clamped at sigma_max (the time-conditioning input)."""
    return torch.clamp(-torch.log1p(-p.clamp(max=1.0)), max=sigma_max)


class NoiseSchedule(ABC):
    """p(t) and loss_scaling(t) = -p'(t)/p(t); inputs and outputs are float64 tensors."""

    name: str = ""
    #: True for inverse-CDF schedules: t is a uniform variate on (0, 1), unclipped interval (0, 1).
    importance: bool = False

    @abstractmethod
    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """p(t) in (0, 1]."""

    @abstractmethod
    def loss_scaling(self, t: torch.Tensor) -> torch.Tensor:
        """-p'(t)/p(t) (negative)."""

    def __call__(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss_scaling, p) like the reference's noise modules."""
        t = t.double()
        return self.loss_scaling(t), self.mask_prob(t)

    def full_interval(self, eps: float) -> Tuple[float, float]:
        """The unclipped time interval: [eps, 1] for the reference schedules, (0, 1) for inverse CDFs."""
        return (0.0, 1.0) if self.importance else (eps, 1.0)

    def set_progress(self, progress: float) -> None:
        """Training progress step/steps in [0, 1]; only time-varying schedules use it."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class LogLinear(NoiseSchedule):
    name = "loglinear"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def loss_scaling(self, t: torch.Tensor) -> torch.Tensor:
        return -1.0 / t


class Power(NoiseSchedule):
    """p = max(t^k, eps): square (k=2) and square_root (k=0.5). Below the clamp p is constant."""

    def __init__(self, power: float, eps: float = 1e-3) -> None:
        self.power = power
        self.eps = eps
        self.name = "square" if power == 2 else "square_root" if power == 0.5 else f"power{power}"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(t**self.power, min=self.eps)

    def loss_scaling(self, t: torch.Tensor) -> torch.Tensor:
        # The reference keeps k t^(k-1) / p even where the clamp is active; so do we (documented).
        return -self.power * t ** (self.power - 1) / self.mask_prob(t)


class Logarithmic(NoiseSchedule):
    name = "log"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(t) / math.log(2.0)

    def loss_scaling(self, t: torch.Tensor) -> torch.Tensor:
        return -1.0 / ((1.0 + t) * torch.log1p(t))


class Cosine(NoiseSchedule):
    name = "cosine"

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * torch.cos(math.pi * t / 2)

    def loss_scaling(self, t: torch.Tensor) -> torch.Tensor:
        dp = (math.pi / 2) * (1.0 - self.eps) * torch.sin(math.pi * t / 2)
        return -dp / self.mask_prob(t)


# ---- truncated normals -------------------------------------------------------------------------

def _norm_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / _SQRT2)


def _norm_sf(z: torch.Tensor) -> torch.Tensor:
    """1 - Phi(z), accurate in the upper tail (erfc, not 1 - cdf)."""
    return 0.5 * torch.erfc(z / _SQRT2)


def _norm_logpdf(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z * z - 0.5 * math.log(2 * math.pi)


def _tail_split(u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lower, v): v = u on the lower half, 1 - u (exact) on the upper half, both >= U_EPS.

    Inverting from the nearer end keeps full float64 relative precision in both tails, so p reaches
    within ~1e-12 of 0 and 1 for the default parameters instead of stopping at 1 - 1e-16 in u.
    """
    lower = u < 0.5
    v = torch.where(lower, u, 1.0 - u).clamp(min=U_EPS)
    return lower, v


class _TruncNormal:
    """Normal(mu, sigma) truncated to [0, 1]; sigma is the standard deviation."""

    def __init__(self, mu: float, sigma: float) -> None:
        self.mu, self.sigma = mu, sigma
        self.a = torch.tensor((0.0 - mu) / sigma, dtype=torch.float64)
        self.b = torch.tensor((1.0 - mu) / sigma, dtype=torch.float64)
        self.cdf_a = _norm_cdf(self.a)
        self.sf_b = _norm_sf(self.b)
        self.mass = _norm_cdf(self.b) - self.cdf_a  # Z

    def cdf(self, p: torch.Tensor) -> torch.Tensor:
        return ((_norm_cdf((p - self.mu) / self.sigma) - self.cdf_a) / self.mass).clamp(0.0, 1.0)

    def sf(self, p: torch.Tensor) -> torch.Tensor:
        return ((_norm_sf((p - self.mu) / self.sigma) - self.sf_b) / self.mass).clamp(0.0, 1.0)

    def log_pdf(self, p: torch.Tensor) -> torch.Tensor:
        return _norm_logpdf((p - self.mu) / self.sigma) - math.log(self.sigma) - torch.log(self.mass)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        # ndtri is differentiable, so autograd can check loss_scaling against -p'/p independently.
        lower, v = _tail_split(u)
        z_low = torch.special.ndtri(self.cdf_a + v * self.mass)  # Phi(z) = Phi(a) + u Z
        z_up = -torch.special.ndtri(self.sf_b + v * self.mass)  # 1 - Phi(z) = 1 - Phi(b) + (1 - u) Z
        z = torch.where(lower, z_low, z_up)
        return (self.mu + self.sigma * z).clamp(0.0, 1.0)


def _check_gaussian(name: str, mu: float, sigma: float) -> None:
    if not (0.0 < mu < 1.0) or not sigma > 0.0:
        raise UserError(
            f"diffusion.noise: {name} needs mean in (0, 1) and standard deviation > 0, found mean={mu}, std={sigma}"
        )


# A float64 uniform cannot resolve quantiles below 2^-53; the p-range beyond the reachable quantiles is
# silently missing from the NELBO. Refuse parameters for which that range is wider than the 1e-3 that
# the reference's own t >= 1e-3 sampler drops.
_REACH_TOL = 1e-3


def _check_reach(schedule: "_InverseCdf", what: str) -> None:
    """Refuse a schedule whose float64 quantiles leave more than _REACH_TOL of [0, 1] unreachable.

    The edges are mapped through the schedule's own (defensively mixed) quantile function, so the
    uniform part counts: its CDF alone is rho p, hence with rho > 0 the reachable range is at least
    [2^-53/rho, 1 - 2^-53/rho] whatever the Gaussian parts, and only rho = 0 can fail here.
    """
    edge = torch.tensor([2.0**-53, 1.0 - 2.0**-53], dtype=torch.float64)
    p_lo, p_hi = schedule.mask_prob(edge).tolist()
    if p_lo > _REACH_TOL or 1.0 - p_hi > _REACH_TOL:
        raise UserError(
            f"diffusion.noise: {what} puts too little mass near the ends of [0, 1] for a float64 sampler "
            f"(reachable p in [{p_lo:.3g}, {p_hi:.3g}], need [<{_REACH_TOL}, >1-{_REACH_TOL}]); set "
            f"diffusion.noise.uniform_mix > 0 (default 0.1) or widen the standard deviation"
        )


class _Uniform:
    """U[0, 1]: the defensive component mixed into q (density 1, so its log-density is 0)."""

    def cdf(self, p: torch.Tensor) -> torch.Tensor:
        return p.clamp(0.0, 1.0)

    def sf(self, p: torch.Tensor) -> torch.Tensor:
        return (1.0 - p).clamp(0.0, 1.0)

    def log_pdf(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p)


class _Mixture:
    """sum_i w_i q_i on [0, 1] (weights summing to 1): CDF, survival, log-density and inverse CDF.

    A single truncated normal keeps its closed-form (and autograd-differentiable) ``icdf``; any real
    mixture is inverted by bisection on the CDF (the lower half of u) or the survival function (the
    upper half, for tail precision), in float64 to machine precision.
    """

    def __init__(self, parts: list) -> None:
        # Zero-weight parts (rho = 0) are dropped so rho = 0 is exactly the unmixed schedule.
        self.parts = [(float(w), d) for w, d in parts if w > 0.0]
        self.closed_form = len(self.parts) == 1 and hasattr(self.parts[0][1], "icdf")

    def cdf(self, p: torch.Tensor) -> torch.Tensor:
        return sum(w * d.cdf(p) for w, d in self.parts)

    def sf(self, p: torch.Tensor) -> torch.Tensor:
        return sum(w * d.sf(p) for w, d in self.parts)

    def log_pdf(self, p: torch.Tensor) -> torch.Tensor:
        # logsumexp: a component's density may underflow in the far tail while the mixture's does not.
        terms = torch.stack([math.log(w) + d.log_pdf(p) for w, d in self.parts])
        return torch.logsumexp(terms, dim=0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        if self.closed_form:
            return self.parts[0][1].icdf(u)
        lower, v = _tail_split(u)
        lo = torch.zeros_like(u)
        hi = torch.ones_like(u)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            # F(mid) < u  <=>  S(mid) > 1 - u : go right.
            right = torch.where(lower, self.cdf(mid) < v, self.sf(mid) > v)
            lo = torch.where(right, mid, lo)
            hi = torch.where(right, hi, mid)
        return 0.5 * (lo + hi)


def _defensive(parts: list, uniform_mix: float) -> _Mixture:
    """q_mix = (1 - rho) q + rho U[0, 1] (Hesterberg's defensive mixture): weight <= 1/(rho p)."""
    if not (isinstance(uniform_mix, (int, float)) and 0.0 <= uniform_mix < 1.0):
        raise UserError(f"diffusion.noise.uniform_mix must be in [0, 1), found {uniform_mix!r}")
    return _Mixture([((1.0 - uniform_mix) * w, d) for w, d in parts] + [(uniform_mix, _Uniform())])


class _ImplicitGrad(torch.autograd.Function):
    """Identity on p with dp/du = 1/q(p) (implicit-function derivative of Q(p) = u)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, p: torch.Tensor, inv_density: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv_density)
        return p.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inv_density,) = ctx.saved_tensors
        return grad * inv_density, None, None


class _InverseCdf(NoiseSchedule):
    """p = Q^{-1}(u) for the (defensively mixed) density ``self.q``; weight 1/(p q(p))."""

    importance = True
    q: _Mixture

    def cdf(self, p: torch.Tensor) -> torch.Tensor:
        return self.q.cdf(p)

    def sf(self, p: torch.Tensor) -> torch.Tensor:
        return self.q.sf(p)

    def density(self, p: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.q.log_pdf(p))

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        if self.q.closed_form:
            return self.q.icdf(t)  # ndtri is differentiable: autograd gives dp/du independently
        with torch.no_grad():
            p = self.q.icdf(t.detach())
            inv_q = torch.exp(-self.q.log_pdf(p))
        return _ImplicitGrad.apply(t, p, inv_q) if t.requires_grad else p

    def loss_scaling(self, t: torch.Tensor) -> torch.Tensor:
        # dp/du = 1/q(p): computed as exp(-log q) so the tails neither overflow nor divide by 0.
        p = self.mask_prob(t)
        return -torch.exp(-self.q.log_pdf(p)) / p


class Gaussian(_InverseCdf):
    """p ~ (1 - rho) Normal(mu, sigma) truncated to [0, 1] + rho U[0, 1] (inverse CDF of u)."""

    name = "gaussian"

    def __init__(self, mu: float = 0.5, sigma: float = 0.1, uniform_mix: float = 0.0) -> None:
        _check_gaussian("gaussian", mu, sigma)
        self.uniform_mix = uniform_mix
        self.dist = _TruncNormal(mu, sigma)
        self.q = _defensive([(1.0, self.dist)], uniform_mix)
        _check_reach(self, f"gaussian(mean={mu}, std={sigma}, uniform_mix={uniform_mix})")


class BimodalGaussian(_InverseCdf):
    """p ~ (1 - rho) [w1 N(mu1, sigma1) + (1 - w1) N(mu2(tau), sigma2)] + rho U[0, 1], normals truncated to [0, 1].

    u -> p inverts the mixture CDF (:class:`_Mixture`), so p is monotone in u and the weight is
    1/(p q(p)) with the full mixture density q.
    """

    name = "bimodal_gaussian"

    def __init__(
        self,
        mu1: float = 0.15,
        sigma1: float = 0.02,
        mu2: float = 0.4,
        sigma2: float = 0.08,
        w1: float = 0.7,
        mu2_end: float | None = None,
        tau_scale: float = 3.0,
        uniform_mix: float = 0.0,
    ) -> None:
        _check_gaussian("bimodal_gaussian component 1", mu1, sigma1)
        if not 0.0 < w1 < 1.0:
            raise UserError(f"diffusion.noise.w1 must be in (0, 1), found {w1}")
        self.mu1, self.sigma1, self.sigma2, self.w1 = mu1, sigma1, sigma2, w1
        self.mu2_start = mu2
        self.mu2_end = mu2 if mu2_end is None else mu2_end
        self.tau_scale = tau_scale
        self.uniform_mix = uniform_mix
        self.q1 = _TruncNormal(mu1, sigma1)
        # mu2(tau) moves monotonically between its two ends: checking both covers the whole run.
        for progress in (float("inf"), 0.0):
            self.set_progress(progress)
            _check_reach(
                self,
                f"bimodal_gaussian(mu1={mu1}, sigma1={sigma1}, mu2={self.mu2:.3g}, sigma2={sigma2}, w1={w1}, "
                f"uniform_mix={uniform_mix})",
            )

    def set_progress(self, progress: float) -> None:
        tau = self.tau_scale * float(progress)
        self.mu2 = self.mu2_start + (self.mu2_end - self.mu2_start) * (1.0 - math.exp(-tau))
        _check_gaussian("bimodal_gaussian component 2", self.mu2, self.sigma2)
        self.q2 = _TruncNormal(self.mu2, self.sigma2)
        self.q = _defensive([(self.w1, self.q1), (1.0 - self.w1, self.q2)], self.uniform_mix)


SCHEDULES: Dict[str, Callable[[object], NoiseSchedule]] = {
    "loglinear": lambda c: LogLinear(),
    "square": lambda c: Power(2.0, c.eps),
    "square_root": lambda c: Power(0.5, c.eps),
    "log": lambda c: Logarithmic(),
    "cosine": lambda c: Cosine(c.eps),
    "gaussian": lambda c: Gaussian(c.mu, c.sigma, uniform_mix=c.uniform_mix),
    "bimodal_gaussian": lambda c: BimodalGaussian(
        c.mu1, c.sigma1, c.mu2, c.sigma2, c.w1, mu2_end=c.mu2_end, tau_scale=c.tau_scale, uniform_mix=c.uniform_mix
    ),
}


def build_schedule(noise_cfg: object) -> NoiseSchedule:
    """The schedule named by ``diffusion.noise.type`` (a :class:`NoiseConfig`)."""
    kind = getattr(noise_cfg, "type")
    if kind not in SCHEDULES:
        raise UserError(f"diffusion.noise.type: expected one of {sorted(SCHEDULES)}, found {kind!r}")
    return SCHEDULES[kind](noise_cfg)
