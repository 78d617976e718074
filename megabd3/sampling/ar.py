"""Autoregressive sampling with a KV cache (spec section 5.2).

BOS, then one token per forward: float64 probabilities of the next token (the mask token is
forbidden), nucleus truncation, Gumbel-max. With the cache, step i runs the model on the single
token i-1 against the cached keys of tokens < i-1 and appends its keys in the same forward
(``store_block(kind="causal")`` returns the logits at i-1, i.e. the distribution of token i), so
there is exactly one forward per token and no separate cache fill. The uncached path runs the causal
model on the whole context every step. Both keep the last ``window`` tokens of context.
Stop rules are checked after every token, as the reference does.
"""
from __future__ import annotations

import time
from typing import List, Optional

import torch

from megabd3.sampling.backend import ModelBackend
from megabd3.sampling.categorical import gumbel_argmax
from megabd3.sampling.common import SampleResult, SamplerOptions, StopTracker, subs_probs, with_retries


class ARSampler:
    name = "ar"

    def __init__(self, backend: ModelBackend, opts: SamplerOptions):
        self.backend, self.opts = backend, opts

    def _generate(self, batch: int, generator: Optional[torch.Generator]) -> List[Optional[SampleResult]]:
        o, dev = self.opts, self.backend.device
        t0 = time.perf_counter()
        x = torch.full((batch, 1), o.bos_id, dtype=torch.long, device=dev)
        cache = self.backend.new_cache(batch, o.length, o.cuda_graphs, 1) if o.kv_cache else None
        stops = StopTracker(batch, o)
        nfe = fills = 0
        for i in range(1, o.length):
            if cache is not None:
                logits = self.backend.store(cache, x[:, i - 1 : i], i - 1, kind="causal")[:, 0]
            else:
                logits = self.backend.causal_last(x[:, max(0, i - o.window) :] if o.window else x)
            nfe += 1
            probs = o.truncate(subs_probs(logits, o.mask_id))
            x = torch.cat([x, gumbel_argmax(probs, generator)[:, None]], 1)
            stops.update(x, nfe, fills)
            if stops.all_done:
                break
        return stops.results(x, nfe, fills, time.perf_counter() - t0)

    def sample(self, batch: int, generator: Optional[torch.Generator]) -> List[SampleResult]:
        return with_retries(lambda n: self._generate(n, generator), batch, self.opts.max_tries)
