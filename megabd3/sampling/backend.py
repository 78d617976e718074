"""The model-facing side of every sampler: logits for a block, with or without the KV cache.

Samplers never touch attention specs, position ids or vocabulary padding; they call this adapter.
It accepts any module with the ``model_fn`` signature of docs/interfaces.md (the megatron
``BD3Transformer`` or a test model) and, for cached sampling, its KV-cache API
(``denoise_block`` / ``store_block``).

Vocabulary: models may pad their output head (Megatron's ``make_vocab_size_divisible_by``); logits
are cut to the real model vocabulary ``vocab_size`` (tokenizer vocab + mask) before anything else.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.errors import UserError


def select_rows(logits: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``logits[b, n, V]`` -> the rows ``positions[b, k]`` of each sample, [b, k, V] (all if None)."""
    if positions is None:
        return logits
    return logits[torch.arange(logits.shape[0], device=logits.device)[:, None], positions]


class ModelBackend:
    """Forward passes a sampler needs, on one model (TP = PP = 1 at sampling time).

    ``fixed_shape``: cached runs always use the fixed-shape cache of CUDA-graph decoding, captured only where
    ``sampling.cuda_graphs`` allows (on CPU it runs eagerly: benchmarks and tests compare it there).
    """

    def __init__(self, model: Any, vocab_size: int, window: int, fixed_shape: bool = False):
        self.model = model
        self.vocab_size = vocab_size
        self.window = window
        self.fixed_shape = fixed_shape
        model_vocab = getattr(model, "vocab_size", None)
        if isinstance(model_vocab, int) and model_vocab < vocab_size:
            raise UserError(self._vocab_message(model_vocab))
        import inspect

        store = getattr(model, "store_block", None)  # test models may not take ``positions``
        self._store_rows = store is not None and "positions" in inspect.signature(store).parameters
        try:
            self.device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            self.device = torch.device("cpu")

    def _vocab_message(self, found: int) -> str:
        return (
            f"the model has a vocabulary of {found} but the tokenizer needs {self.vocab_size} (incl. the "
            "mask token): the checkpoint was trained with a different tokenizer (check data.tokenizer)"
        )

    def _cut(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] < self.vocab_size:
            raise UserError(self._vocab_message(logits.shape[-1]))
        return logits[..., : self.vocab_size].float()

    @staticmethod
    def _positions(b: int, n: int, device: torch.device, halves: int = 1) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        return pos.repeat(halves).expand(b, halves * n)

    # -- KV cache (BD3 and AR) -------------------------------------------------------------
    def new_cache(self, batch_size: int, length: Optional[int] = None, cuda_graphs: str = "off",
                  max_call: Optional[int] = None) -> Any:
        """A fresh KV cache holding at most ``window`` tokens (cached + current block).

        With ``length`` (the most positions the run reaches) and ``cuda_graphs`` = auto|on
        (``sampling.cuda_graphs``), a model on CUDA that the fast decoding path serves gets the fixed-shape
        cache whose calls are captured and replayed as CUDA graphs (megabd3.model.static_cache);
        ``max_call`` is then the most tokens one call carries. That cache is kept for the next call of the
        same shape and restarted, so its graphs are captured once per backend, not once per sampled
        batch: a backend then serves one sampling run at a time."""
        if hasattr(self.model, "new_cache"):  # test models bring their own cache type
            return self.model.new_cache(batch_size, self.window)
        from megabd3.model import static_cache
        from megabd3.model.kv_cache import KVCache  # the megatron model's cache

        static_cache.check_graph_mode(cuda_graphs)
        graphs = length is not None and static_cache.use_graphs(self.model, self.device, cuda_graphs)
        if graphs or (length is not None and self.fixed_shape):
            key = (batch_size, length, self.window or None, max_call, cuda_graphs)
            kept = self.__dict__.get("_graph_cache")
            if kept is not None and kept[0] == key:
                kept[1].restart()
                return kept[1]
            cache = static_cache.StaticKVCache(length, window=self.window or None, graphs=graphs, max_call=max_call,
                                               strict=cuda_graphs == "on")
            self.__dict__["_graph_cache"] = (key, cache)  # one at a time: the previous shape's buffers are freed
            return cache
        return KVCache(window=self.window or None)

    @torch.no_grad()
    def denoise_cached(self, cache: Any, block: torch.Tensor, start: int, kind: str = "bd3",
                       positions: Optional[torch.Tensor] = None,
                       store: Optional[tuple] = None) -> torch.Tensor:
        """Logits [b, B, V] of ``block`` (noisy) given the cached clean prefix; cache unchanged.

        With ``positions`` [b, k] only those rows of the block, [b, k, V]: the model runs its output
        head on them alone (first hitting reveals one position per call).
        ``store`` = (clean block, its start) appends that block to the cache first; models with
        ``store_and_denoise`` do both in one forward (the samplers' store of a finished block and the
        next block's first denoising call), others in two.
        """
        if store is not None:
            clean, clean_start = store
            if self.fuses_store(kind) and clean_start + clean.shape[1] == start:
                return self._cut(self.model.store_and_denoise(cache, clean, block, start, positions=positions))
            self.store(cache, clean, clean_start, kind=kind, logits=False)
        if positions is None:
            return self._cut(self.model.denoise_block(cache, block, start, kind=kind))
        return self._cut(self.model.denoise_block(cache, block, start, kind=kind, positions=positions))

    def fuses_store(self, kind: str = "bd3") -> bool:
        """Whether ``denoise_cached(..., store=...)`` costs one forward (else a store forward plus a denoise)."""
        return kind == "bd3" and hasattr(self.model, "store_and_denoise")

    @torch.no_grad()
    def store(self, cache: Any, block: torch.Tensor, start: int, kind: str = "bd3",
              logits: bool = True) -> Optional[torch.Tensor]:
        """Append the clean ``block``'s keys/values to the cache; returns its logits [b, B, V]
        (with ``kind="causal"`` the logits at position p are the next-token distribution), or None
        with ``logits=False``: the model then skips its output head when it can."""
        if not logits and self._store_rows:
            none = torch.empty(block.shape[0], 0, dtype=torch.long, device=block.device)
            self.model.store_block(cache, block, start, kind=kind, positions=none)
            return None
        out = self._cut(self.model.store_block(cache, block, start, kind=kind))
        return out if logits else None

    # -- uncached forwards -----------------------------------------------------------------
    @torch.no_grad()
    def denoise_bd3_uncached(self, context: torch.Tensor, block: torch.Tensor,
                             positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of the noisy ``block`` after the clean ``context``, recomputing the whole prefix
        (only the rows ``positions`` [b, k] if given; the head still runs on the whole block).

        Runs the training layout [x_t ; x0] over n = |context| + B tokens: the x0 half is
        [context ; block] under the block-causal x0-x0 quadrant of the BD3 mask; the x_t half is
        [MASK ... ; block], and its last block attends only to itself and to the clean blocks before
        it, which is exactly what a cached denoising call computes. The x_t rows before the last
        block are dead work (their logits are never computed) — this is the slow reference path.
        The caller crops ``context`` to the sliding window, as the cache does.
        """
        b, blk = block.shape
        n = context.shape[1] + blk
        filler = torch.full_like(context, int(block.reshape(-1)[0]))  # any ids: never attended to by the last block
        xt = torch.cat([filler, block], 1)
        x0 = torch.cat([context, block], 1)
        spec = AttentionSpec("bd3", seq_len=n, block_size=blk)
        ids = torch.cat([xt, x0], 1)
        logits = self.model(ids, self._positions(b, n, ids.device, 2), spec, None, (n - blk, n))
        return self._cut(select_rows(logits, positions))

    @torch.no_grad()
    def full(self, ids: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bidirectional forward (MDLM, SEDD) -> logits [b, n, V]."""
        b, n = ids.shape
        spec = AttentionSpec("full", seq_len=n)
        return self._cut(self.model(ids, self._positions(b, n, ids.device), spec, sigma, (0, n)))

    @torch.no_grad()
    def causal_last(self, ids: torch.Tensor) -> torch.Tensor:
        """Causal forward (AR) -> logits [b, V] of the last position (the next-token distribution)."""
        b, n = ids.shape
        spec = AttentionSpec("causal", seq_len=n)
        return self._cut(self.model(ids, self._positions(b, n, ids.device), spec, None, (n - 1, n)))[:, 0]
