"""Parallel decoding inside a block: reveal several masked positions per denoising call.

Two rules (``sampling.strategy``), both after Fast-dLLM / SDAR; they run inside the same block loop as
first hitting (KV-cached ``backend.denoise_cached``, cache fills not counted as NFE):

- **threshold** (tau = ``sampling.threshold``): reveal every masked position whose *confidence*
  exceeds tau, and at least one. When none does, the single most confident masked position is
  revealed (ties: the lowest position). So with tau > 1 (never exceeded) exactly one token is revealed
  per call, NFE = tokens - 1 as with first hitting, but the order is confidence-first, *not* first
  hitting's uniformly random position. With tau = 0 every masked position of a block is revealed by
  its first call.
- **topk_per_step** (k = ``sampling.tokens_per_step``): reveal the k most confident masked positions
  (ties: lowest positions first); a step with fewer than k masks left reveals them all.

*Confidence* of a position is the largest probability of its distribution *after* the nucleus
(top-p) truncation and renormalisation, i.e. the probability the sampler would give its most likely
token. (With the ``reference`` rule and top_p = 0.9 a position whose raw top probability exceeds 0.9
is cut to one token and has confidence 1.) Confidence does not depend on the random draw, so which
positions are revealed is a deterministic function of the model's output.

One step: one forward on the whole block -> SUBS probabilities in float64 at every position ->
nucleus -> one Gumbel-max candidate per position (the categorical sampler of first hitting, drawn at
*all* B positions so that the random stream a row consumes never depends on the other rows) ->
reveal the chosen masked positions with their candidates. Revealed tokens never change again.

Rows of a batch choose their reveal sets independently; a row whose block is complete rides along
until every row's block is, and its NFE counts only the calls its block still had masks in (what it
would cost alone). Hence the per-row NFE tensor returned here.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from megabd3.errors import UserError
from megabd3.sampling.categorical import gumbel_argmax
from megabd3.sampling.common import SamplerOptions, subs_probs

PARALLEL_RULES = ("threshold", "topk_per_step")


def check_parallel_options(opts: SamplerOptions) -> None:
    """One-line errors for the parallel strategies' parameters (the config validator says the same)."""
    if opts.rule == "threshold" and not (isinstance(opts.threshold, (int, float)) and math.isfinite(opts.threshold)
                                         and opts.threshold >= 0):
        raise UserError(f"sampling.threshold={opts.threshold!r} must be a finite number >= 0 "
                        f"(above 1 reveals one token per step)")
    if opts.rule == "topk_per_step" and not (isinstance(opts.tokens_per_step, int) and opts.tokens_per_step >= 1):
        raise UserError(f"sampling.tokens_per_step={opts.tokens_per_step!r} must be an integer >= 1")


def confidence(probs: torch.Tensor) -> torch.Tensor:
    """[b, B, V] (nucleus-truncated) probabilities -> [b, B] largest probability per position."""
    return probs.max(dim=-1).values


def reveal_mask(conf: torch.Tensor, masked: torch.Tensor, rule: str, threshold: float = 0.9,
                k: int = 1) -> torch.Tensor:
    """Which positions to reveal, per row: bool [b, B] (a subset of ``masked``; >= 1 per row with masks)."""
    conf = conf.masked_fill(~masked, float("-inf"))
    if rule == "threshold":
        reveal = masked & (conf > threshold)
        fallback = masked.any(-1) & ~reveal.any(-1)  # nobody above tau: the single most confident
        best = conf.argmax(-1)  # first maximum: the lowest position on ties
        rows = torch.nonzero(fallback, as_tuple=True)[0]
        reveal[rows, best[rows]] = True
        return reveal
    if rule == "topk_per_step":
        order = torch.sort(conf, dim=-1, descending=True, stable=True).indices  # stable: lowest first on ties
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
        return masked & (rank < k)
    raise ValueError(f"unknown parallel rule {rule!r}")


def denoise_block_parallel(
    block: torch.Tensor,
    logits_fn: Callable[..., torch.Tensor],
    opts: SamplerOptions,
    generator: Optional[torch.Generator],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Denoise every MASK of ``block[b, B]`` by ``opts.rule``; returns (clean block, NFE per row [b]).

    ``logits_fn(block)`` gives the logits of all B positions (time-conditioned models also get
    ``t=`` the masked fraction of each row, their current mask probability).
    """
    check_parallel_options(opts)
    block = block.clone()
    nfe = torch.zeros(block.shape[0], dtype=torch.long, device=block.device)
    while True:
        masked = block == opts.mask_id
        active = masked.any(-1)
        if not active.any():
            return block, nfe
        if opts.time_conditioning:
            logits = logits_fn(block, None, t=masked.to(torch.float64).mean(-1))
        else:
            logits = logits_fn(block)
        nfe += active.long()
        probs = opts.truncate(subs_probs(logits, opts.mask_id))
        cand = gumbel_argmax(probs, generator)
        reveal = reveal_mask(confidence(probs), masked, opts.rule, opts.threshold, opts.tokens_per_step)
        block = torch.where(reveal, cand, block)
