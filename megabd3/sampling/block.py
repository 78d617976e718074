"""The BD3-LM block sampler (and MDLM, which is the same loop over one bidirectional window).

Per block (spec section 5.1): start from all-MASK (the first block carries BOS at position 0), and
denoise until no MASK is left, then append it to the clean prefix. With the KV cache the finished block
is stored by the next block's first denoising forward, which runs [clean block ; noisy block] (2B tokens)
in one call (models without ``store_and_denoise`` take a separate cache-fill forward, not an NFE, counted
in ``cache_forwards``). Update rules (``sampling.strategy``):

- **first hitting** (Zheng et al.): every denoising call reveals exactly one masked position, chosen
  uniformly, with a token drawn from the SUBS distribution there. A block of B masks takes B calls,
  so a whole sample takes length - 1 NFEs (BOS is given).
- **ancestral**, T steps per block on the grid t_k = 1 - k/T (k = 0..T): from t to s < t a masked
  position is revealed with probability (t - s)/t (loglinear, alpha_t = 1 - t). The last step has
  s = 0 and reveals everything, so a block always finishes. (The reference pairs linspace(1, 0, T)
  with dt = 1/T and divides by t = 0 at the end; this grid fixes both.) When a step reveals nothing
  the block is unchanged and the model is time-independent (BD3-LM/MDLM zero sigma), so the previous
  probabilities are reused without a forward, as in the reference.
- **threshold** / **topk_per_step**: several confident positions per call (Fast-dLLM / SDAR), see
  :mod:`megabd3.sampling.parallel`; their NFE is counted per row.

``sampling.strategy`` names the rule (``STRATEGIES``); the older ``sampling.first_hitting=false``
still selects ancestral (:attr:`SamplerOptions.rule`).

Noise level: ``logits_fn`` also gets the current mask probability t per row (``t=``), which only a
time-conditioned model reads (MDLM with ``model.time_conditioning``: sigma(t) as in training, see
:func:`megabd3.sampling.common.model_sigma`). Then first hitting tracks the reference's time
``t <- t * U^(1/n_masked)`` (one extra uniform per call, drawn only for such models), and the
ancestral rule recomputes the probabilities at every step (the model is no longer time-independent).

Revealed tokens are never changed again (carry-over). All draws are float64 Gumbel-max from one
``torch.Generator``; the cached and uncached paths consume it identically, so for a seed they produce
the same tokens whenever their logits agree (always within the cache window).
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Tuple, Union

import torch

from megabd3.errors import UserError
from megabd3.sampling.backend import ModelBackend, select_rows
from megabd3.sampling.categorical import gumbel_argmax, uniform64, uniform_choice
from megabd3.sampling.common import SampleResult, SamplerOptions, StopTracker, model_sigma, subs_probs, with_retries
from megabd3.sampling.parallel import PARALLEL_RULES, check_parallel_options, denoise_block_parallel

STRATEGIES = ("first_hitting", "ancestral") + PARALLEL_RULES  # sampling.strategy

# logits_fn(block [b, B], positions [b, k] or None, t=[b] float64 mask probability or None)
#   -> logits [b, k, V] of those rows (all B if None)
LogitsFn = Callable[..., torch.Tensor]


def _logits(logits_fn: LogitsFn, block: torch.Tensor, positions: Optional[torch.Tensor],
            t: Optional[torch.Tensor]) -> torch.Tensor:
    """Call ``logits_fn``; the noise level is passed only to time-conditioned models (``t`` given)."""
    if t is not None:
        return logits_fn(block, positions, t=t)
    return logits_fn(block) if positions is None else logits_fn(block, positions)


def first_hitting_time(t: torch.Tensor, masked: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Reference first-hitting update t * U^(1/n_masked) per row: the time of the next reveal."""
    u = uniform64((t.shape[0],), generator, t.device)
    return t * u ** (1.0 / masked.sum(-1).clamp(min=1).to(torch.float64))


def check_strategy(opts: SamplerOptions) -> None:
    if opts.strategy not in STRATEGIES:
        raise UserError(f"sampling.strategy must be one of {', '.join(STRATEGIES)}, found {opts.strategy!r}")
    if opts.strategy in PARALLEL_RULES and not opts.first_hitting:
        raise UserError(f"sampling.first_hitting=false (ancestral) conflicts with sampling.strategy={opts.strategy}: "
                        f"drop first_hitting=false or use strategy=ancestral")
    check_parallel_options(opts)


def denoise_block(
    block: torch.Tensor,
    logits_fn: LogitsFn,
    opts: SamplerOptions,
    generator: Optional[torch.Generator],
) -> Tuple[torch.Tensor, Union[int, torch.Tensor]]:
    """Denoise every MASK of ``block[b, B]``; returns (clean block, number of forwards).

    The count is one int (rows in lock-step) for first hitting and ancestral, a LongTensor [b] of
    per-row counts for the parallel rules.
    """
    if opts.rule in PARALLEL_RULES:
        return denoise_block_parallel(block, logits_fn, opts, generator)
    block = block.clone()
    b = block.shape[0]
    rows = torch.arange(b, device=block.device)
    timed = opts.time_conditioning  # only then is t drawn/used: untimed runs keep their random streams
    t_now = torch.ones(b, dtype=torch.float64, device=block.device)
    nfe = 0
    probs: Optional[torch.Tensor] = None
    if opts.rule == "first_hitting":
        while True:
            masked = block == opts.mask_id
            if not masked.any():
                return block, nfe
            if timed:
                t_now = first_hitting_time(t_now, masked, generator)
            # Only the revealed position's distribution is needed: choose it first, and ask the model
            # for that row alone (its output head, softmax and nucleus then run on one row, not B).
            pos = uniform_choice(masked, generator)
            logits = _logits(logits_fn, block, pos[:, None], t_now if timed else None)[:, 0]
            nfe += 1
            probs = opts.truncate(subs_probs(logits, opts.mask_id))
            token = gumbel_argmax(probs, generator)
            still = masked[rows, pos]  # rows of a batch stay in step; guard anyway
            block[rows, pos] = torch.where(still, token, block[rows, pos])
    steps = opts.steps
    for k in range(steps):
        masked = block == opts.mask_id
        if not masked.any():
            break
        t, s = 1.0 - k / steps, 1.0 - (k + 1) / steps
        if probs is None or timed:
            level = torch.full_like(t_now, t) if timed else None
            probs = opts.truncate(subs_probs(_logits(logits_fn, block, None, level), opts.mask_id))
            nfe += 1
        cand = gumbel_argmax(probs, generator)
        reveal = masked & (uniform64(tuple(block.shape), generator, block.device) < (t - s) / t)
        if reveal.any():
            block = torch.where(reveal, cand, block)
            probs = None
    return block, nfe


def check_block_layout(length: int, block_size: int) -> None:
    if block_size < 1 or length % block_size:
        raise UserError(
            f"sampling.length={length} is not a multiple of the block size {block_size}: "
            f"set sampling.length to a multiple of {block_size}"
        )


class BD3Sampler:
    """Block-by-block BD3-LM generation with (or without) the KV cache of clean blocks."""

    name = "bd3lm"

    def __init__(self, backend: ModelBackend, opts: SamplerOptions):
        check_block_layout(opts.length, opts.block_size)
        check_strategy(opts)
        if opts.time_conditioning:
            raise UserError("bd3lm sampling needs model.time_conditioning=false (the KV-cached forward has no sigma input)")
        if opts.window and (opts.window < 2 * opts.block_size or opts.window % opts.block_size):
            raise UserError(
                f"sampling.cache_window={opts.window} must be a multiple of the block size {opts.block_size} "
                f"and at least two blocks"
            )
        self.backend, self.opts = backend, opts

    def _generate(self, batch: int, generator: Optional[torch.Generator]) -> List[Optional[SampleResult]]:
        o, dev, bsz = self.opts, self.backend.device, self.opts.block_size
        t0 = time.perf_counter()
        x = torch.full((batch, 0), o.bos_id, dtype=torch.long, device=dev)
        cache = self.backend.new_cache(batch, o.length, o.cuda_graphs, 2 * bsz) if o.kv_cache else None
        stops = StopTracker(batch, o)
        nfe = fills = 0
        pending: Optional[tuple] = None  # the finished block, stored by the next block's first forward
        for s in range(o.length // bsz):
            start = s * bsz
            block = torch.full((batch, bsz), o.mask_id, dtype=torch.long, device=dev)
            if s == 0:
                block[:, 0] = o.bos_id
            if cache is not None:
                todo = {"store": pending, "fills": 0}

                def fn(blk, pos=None, t=None, start=start, todo=todo):  # noqa: ANN001, ANN202
                    store, todo["store"] = todo["store"], None
                    if store is not None and not self.backend.fuses_store():
                        todo["fills"] = 1  # a separate store forward
                    return self.backend.denoise_cached(cache, blk, start, positions=pos, store=store)
            else:
                ctx = x[:, max(0, x.shape[1] - (o.window - bsz)) :] if o.window else x
                fn = lambda blk, pos=None, t=None, ctx=ctx: self.backend.denoise_bd3_uncached(ctx, blk, pos)
            block, used = denoise_block(block, fn, o, generator)
            nfe += used
            if cache is not None:
                fills += todo["fills"]
                if todo["store"] is not None:  # no denoising call took it (nothing was masked)
                    self.backend.store(cache, *todo["store"], logits=False)
                    fills += 1
            x = torch.cat([x, block], 1)
            stops.update(x, nfe, fills)
            if stops.all_done:
                break
            # stored by the next block's first denoising forward (one forward instead of two; not a cache fill)
            pending = (block, start) if cache is not None and s + 1 < o.length // bsz else None
        return stops.results(x, nfe, fills, time.perf_counter() - t0)

    def sample(self, batch: int, generator: Optional[torch.Generator]) -> List[SampleResult]:
        return with_retries(lambda n: self._generate(n, generator), batch, self.opts.max_tries)


class MDLMSampler:
    """MDLM: one bidirectional window of the training length; longer outputs by semi-AR strides.

    Length <= L: a single block of ``length`` tokens. Length > L (MDLM's semi-AR trick, spec 5.2): the
    first L tokens as one block, then strides of L/2: keep the last L/2 clean tokens as context,
    append L/2 masks and denoise that window. There is no KV cache: clean tokens attend to masked ones
    under full attention, so their keys change at every step.
    """

    name = "mdlm"

    def __init__(self, backend: ModelBackend, opts: SamplerOptions):
        L = opts.train_length
        if opts.length > L and (L % 2 or (opts.length - L) % (L // 2)):
            raise UserError(
                f"sampling.length={opts.length} exceeds the MDLM window {L}: it must be {L} plus a "
                f"multiple of the stride {L // 2}"
            )
        check_strategy(opts)
        self.backend, self.opts = backend, opts

    def window_logits(self, context: torch.Tensor, block: torch.Tensor, positions: Optional[torch.Tensor] = None,
                      t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of ``block`` (rows ``positions``) under full attention over [context ; block], with the
        sigma training would pass at mask probability ``t`` (None unless time-conditioned)."""
        logits = self.backend.full(torch.cat([context, block], 1), sigma=model_sigma(t, self.opts))
        return select_rows(logits[:, context.shape[1] :], positions)

    def _generate(self, batch: int, generator: Optional[torch.Generator]) -> List[Optional[SampleResult]]:
        o, dev, L = self.opts, self.backend.device, self.opts.train_length
        t0 = time.perf_counter()
        first = min(o.length, L)
        sizes = [first] + [L // 2] * ((o.length - first) // (L // 2))
        x = torch.full((batch, 0), o.bos_id, dtype=torch.long, device=dev)
        stops = StopTracker(batch, o)
        nfe = 0
        for s, size in enumerate(sizes):
            block = torch.full((batch, size), o.mask_id, dtype=torch.long, device=dev)
            if s == 0:
                block[:, 0] = o.bos_id
            ctx = x[:, x.shape[1] - (L - size) :] if s else x
            fn: LogitsFn = lambda blk, pos=None, t=None, ctx=ctx: self.window_logits(ctx, blk, pos, t)
            block, used = denoise_block(block, fn, o, generator)
            nfe += used
            x = torch.cat([x, block], 1)
            stops.update(x, nfe, 0)
            if stops.all_done:
                break
        return stops.results(x, nfe, 0, time.perf_counter() - t0)

    def sample(self, batch: int, generator: Optional[torch.Generator]) -> List[SampleResult]:
        return with_retries(lambda n: self._generate(n, generator), batch, self.opts.max_tries)
