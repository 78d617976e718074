"""Parallel decoding inside a block: reveal several masked positions per denoising call.

Two rules (``sampling.strategy``), both after Fast-dLLM / SDAR; they run inside the same block loop as
first hitting (KV-cached ``backend.denoise_cached``, cache fills not counted as NFE):

- **threshold** (tau = ``sampling.threshold``): reveal every masked position whose *confidence*
  exceeds tau, and at least one. When none does, the single most confident masked position is
  revealed (ties: the lowest position). Confidence never exceeds 1, so with tau >= 1 exactly one token
  is revealed per call, NFE = tokens - 1 as with first hitting, but the order is confidence-first,
  *not* first hitting's uniformly random position. With tau = 0 every masked position of a block is
  revealed by its first call (unless the model puts all its mass on the mask token, which SUBS forbids).
- **topk_per_step** (k = ``sampling.tokens_per_step``): reveal the k most confident masked positions
  (ties: lowest positions first); a step with fewer than k masks left reveals them all.

*Confidence* of a position is the largest probability of its **untruncated** SUBS distribution
(float64 softmax of the logits with the mask token forbidden), i.e. the issue's "top probability".
It is taken *before* the nucleus (top-p) truncation on purpose: after truncation a position whose
raw probabilities are (0.46, 0.45, 0.09) is cut to one token by the reference rule at top_p = 0.9
and would look certain (confidence 1); here it has confidence 0.46. Fast-dLLM instead scores the
probability of the *sampled* token; we use the top probability so that which positions are
revealed is a deterministic function of the model's output (no random draw enters it), which also
lets the sampler draw tokens only where it reveals.

*Token* revealed at a chosen position: a nucleus draw, i.e. the categorical sampler of first hitting
(the SUBS distribution truncated by ``sampling.top_p`` / ``sampling.nucleus``, one float64 Gumbel-max
draw). It is usually, but not necessarily, the top token whose probability gave the confidence.

One step: one forward on the whole block -> SUBS probabilities in float64 at every position ->
confidence -> reveal set -> nucleus + Gumbel-max draw at the revealed positions only -> write them.
Revealed tokens never change again.

Rows of a batch. Each row chooses its reveal set from its own logits. A block's loop runs until every
row's block is complete; a finished row rides along (its forward is wasted compute, its tokens do not
change) and its NFE counts only the calls its block still had masks in (what it would cost alone),
hence the per-row NFE tensor returned here. Random streams are per row, so that rows do not couple
through the shared generator: at the start of every block one 63-bit seed per row is drawn from the
sampler's generator (always ``b`` draws, however many calls the block takes), and row ``i`` draws its
tokens from its own generator seeded with the ``i``-th seed, and only at its revealed positions. So a
row's tokens depend on the seed, the batch size, its row index and its own logits, not on its batch
mates' (up to batched-kernel numerics of the model). With ``generator=None`` the global RNG is used
and this independence does not hold.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from megabd3.errors import UserError
from megabd3.sampling.categorical import gumbel_argmax
from megabd3.sampling.common import SamplerOptions, subs_probs

PARALLEL_RULES = ("threshold", "topk_per_step")
_SEED_HIGH = 2 ** 63 - 1


def check_parallel_options(opts: SamplerOptions) -> None:
    """One-line errors for the parallel strategies' parameters (the config validator says the same)."""
    if opts.rule == "threshold" and not (isinstance(opts.threshold, (int, float)) and math.isfinite(opts.threshold)
                                         and opts.threshold >= 0):
        raise UserError(f"sampling.threshold={opts.threshold!r} must be a finite number >= 0 "
                        f"(1 or above reveals one token per step)")
    if opts.rule == "topk_per_step" and not (isinstance(opts.tokens_per_step, int) and opts.tokens_per_step >= 1):
        raise UserError(f"sampling.tokens_per_step={opts.tokens_per_step!r} must be an integer >= 1")


def confidence(probs: torch.Tensor) -> torch.Tensor:
    """[b, B, V] untruncated SUBS probabilities -> [b, B] largest probability per position."""
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


def row_generators(batch: int, generator: Optional[torch.Generator]) -> List[Optional[torch.Generator]]:
    """One generator per row, seeded from ``batch`` draws of ``generator`` (None: the global RNG)."""
    if generator is None:
        return [None] * batch
    seeds = torch.randint(0, _SEED_HIGH, (batch,), generator=generator, device=generator.device).tolist()
    return [torch.Generator(device=generator.device).manual_seed(int(s)) for s in seeds]


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
    gens = row_generators(block.shape[0], generator)
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
        probs = subs_probs(logits, opts.mask_id)  # untruncated: the confidence is read here
        reveal = reveal_mask(confidence(probs), masked, opts.rule, opts.threshold, opts.tokens_per_step)
        rows, pos = torch.nonzero(reveal, as_tuple=True)  # row-major: each row's reveals are contiguous
        trunc = opts.truncate(probs[rows, pos])  # [n, V]: nucleus only where a token is drawn
        cand = torch.empty_like(rows)
        counts = torch.bincount(rows, minlength=block.shape[0]).tolist()
        at = 0
        for i, n in enumerate(counts):
            if n:
                cand[at : at + n] = gumbel_argmax(trunc[at : at + n], gens[i])
                at += n
        block[rows, pos] = cand
