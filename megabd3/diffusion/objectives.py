"""Training and evaluation objectives: ar, mdlm, bd3lm, sedd (registry ``OBJECTIVES``).

One interface (docs/interfaces.md): ``objective(model_fn, x0, generator, *, train, attention_mask=None)
-> ObjectiveOutput``. An objective noises x0 with the given generator, calls the model, and returns

  loss            what to backprop: sum over counted tokens of ``per_token`` / number of counted tokens
                  (the loss is averaged over ALL tokens, masked or not — spec trap 1);
  nelbo_sum       sum over counted tokens of the unweighted NELBO terms; with ``train=False`` these are
                  the honest terms (loglinear, t ~ U[eps, 1], no weighting, no clipping, no resampling);
  token_count     number of counted tokens (attention_mask true, minus position 0 with ignore_bos);
  per_token       [b, L] terms of ``loss`` (weighted when training, 0 on uncounted tokens);
  per_block_mean  [b, B] mean of ``per_token`` over each block's L' positions (Var. NELBO, clip search).

Masked diffusion (mdlm, bd3lm) uses SUBS: the mask logit is -inf, unmasked positions carry over
(loss exactly 0), and the NELBO term at a masked position is ``-loss_scaling(t_block) * CE``.
``bd3lm`` feeds [x_t ; x0] (2L tokens, positions 0..L-1 twice) with the BD3 attention spec and asks the
model for logits of the x_t half only. ``mdlm`` is the one-block case on x_t alone (bidirectional).
``ar`` is next-token cross-entropy (exact NLL; the mask logit is -inf, as in the reference's AR).
``sedd`` is absorbing-state score entropy (spec section 6) with time conditioning on sigma; its NELBO
is the diffusion-weighted score-entropy bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type

import torch

from megabd3.diffusion import vocab_ops
from megabd3.diffusion.masks import AttentionSpec
from megabd3.diffusion.schedules import LogLinear, NoiseSchedule, build_schedule, sigma_from_p
from megabd3.diffusion.time_sampling import (
    Bounds,
    TimeSampler,
    block_to_tokens,
    resample_bounds,
    resample_problem,
    sample_mask,
)
from megabd3.diffusion.weighting import check_weighting, loss_weight
from megabd3.errors import UserError

ModelFn = Callable[..., torch.Tensor]
Interval = Tuple[float, float]
TUNED: Interval = (1.0, 1.0)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    nelbo_sum: torch.Tensor
    token_count: torch.Tensor
    per_token: torch.Tensor
    per_block_mean: torch.Tensor
    #: the per-(sequence, block) times and the mask actually drawn (for logging and tests).
    t: Optional[torch.Tensor] = None
    masked: Optional[torch.Tensor] = None


@dataclass
class ObjectiveSettings:
    """Everything an objective reads from the config (see :func:`settings_from_config`)."""

    block_size: int = 1
    sampling_eps: float = 1e-3
    train_interval: Interval = (1e-3, 1.0)
    tuned: bool = False
    antithetic: bool = True
    resample: bool = False
    weighting: str = "none"
    weighting_k: float = 0.0
    ignore_bos: bool = False
    time_conditioning: bool = False
    sigma_max: float = -math.log(1e-3)
    noise_eps: float = 1e-3
    schedule: NoiseSchedule = field(default_factory=LogLinear)


class Objective:
    """Base class: noise, forward, reduce. Subclasses define :meth:`_terms`."""

    name = ""
    #: whether training weightings / schedules / clipping apply (masked diffusion only).
    diffusion = True

    def __init__(self, settings: ObjectiveSettings, mask_id: int, vocab_size: int) -> None:
        check_weighting(settings.weighting)
        if not self.diffusion and settings.weighting != "none":
            raise UserError(f"diffusion.weighting={settings.weighting!r} applies to mdlm/bd3lm only, not {self.name}; set it to none")
        if settings.tuned and settings.block_size != 1:
            raise UserError(
                f"diffusion.time_mode=tuned (U[1,1], exact NLL) needs block_size 1, found {settings.block_size}; use time_mode=uniform"
            )
        if not 0 <= mask_id < vocab_size:
            raise UserError(f"mask id {mask_id} is outside the model vocabulary of size {vocab_size}")
        self.settings = settings
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.train_sampler = self._sampler(settings.train_interval)
        self.eval_sampler = TimeSampler(settings.sampling_eps, 1.0, settings.antithetic)
        self.eval_schedule = LogLinear()

    # ---- interval management (clip search writes here) ------------------------------------------
    def _sampler(self, interval: Interval, tuned: Optional[bool] = None) -> TimeSampler:
        s = self.settings
        if tuple(interval) == TUNED and s.block_size == 1:
            return TimeSampler(1.0, 1.0, s.antithetic, tuned=True)
        if tuple(interval) == (s.sampling_eps, 1.0):
            # "Unclipped" (the clip search's full candidate, a config's default clip): the schedule's own
            # full interval, (0, 1) for the importance schedules; [eps, 1] would re-truncate their p-range.
            interval = s.schedule.full_interval(s.sampling_eps)
        tuned = s.tuned if tuned is None else tuned
        return TimeSampler(float(interval[0]), float(interval[1]), s.antithetic, tuned=tuned)

    @property
    def train_interval(self) -> Interval:
        return self.train_sampler.interval

    def set_train_interval(self, interval: Interval) -> None:
        """Use [beta, omega] for training from now on; (1, 1) with block size 1 selects the tuned mode."""
        self.train_sampler = self._sampler(interval, tuned=False)

    def set_progress(self, progress: float) -> None:
        """Training progress step/steps, for time-varying schedules."""
        self.settings.schedule.set_progress(progress)

    # ---- the call -----------------------------------------------------------------------------
    def __call__(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        generator: Optional[torch.Generator],
        *,
        train: bool,
        attention_mask: Optional[torch.Tensor] = None,
        interval: Optional[Interval] = None,
    ) -> ObjectiveOutput:
        """Noise x0 [b, L], run the model, reduce.

        interval: evaluate the *training* schedule on this clip interval, unweighted (clip search);
          overrides ``train``.
        """
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [batch, seq_len], found shape {tuple(x0.shape)}")
        b, L = x0.shape
        counted = torch.ones_like(x0, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool).clone()
        key_padding = None if attention_mask is None else attention_mask.to(torch.bool)
        if interval is not None:
            mode = ("search", self.settings.schedule, self._sampler(interval, tuned=False), "none")
        elif train:
            mode = ("train", self.settings.schedule, self.train_sampler, self.settings.weighting)
        else:
            mode = ("eval", self.eval_schedule, self.eval_sampler, "none")
        per_token, nelbo_tok, counted, t, masked, block = self._terms(model_fn, x0, generator, counted, key_padding, *mode)
        per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
        nelbo_tok = torch.where(counted, nelbo_tok, torch.zeros_like(nelbo_tok))
        count = counted.sum()
        loss = per_token.sum() / count.clamp(min=1)
        per_block_mean = per_token.detach().view(b, L // block, block).mean(-1)
        return ObjectiveOutput(
            loss=loss,
            nelbo_sum=nelbo_tok.detach().double().sum(),
            token_count=count,
            per_token=per_token,
            per_block_mean=per_block_mean,
            t=t,
            masked=masked,
        )

    def _terms(self, model_fn, x0, generator, counted, key_padding, mode, schedule, sampler, weighting):  # type: ignore[no-untyped-def]
        """-> (per_token, nelbo_tok, counted, t, masked, block_size)."""
        raise NotImplementedError


def subs_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask_id: int, vocab_size: int) -> torch.Tensor:
    """CE of the SUBS parameterization: padded vocab rows and the mask token get -inf logits."""
    logits = vocab_ops.suppress_from(logits, vocab_size)
    logits = vocab_ops.set_token_logit(logits, mask_id, float("-inf"))
    return vocab_ops.cross_entropy(logits, target)


class MaskedDiffusion(Objective):
    """Shared noising and SUBS loss of mdlm and bd3lm; subclasses choose block size and model input."""

    def __init__(self, settings: ObjectiveSettings, mask_id: int, vocab_size: int) -> None:
        super().__init__(settings, mask_id, vocab_size)
        # Refuse at build time (so also at config validation) a resampled interval that cannot train.
        self._resample_bounds(self.train_sampler, settings.schedule, settings.block_size)

    def block_size(self, seq_len: int) -> int:
        raise NotImplementedError

    def _resample_bounds(self, sampler: TimeSampler, schedule: NoiseSchedule, block: int) -> Optional[Bounds]:
        """Bounds on the realised masked fraction, or None when resampling is off for this sampler.

        Resampling applies to a clipped interval only (not the schedule's full interval, not the
        tuned U[1, 1]); the bounds are mask probabilities [p(beta), p(omega)] (time_sampling).
        Raises when no count k/L' is allowed, or only k = 0 (identically zero loss).
        """
        s = self.settings
        if not s.resample or sampler.tuned or sampler.interval == schedule.full_interval(s.sampling_eps):
            return None
        bounds = resample_bounds(sampler.interval, s.sampling_eps, schedule)
        problem = resample_problem(bounds, block)
        if problem is not None:
            lo, hi = sampler.interval
            raise UserError(
                f"diffusion.resample=true with block_size={block} and clip [{lo:g}, {hi:g}] ({schedule.name}): "
                f"{problem}; set diffusion.resample=false or widen diffusion.clip_min/clip_max"
            )
        return bounds

    def _forward(self, model_fn, x_t, x0, key_padding, sigma, block):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def _terms(self, model_fn, x0, generator, counted, key_padding, mode, schedule, sampler, weighting):  # type: ignore[no-untyped-def]
        s = self.settings
        b, L = x0.shape
        block = self.block_size(L)
        if L % block:
            raise UserError(f"diffusion.block_size {block} must divide the sequence length {L}")
        t = sampler.sample(b, L // block, generator, x0.device)
        if sampler.tuned:
            # U[1,1]: everything masked, weight exactly 1 (spec 1.3) - never implied by the interval.
            p = torch.ones_like(t)
            loss_scaling = -torch.ones_like(t)
        else:
            loss_scaling, p = schedule(t)
        keep = None
        if s.ignore_bos:
            keep = torch.zeros_like(x0, dtype=torch.bool)
            keep[:, 0] = True
            counted[:, 0] = False
        bounds = self._resample_bounds(sampler, schedule, block) if mode != "eval" else None
        masked = sample_mask(p, block, generator, resample=bounds, keep=keep)
        x_t = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        sigma = None
        if s.time_conditioning:
            if L // block != 1:
                raise UserError("model.time_conditioning needs one noise level per sequence; bd3lm with several blocks is not time-conditioned (set it false)")
            sigma = sigma_from_p(p[:, 0], s.sigma_max).float()
        logits = self._forward(model_fn, x_t, x0, key_padding, sigma, block)
        ce = subs_cross_entropy(logits, x0, self.mask_id, self.vocab_size)
        nelbo_scale = block_to_tokens(-loss_scaling, block).float()
        # where(), not multiply: CE at carried-over positions is irrelevant and must not leak a NaN.
        nelbo_tok = torch.where(masked, nelbo_scale * ce, torch.zeros_like(ce))
        if weighting == "none" or sampler.tuned:
            per_token = nelbo_tok
        else:
            w = loss_weight(weighting, p, loss_scaling, s.weighting_k)
            per_token = nelbo_tok * block_to_tokens(w, block).float()
        return per_token, nelbo_tok, counted, t, masked, block


class MDLM(MaskedDiffusion):
    name = "mdlm"

    def block_size(self, seq_len: int) -> int:
        return seq_len

    def _forward(self, model_fn, x_t, x0, key_padding, sigma, block):  # type: ignore[no-untyped-def]
        b, L = x_t.shape
        positions = torch.arange(L, device=x_t.device).expand(b, L)
        return model_fn(x_t, positions, AttentionSpec("full", L, L, key_padding), sigma, None)


class BD3LM(MaskedDiffusion):
    name = "bd3lm"

    def block_size(self, seq_len: int) -> int:
        return self.settings.block_size

    def _forward(self, model_fn, x_t, x0, key_padding, sigma, block):  # type: ignore[no-untyped-def]
        b, L = x_t.shape
        positions = torch.arange(L, device=x_t.device).repeat(2).expand(b, 2 * L)  # both halves: 0..L-1
        spec = AttentionSpec("bd3", L, block, key_padding)
        return model_fn(torch.cat([x_t, x0], dim=1), positions, spec, sigma, (0, L))


class AR(Objective):
    """Next-token cross-entropy; position 0 has no prediction and is never counted."""

    name = "ar"
    diffusion = False

    def _terms(self, model_fn, x0, generator, counted, key_padding, mode, schedule, sampler, weighting):  # type: ignore[no-untyped-def]
        b, L = x0.shape
        positions = torch.arange(L, device=x0.device).expand(b, L)
        logits = model_fn(x0, positions, AttentionSpec("causal", L, 1, key_padding), None, (0, L - 1))
        # The reference's AR output: log-softmax with the mask logit at -1e6 (spec section 4), i.e. the
        # mask token, which never occurs in data, takes no probability mass.
        ce = subs_cross_entropy(logits, x0[:, 1:], self.mask_id, self.vocab_size)
        per_token = torch.cat([torch.zeros_like(ce[:, :1]), ce], dim=1)
        counted[:, 0] = False
        return per_token, per_token, counted, None, None, 1


class SEDD(Objective):
    """Absorbing-state score entropy (Lou et al.; the MDLM repo's ``_score_entropy``).

    p_eff = (1 - eps) p(t) so that sigma = -log(1 - p_eff) <= -log(eps) (the reference's loglinear
    numerics; without the factor dsigma = 1/(1 - t) makes the t-integral diverge). At a masked
    position, with q = 1/expm1(sigma) the true ratio p_t(x0)/p_t(mask) and
    log s_y = logit_y - log expm1(sigma) - log(V - 1):
        SE = sum_{y != mask} s_y - q log s_{x0} + q (log q - 1)   (>= 0, = 0 iff s = true ratios)
    and the per-token term is dsigma/dt * SE. Integrated over t this is the DWDSE bound on -log p(x0)
    (the prior term at t = 1, of order eps, is dropped as in the reference).
    """

    name = "sedd"
    diffusion = False

    def _terms(self, model_fn, x0, generator, counted, key_padding, mode, schedule, sampler, weighting):  # type: ignore[no-untyped-def]
        s = self.settings
        b, L = x0.shape
        t = sampler.sample(b, 1, generator, x0.device)
        loss_scaling, p = schedule(t)
        scale = 1.0 - s.noise_eps
        p_eff = scale * p
        # d sigma / dt = (1-eps) p'(t) / (1 - p_eff) with p' = -loss_scaling * p.
        dsigma = (-loss_scaling) * p * scale / (1.0 - p_eff)
        sigma = sigma_from_p(p_eff, s.sigma_max)  # [b, 1]
        keep = None
        if s.ignore_bos:
            keep = torch.zeros_like(x0, dtype=torch.bool)
            keep[:, 0] = True
            counted[:, 0] = False
        masked = sample_mask(p_eff, L, generator, keep=keep)
        x_t = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        positions = torch.arange(L, device=x0.device).expand(b, L)
        logits = model_fn(x_t, positions, AttentionSpec("full", L, L, key_padding), sigma[:, 0].float(), None)
        se = score_entropy(logits, x0, sigma, self.mask_id, self.vocab_size)
        nelbo_tok = torch.where(masked, dsigma.float() * se, torch.zeros_like(se))
        return nelbo_tok, nelbo_tok, counted, t, masked, L


def score_entropy(
    logits: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, mask_id: int, vocab_size: int
) -> torch.Tensor:
    """Per-position absorbing score entropy [b, L] (valid at masked positions); sigma is [b, 1]."""
    sigma = sigma.double()
    # log(expm1(sigma)) without cancellation for small sigma.
    log_expm1 = torch.where(sigma < 0.5, torch.log(torch.expm1(sigma)), sigma + torch.log(-torch.expm1(-sigma)))
    offset = (log_expm1 + math.log(vocab_size - 1)).float()  # [b, 1]
    log_q = (-log_expm1).float()  # log of the true ratio q = 1/expm1(sigma)
    logits = vocab_ops.suppress_from(logits, vocab_size)
    logits = vocab_ops.set_token_logit(logits, mask_id, float("-inf"))
    pos_term = torch.exp(vocab_ops.logsumexp(logits) - offset)
    neg_term = torch.exp(log_q) * (vocab_ops.gather_logit(logits, x0) - offset)
    const = torch.exp(log_q) * (log_q - 1.0)
    return pos_term - neg_term + const


OBJECTIVES: Dict[str, Type[Objective]] = {"ar": AR, "mdlm": MDLM, "bd3lm": BD3LM, "sedd": SEDD}


def settings_from_config(cfg: object, *, evaluation: bool = False) -> ObjectiveSettings:
    """ObjectiveSettings from a :class:`megabd3.config.schema.Config`.

    evaluation=True forces every training-only knob off (loglinear, [eps, 1], no weighting, no
    resampling, no tuned mode) — :mod:`megabd3.eval.nelbo` uses it so no config can reach the PPL.
    """
    d = cfg.diffusion  # type: ignore[attr-defined]
    if d.objective not in OBJECTIVES:
        raise UserError(f"diffusion.objective: expected one of {sorted(OBJECTIVES)}, found {d.objective!r}")
    if d.time_mode not in ("uniform", "tuned"):
        raise UserError(f"diffusion.time_mode: expected uniform or tuned, found {d.time_mode!r}")
    block = {"ar": 1, "mdlm": cfg.data.seq_len, "sedd": cfg.data.seq_len}.get(d.objective, d.block_size)  # type: ignore[attr-defined]
    if evaluation:
        schedule: NoiseSchedule = LogLinear()
        interval: Interval = (d.sampling_eps, 1.0)
        tuned, resample, weighting = False, False, "none"
    else:
        schedule = build_schedule(d.noise)
        unclipped = (d.clip_min, d.clip_max) == (d.sampling_eps, 1.0)
        interval = schedule.full_interval(d.sampling_eps) if unclipped else (d.clip_min, d.clip_max)
        tuned, resample, weighting = d.time_mode == "tuned", d.resample, d.weighting
    return ObjectiveSettings(
        block_size=block,
        sampling_eps=d.sampling_eps,
        train_interval=interval,
        tuned=tuned,
        antithetic=d.antithetic,
        resample=resample,
        weighting=weighting,
        weighting_k=d.weighting_k,
        ignore_bos=d.ignore_bos,
        time_conditioning=bool(cfg.model.time_conditioning) or d.objective == "sedd",  # type: ignore[attr-defined]
        sigma_max=d.sigma_max,
        noise_eps=d.noise.eps,
        schedule=schedule,
    )


def build_objective(cfg: object, mask_id: int, vocab_size: int, *, evaluation: bool = False) -> Objective:
    """The objective named by ``diffusion.objective``; ``vocab_size`` = ids the model may predict (incl. mask)."""
    settings = settings_from_config(cfg, evaluation=evaluation)
    return OBJECTIVES[cfg.diffusion.objective](settings, mask_id, vocab_size)  # type: ignore[attr-defined]


#: Keys a build failure is attributed to (for the config loader's "set in FILE" note).
_NOISE_KEYS = ("diffusion.noise.type",)
_OBJECTIVE_KEYS = ("diffusion.objective", "diffusion.block_size", "diffusion.resample", "diffusion.clip_min",
                   "diffusion.clip_max")


def build_problem(cfg: object) -> Optional[Tuple[Tuple[str, ...], str]]:
    """(keys, message) of the UserError that building ``cfg``'s training objective raises, or None.

    Config validation calls this so that a config that validates also builds: the noise schedule
    (e.g. its float64 reach check), the time sampler and the resampling feasibility. The vocabulary
    is a placeholder (mask id 0 of 1): nothing checked at build time depends on it.
    """
    try:
        settings = settings_from_config(cfg)
    except UserError as exc:
        return _NOISE_KEYS, str(exc)
    try:
        OBJECTIVES[cfg.diffusion.objective](settings, 0, 1)  # type: ignore[attr-defined]
    except UserError as exc:
        return _OBJECTIVE_KEYS, str(exc)
    return None
