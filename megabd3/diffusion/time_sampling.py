"""Per-(sequence, block) time sampling and the forward (masking) process.

Spec section 1.1 steps 1-3:
  1. one t per (sequence k, block b) of the local micro-batch; antithetic (stratified) version
     ``u[k, b] = (r[k, b] + k*B + b) / (K*B)`` with r ~ U[0, 1), so every (k, b) cell owns one
     sub-interval of width 1/(K*B) of [0, 1) (strata are per rank, as in the reference); then
     ``t = lo + u (hi - lo)``;
  2. every token is masked independently with probability p(t) of its block;
  3. optional resampling: blocks whose realised masked fraction falls outside [p(beta), p(omega)]
     (the clip interval mapped to mask probabilities) are redrawn (same p) until every block
     complies; positions kept clean (BOS with ignore_bos) are forced unmasked afterwards, as in the
     reference.

The L'=1 "tuned" schedule U[1, 1] is an explicit mode (``TimeSampler(tuned=True)``): t = 1, all
positions masked, weight 1. Unlike the reference it is never triggered by a lower bound > 0.5.
Times are float64 so the inverse-CDF schedules keep their tail precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from megabd3.errors import UserError

if TYPE_CHECKING:
    from megabd3.diffusion.schedules import NoiseSchedule

# The resampling loop redraws violating blocks; a feasible interval converges in a few rounds.
MAX_RESAMPLE_ROUNDS = 1000


@dataclass
class TimeSampler:
    """Draws t in [low, high] per (sequence, block); ``tuned`` gives t = 1 everywhere."""

    low: float
    high: float
    antithetic: bool = True
    tuned: bool = False

    def __post_init__(self) -> None:
        if not self.tuned and not (0.0 <= self.low <= self.high <= 1.0):
            raise UserError(
                f"diffusion.clip_min/clip_max: need 0 <= clip_min <= clip_max <= 1, found [{self.low}, {self.high}]"
            )

    @property
    def interval(self) -> Tuple[float, float]:
        return (1.0, 1.0) if self.tuned else (self.low, self.high)

    def sample(
        self, batch: int, num_blocks: int, generator: Optional[torch.Generator], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """t of shape [batch, num_blocks], float64."""
        if self.tuned:
            return torch.ones(batch, num_blocks, dtype=torch.float64, device=device)
        r = torch.rand(batch, num_blocks, generator=generator, dtype=torch.float64, device=device)
        if self.antithetic:
            cells = batch * num_blocks
            offset = torch.arange(cells, dtype=torch.float64, device=device).view(batch, num_blocks)
            r = (r + offset) / cells
        return self.low + r * (self.high - self.low)


#: (lower, upper) bounds on a block's realised masked fraction; None = that end is not enforced.
Bounds = Tuple[Optional[float], Optional[float]]


def block_to_tokens(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, num_blocks] -> [b, num_blocks * block_size] (each block value repeated over its tokens)."""
    return values.repeat_interleave(block_size, dim=1)


def _fraction_ok(masked: torch.Tensor, block_size: int, bounds: Bounds) -> torch.Tensor:
    frac = masked.view(masked.shape[0], -1, block_size).double().mean(-1)
    ok = torch.ones_like(frac, dtype=torch.bool)
    lo, hi = bounds
    if lo is not None:
        ok &= frac >= lo
    if hi is not None:
        ok &= frac <= hi
    return ok


def resample_bounds(interval: Tuple[float, float], eps: float, schedule: Optional["NoiseSchedule"] = None) -> Bounds:
    """Bounds on a block's realised masked fraction: (p(lo) if lo > eps, p(hi) if hi < 1) (spec 1.1 step 3).

    Which ends are enforced follows the reference: the lower only if the clip starts above eps, the
    upper only if it stops below 1. The realised fraction estimates the mask probability p, not t, so
    the values are the schedule's mask probabilities at the clip ends; for loglinear p = t and they
    equal the reference's t-interval. ``schedule`` = None means p = t.
    """
    lo, hi = interval

    def to_p(t: float) -> float:
        return t if schedule is None else float(schedule.mask_prob(torch.tensor([t], dtype=torch.float64))[0])

    return (to_p(lo) if lo > eps else None, to_p(hi) if hi < 1.0 else None)


def feasible_counts(bounds: Bounds, block_size: int) -> List[int]:
    """Masked counts k in 0..L' whose fraction k/L' lies within ``bounds`` (None = unbounded)."""
    lo, hi = bounds
    return [k for k in range(block_size + 1)
            if (lo is None or k / block_size >= lo) and (hi is None or k / block_size <= hi)]


def resample_problem(bounds: Bounds, block_size: int) -> Optional[str]:
    """Why resampling to ``bounds`` cannot train at this block size, or None.

    Infeasible: no count k/L' lies in the bounds (the redraw loop would never end). Degenerate: the
    only feasible count is 0, so no token is ever masked and the loss is identically zero (e.g. L'=1
    with an upper bound < 1: a 1-token block's fraction is 0 or 1).
    """
    if bounds == (None, None):
        return None
    counts = feasible_counts(bounds, block_size)
    shown = "[" + ", ".join("-" if b is None else f"{b:.4g}" for b in bounds) + "]"
    if not counts:
        return (f"no masked fraction k/{block_size} (k = 0..{block_size}) lies in the mask-probability bounds {shown}, "
                f"so resampling can never finish")
    if counts == [0]:
        return (f"the only masked fraction k/{block_size} in the mask-probability bounds {shown} is 0, so no token "
                f"is ever masked and the training loss is identically zero")
    return None


def sample_mask(
    p_block: torch.Tensor,
    block_size: int,
    generator: Optional[torch.Generator],
    *,
    resample: Optional[Bounds] = None,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean [b, L] mask (True = masked) with P(masked) = p of the token's block.

    resample: (lower, upper) bounds on each block's realised masked fraction (None = unbounded);
      violating blocks are redrawn with the same p until all comply.
    keep: [b, L] bool, positions never masked (e.g. BOS with ignore_bos). They are forced unmasked
      *after* resampling, on the accepted draws: the reference resamples ``q_xt``'s raw Bernoulli draws
      (``_resample_q_xt``) and only then sets ``x_t[:, 0] = x0[:, 0]``. So a kept position's raw draw
      counts in its block's fraction (it is the raw draws that satisfy the bounds), and a block of
      size 1 holding a kept position can still pass a lower bound.
    Random numbers are drawn exactly as the reference does: one uniform per token for the first draw,
    then one per token (of the whole tensor) per redraw round, used only in the violating blocks.
    """
    p_tok = block_to_tokens(p_block, block_size)
    device = p_block.device

    def draw() -> torch.Tensor:
        return torch.rand(p_tok.shape, generator=generator, dtype=torch.float64, device=device) < p_tok

    def forced(m: torch.Tensor) -> torch.Tensor:
        return m & ~keep if keep is not None else m

    masked = draw()
    if resample is None or resample == (None, None):
        return forced(masked)
    problem = resample_problem(resample, block_size)
    if problem is not None:
        raise UserError(f"diffusion.resample: {problem}; set diffusion.resample=false or widen diffusion.clip_min/clip_max")
    for _ in range(MAX_RESAMPLE_ROUNDS):
        ok = _fraction_ok(masked, block_size, resample)
        if bool(ok.all()):
            return forced(masked)
        redo = block_to_tokens(~ok, block_size)
        masked = torch.where(redo, draw(), masked)
    raise UserError(
        f"diffusion.resample: masked fractions did not reach {resample} after {MAX_RESAMPLE_ROUNDS} rounds "
        "(p too far from the interval for the block size); set diffusion.resample=false or widen the interval"
    )
