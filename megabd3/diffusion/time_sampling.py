"""Per-(sequence, block) time sampling and the forward (masking) process.

Spec section 1.1 steps 1-3:
  1. one t per (sequence k, block b) of the local micro-batch; antithetic (stratified) version
     ``u[k, b] = (r[k, b] + k*B + b) / (K*B)`` with r ~ U[0, 1), so every (k, b) cell owns one
     sub-interval of width 1/(K*B) of [0, 1) (strata are per rank, as in the reference); then
     ``t = lo + u (hi - lo)``;
  2. every token is masked independently with probability p(t) of its block;
  3. optional resampling: blocks whose realised masked fraction falls outside the clip interval are
     redrawn (same p) until every block complies.

The L'=1 "tuned" schedule U[1, 1] is an explicit mode (``TimeSampler(tuned=True)``): t = 1, all
positions masked, weight 1. Unlike the reference it is never triggered by a lower bound > 0.5.
Times are float64 so the inverse-CDF schedules keep their tail precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megabd3.errors import UserError

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


def block_to_tokens(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, num_blocks] -> [b, num_blocks * block_size] (each block value repeated over its tokens)."""
    return values.repeat_interleave(block_size, dim=1)


def _fraction_ok(masked: torch.Tensor, block_size: int, bounds: Tuple[Optional[float], Optional[float]]) -> torch.Tensor:
    frac = masked.view(masked.shape[0], -1, block_size).double().mean(-1)
    ok = torch.ones_like(frac, dtype=torch.bool)
    lo, hi = bounds
    if lo is not None:
        ok &= frac >= lo
    if hi is not None:
        ok &= frac <= hi
    return ok


def resample_bounds(interval: Tuple[float, float], eps: float) -> Tuple[Optional[float], Optional[float]]:
    """Which ends the resampling enforces (spec 1.1 step 3): the lower only if > eps, the upper only if < 1."""
    lo, hi = interval
    return (lo if lo > eps else None, hi if hi < 1.0 else None)


def sample_mask(
    p_block: torch.Tensor,
    block_size: int,
    generator: Optional[torch.Generator],
    *,
    resample: Optional[Tuple[Optional[float], Optional[float]]] = None,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean [b, L] mask (True = masked) with P(masked) = p of the token's block.

    resample: (lower, upper) bounds on each block's realised masked fraction (None = unbounded);
      violating blocks are redrawn with the same p until all comply.
    keep: [b, L] bool, positions never masked (e.g. BOS with ignore_bos). They count as unmasked in the
      realised fraction, as in the reference.
    """
    b, num_blocks = p_block.shape
    p_tok = block_to_tokens(p_block, block_size)
    device = p_block.device

    def draw() -> torch.Tensor:
        m = torch.rand(p_tok.shape, generator=generator, dtype=torch.float64, device=device) < p_tok
        return m & ~keep if keep is not None else m

    masked = draw()
    if resample is None or resample == (None, None):
        return masked
    lo, hi = resample
    if lo is not None and hi is not None:
        # Feasibility: some integer count k with lo <= k/L' <= hi must exist.
        counts = torch.arange(block_size + 1, dtype=torch.float64) / block_size
        if not bool(((counts >= lo) & (counts <= hi)).any()):
            raise UserError(
                f"diffusion: resampling cannot realise a masked fraction in [{lo}, {hi}] with block_size {block_size}; "
                "widen clip_min/clip_max or set diffusion.resample=false"
            )
    for _ in range(MAX_RESAMPLE_ROUNDS):
        ok = _fraction_ok(masked, block_size, resample)
        if bool(ok.all()):
            return masked
        redo = block_to_tokens(~ok, block_size)
        masked = torch.where(redo, draw(), masked)
    raise UserError(
        f"diffusion: resampling did not reach masked fractions in {resample} after {MAX_RESAMPLE_ROUNDS} rounds "
        "(interval too narrow for the block size or p); set diffusion.resample=false or widen the interval"
    )
