"""Pieces every sampler shares: sampler options, the result record, SUBS probabilities, stop state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from megabd3.errors import UserError
from megabd3.sampling.nucleus import get_nucleus
from megabd3.sampling.stopping import ENTROPY_WINDOW, StopDecision, decide, first_eod


@dataclass
class SamplerOptions:
    """Everything a sampler reads (built from ``cfg.sampling`` + the tokenizer by the registry)."""

    length: int
    mask_id: int
    bos_id: int
    eod_id: int
    vocab_size: int  # model vocabulary incl. the mask token
    block_size: int = 16
    first_hitting: bool = True  # legacy switch: False (with strategy "first_hitting") means ancestral
    steps: int = 1000
    strategy: str = "first_hitting"  # first_hitting | ancestral | threshold | topk_per_step (block.STRATEGIES)
    threshold: float = 0.9  # tau of the threshold strategy
    tokens_per_step: int = 2  # k of the topk_per_step strategy
    top_p: float = 0.9
    nucleus: str = "reference"
    kv_cache: bool = True
    var_length: bool = False
    entropy_threshold: float = 4.0
    max_tries: int = 10
    window: int = 1024
    train_length: int = 1024  # MDLM/SEDD window (the model's seq_len)
    sigma_max: float = 6.907755278982137
    sedd_eps: float = 1e-5  # last time of the SEDD grid
    noise_eps: float = 1e-3  # SEDD loglinear sigma(t) = -log(1 - (1 - eps) t)
    time_conditioning: bool = False  # model.time_conditioning: MDLM then feeds sigma(t) as in training
    cuda_graphs: str = "auto"  # auto | on | off: KV-cached decoding steps as CUDA graphs (CUDA only)

    def truncate(self, probs: torch.Tensor) -> torch.Tensor:
        return get_nucleus(self.nucleus)(probs, self.top_p)

    @property
    def rule(self) -> str:
        """The block update rule in force: ``strategy``, except that the legacy ``first_hitting=False``
        turns the default first-hitting strategy into ancestral sampling (old configs keep working)."""
        if self.strategy == "first_hitting" and not self.first_hitting:
            return "ancestral"
        return self.strategy


@dataclass
class SampleResult:
    """One generated sample. ``nfe`` counts denoising forwards (a BD3 block's first one also stores the previous
    block in the KV cache); ``cache_forwards`` counts separate cache-fill forwards."""

    tokens: List[int]
    nfe: int
    cache_forwards: int
    stop_reason: str = ""  # "", "eos", "entropy", "max_length"
    tries: int = 1
    wall_s: float = 0.0  # wall time of the batch that produced it
    batch_tokens_per_s: float = 0.0  # generated tokens of that batch / its wall time

    @property
    def length(self) -> int:
        return len(self.tokens)


def model_sigma(p: Optional[torch.Tensor], opts: SamplerOptions) -> Optional[torch.Tensor]:
    """The sigma a masked-diffusion forward gets, exactly as the training objective passes it.

    Training (objectives.MaskedDiffusion) passes None unless ``time_conditioning``, and the model
    turns None into sigma = 0 (adaLN on a zero sigma); with time conditioning it passes
    ``sigma_from_p(p, sigma_max)`` in float32, p being the mask probability (= t on the sampler's
    loglinear grid). Mirroring that rule keeps sampling and training forwards identical.
    """
    if not opts.time_conditioning:
        return None
    from megabd3.diffusion.schedules import sigma_from_p

    if p is None:
        raise ValueError("a time-conditioned forward needs the current noise level")
    return sigma_from_p(p.to(torch.float64), opts.sigma_max).float()


def subs_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS denoiser distribution in float64: softmax with the mask token forbidden."""
    logits = logits.to(torch.float64, copy=True)  # one conversion-copy, then edited in place
    logits[..., mask_id] = float("-inf")
    return torch.softmax(logits, dim=-1)


def row_count(nfe: Union[int, Sequence[int], torch.Tensor], i: int) -> int:
    """Forwards of row ``i``: samplers pass one int for the whole batch (rows in lock-step) or one per
    row (threshold / top-k decoding, where rows of a batch finish a block after different steps)."""
    if isinstance(nfe, int):
        return nfe
    return int(nfe[i])


class StopTracker:
    """Per-row stop bookkeeping, incremental so per-token checks stay O(window) (16K-token AR runs)."""

    def __init__(self, batch: int, opts: SamplerOptions):
        self.opts = opts
        self.rows: List[List[int]] = [[] for _ in range(batch)]
        self.eod: List[Optional[int]] = [None] * batch
        self.done = [False] * batch
        self.rejected = [False] * batch
        self.reason = [""] * batch
        self.keep: List[Optional[int]] = [None] * batch
        self.nfe_at_stop = [0] * batch
        self.fills_at_stop = [0] * batch

    def update(self, x: torch.Tensor, nfe: Union[int, Sequence[int], torch.Tensor], fills: int) -> None:
        """``x`` is the whole batch so far; only its new columns are read. ``nfe``: see :func:`row_count`."""
        n_old = len(self.rows[0])
        new = x[:, n_old:].tolist()
        for i, toks in enumerate(new):
            if self.done[i]:
                continue
            row = self.rows[i]
            row.extend(toks)
            if self.eod[i] is None:
                self.eod[i] = first_eod(row, self.opts.eod_id, start=n_old)
            d: StopDecision = decide(len(row), row[-ENTROPY_WINDOW:], self.eod[i], self.opts.var_length,
                                     self.opts.entropy_threshold)
            if d.stop:
                self.done[i], self.rejected[i], self.reason[i], self.keep[i] = True, d.reject, d.reason, d.keep
                self.nfe_at_stop[i], self.fills_at_stop[i] = row_count(nfe, i), fills
        for i in range(len(self.rows)):  # finished rows keep growing so column offsets stay aligned
            if self.done[i] and len(self.rows[i]) < x.shape[1]:
                self.rows[i].extend([0] * (x.shape[1] - len(self.rows[i])))

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def results(self, x: torch.Tensor, nfe: Union[int, Sequence[int], torch.Tensor], fills: int,
                wall_s: float) -> List[Optional[SampleResult]]:
        """Finished samples (None for rejected rows)."""
        out: List[Optional[SampleResult]] = []
        rows = x.tolist()
        for i, ids in enumerate(rows):
            if self.rejected[i]:
                out.append(None)
                continue
            if self.done[i]:
                keep = self.keep[i]
                out.append(SampleResult(ids[:keep] if keep is not None else ids, self.nfe_at_stop[i],
                                        self.fills_at_stop[i], self.reason[i]))
            else:
                out.append(SampleResult(ids, row_count(nfe, i), fills, "max_length"))
        total = sum(len(r.tokens) - 1 for r in out if r is not None)
        for r in out:
            if r is not None:
                r.wall_s, r.batch_tokens_per_s = wall_s, total / max(wall_s, 1e-9)
        return out


def with_retries(generate: Callable[[int], List[Optional[SampleResult]]], batch: int, max_tries: int) -> List[SampleResult]:
    """Regenerate rejected (low-entropy, fixed-length mode) samples up to ``max_tries`` times."""
    done: List[SampleResult] = []
    need = batch
    for attempt in range(1, max_tries + 1):
        got = generate(need)
        for r in got:
            if r is not None:
                r.tries = attempt
                done.append(r)
        need = batch - len(done)
        if need == 0:
            return done
    raise UserError(
        f"sampling failed: {need} of {batch} samples stayed below the entropy threshold after "
        f"sampling.max_tries={max_tries} tries (raise max_tries or lower sampling.entropy_threshold)"
    )
