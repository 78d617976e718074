"""A fixed-shape KV cache for CUDA-graph decoding (issue 13, item 4).

A CUDA graph replays recorded kernels on recorded addresses, so a capturable call may not depend on host
values: not on the cache length (``KVCache`` slices its buffers to it), not on a Python position. Here:

- keys/values live in a **ring buffer** of ``capacity`` slots per layer, slot = position % capacity, and
  ``slot_pos[slot]`` (a device tensor) records which absolute position a slot holds (-1: none);
- a call reads its start position from a device tensor, writes its keys/values with ``index_copy_``,
  and attends over **all** slots under the mask ``lo(row) <= slot_pos < hi(row)`` -- the same window rule
  as ``KVCache`` (a denoising row sees the last ``window - n`` cached tokens plus its block; a causal row
  ends at itself; a fused store+denoise call gives each half its own bounds);
- a denoising call's keys are scratch: their slots are marked empty again at the end of the call, so
  the cache is unchanged, as the interface promises. A store call's slots stay.

A slot is overwritten only by a position ``capacity`` later. A call of n tokens starting at s writes
positions [s, s + n) and its first row may need positions down to s + 1 - window, so ``capacity >=
window + n - 1`` keeps everything any row can see: the capacity is ``window + max_call`` (``max_call``,
the longest call of the run: 2 blocks for the BD3 sampler's fused store + denoise, 1 token for AR).
Without a window the capacity is the run's length (both checked per call).

The attention reads ``capacity`` keys instead of the kept ones (the price of a fixed shape), so on CPU the
plain ``KVCache`` is faster and stays the default; this cache runs eagerly there only for tests. On CUDA
(``sampling.cuda_graphs=auto|on``) every call shape is captured once (after two idempotent warm-up runs:
a call rewrites the same slots with the same values) and then replayed with new inputs. The sampling
backend keeps the cache for the next run of the same shape (:meth:`StaticKVCache.restart`: empty slots,
same buffers and graphs, folded weights refreshed in place), so a run after the first captures nothing.
A capture that fails prints one line and the cache decodes eagerly from then on (``on``: an error).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megabd3.config.choices import CUDA_GRAPH_MODES as GRAPH_MODES
from megabd3.errors import UserError

MAX_GRAPHS = 16  # call shapes captured per cache (a sampler uses 2-4; prompts of many lengths run eagerly)


def check_graph_mode(mode: str) -> None:
    if mode not in GRAPH_MODES:
        raise UserError(f"sampling.cuda_graphs must be one of {', '.join(GRAPH_MODES)}, found {mode!r}")


def use_graphs(model: Any, device: torch.device, mode: str) -> bool:
    """Whether a sampling run on ``model`` captures CUDA graphs under ``sampling.cuda_graphs=mode``.

    ``on`` refuses with one line when it cannot; ``auto`` captures on CUDA when the fast decoding path
    serves the model and says in one line why not otherwise (CPU: graphs do not exist, nothing to say)."""
    from megabd3.model.fast_decode import static_reason

    check_graph_mode(mode)
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise UserError(f"sampling.cuda_graphs=on needs a CUDA device, the model is on {device.type}: "
                        f"set sampling.cuda_graphs=auto or off")
    reason = static_reason(model) if hasattr(model, "decoder") else "not a megabd3 DiT model"
    if reason is None and model.training:
        reason = "the model is in training mode"
    if reason is None:
        return True
    if mode == "on":
        raise UserError(f"sampling.cuda_graphs=on: the fast decoding path cannot serve this model ({reason}); "
                        f"set sampling.cuda_graphs=off")
    if model.__dict__.get("_graphs_off_said") != reason:  # once per model, not per sampled batch
        print(f"sampling: CUDA graphs off ({reason}); decoding runs eagerly", file=sys.stderr)
        model.__dict__["_graphs_off_said"] = reason
    return False


class StaticKVCache:
    """Ring-buffer KV cache with device-side positions; see the module docstring.

    ``length``: the most positions a run reaches (the sample length); ``window``: the sliding window
    (None: keep everything); ``max_call``: the most tokens one call carries (default and at most:
    ``window``); ``graphs``: capture and replay CUDA graphs (CUDA only); ``strict``: a failed capture is
    an error (``sampling.cuda_graphs=on``) instead of one line and eager decoding from then on (``auto``).
    """

    def __init__(self, length: int, window: Optional[int] = None, graphs: bool = False,
                 max_call: Optional[int] = None, strict: bool = False) -> None:
        if window is not None and window < 1:
            raise UserError(f"sampling.cache_window: expected a positive token count, found {window}")
        self.length, self.window, self.graphs, self.strict = length, window, graphs, strict
        self.max_call = max_call or window or length
        if window and self.max_call > window:  # KVCache shows such a call all of itself, the ring only `window`
            raise UserError(f"StaticKVCache: max_call={self.max_call} exceeds the window {window}; calls must fit the "
                            f"window (sampling.cache_window >= 2 blocks)")
        self.capacity = min(length, window + self.max_call) if window else length
        self.next_position = 0
        self.shift_carry: Optional[tuple] = None  # interface parity with KVCache (shifted llama only)
        self.reset()

    def reset(self) -> None:
        self._k: Dict[int, torch.Tensor] = {}
        self._v: Dict[int, torch.Tensor] = {}
        self.slot_pos: Optional[torch.Tensor] = None
        self._rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # this cache's own table references
        self._layouts: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._graphs: Dict[tuple, tuple] = {}
        self._pool: Any = None
        self._warned = False
        self.next_position = 0
        self.shift_carry = None
        self.__dict__.pop("_fast_decode", None)
        self.__dict__.pop("_fast_decode_reason", None)

    def restart(self) -> None:
        """Empty the cache for a new run of the same shape, keeping its buffers and captured graphs (a graph
        reads fixed addresses). The next call refreshes the folded weights in place (fast_decode.folded), so
        weights loaded into the model between runs are used."""
        if self.slot_pos is not None:
            self.slot_pos.fill_(-1)
        self.next_position = 0
        self.shift_carry = None
        self.__dict__["_refold"] = True
        self.__dict__.pop("_fast_decode_reason", None)

    def _kept(self) -> torch.Tensor:
        """Slots of the tokens a next call could see (the last ``window`` stored ones); host-syncs, for tests."""
        kept = self.slot_pos >= 0
        if self.window and bool(kept.any()):
            kept &= self.slot_pos >= int(self.slot_pos.max()) + 1 - self.window
        return kept

    def __len__(self) -> int:
        return 0 if self.slot_pos is None else int(self._kept().sum())

    @property
    def k(self) -> Dict[int, torch.Tensor]:
        """The kept keys per layer in position order, [b, h, tokens, d] (copies; for tests)."""
        return {i: self._ordered(kb) for i, kb in self._k.items()}

    @property
    def v(self) -> Dict[int, torch.Tensor]:
        return {i: self._ordered(vb) for i, vb in self._v.items()}

    def _ordered(self, buf: torch.Tensor) -> torch.Tensor:
        kept = torch.nonzero(self._kept())[:, 0]
        return buf[:, :, kept[torch.argsort(self.slot_pos[kept])]]

    # -- setup (host side, before any capture) ---------------------------------------------
    def _setup(self, model: Any, fold: Any, b: int, dtype: torch.dtype, device: torch.device) -> None:
        if self.slot_pos is not None:
            kb = next(iter(self._k.values()))
            if kb.shape[0] != b or kb.dtype != dtype or kb.device != device:
                raise UserError(f"KV cache holds batch {kb.shape[0]} ({kb.dtype}, {kb.device}) but the call has "
                                f"batch {b} ({dtype}, {device}); reset() the cache or use a new one per batch")
            return
        from megabd3.model.fast_decode import rope_table

        shape = (b, fold.groups, self.capacity, fold.head_dim)
        for L in fold.layers:
            self._k[L.layer_number] = torch.zeros(shape, dtype=dtype, device=device)
            self._v[L.layer_number] = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
        table = rope_table(model)
        table.ensure(self.length, fold.head_dim, model.rope_base, dtype, device)
        self._rope = (table.cos, table.sin)  # held here: a later, longer run may regrow the model's table

    def _layout(self, mode: str, kind: str, n: int, n1: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row key bounds relative to the call's start: (lo_off, hi_off), [n] each."""
        key = (mode, kind, n, n1)
        if key not in self._layouts:
            far = self.window if self.window else self.length + n  # no window: lo clamps to 0
            rows = torch.arange(n, device=device)
            if kind == "causal":
                hi = rows + 1
                lo = torch.full_like(rows, n - far)
            elif mode == "store_denoise":
                hi = torch.where(rows < n1, n1, n)
                lo = hi - far
            else:
                hi = torch.full_like(rows, n)
                lo = hi - far
            self._layouts[key] = (lo, hi)
        return self._layouts[key]

    # -- the capturable call ------------------------------------------------------------------
    def _run(self, fold: Any, ids: torch.Tensor, start: torch.Tensor, positions: Optional[torch.Tensor],
             layout: Tuple[torch.Tensor, torch.Tensor], mode: str, n1: int) -> torch.Tensor:
        """Logits [b, k, V] (model dtype); reads only device tensors (``start`` is [1])."""
        n = ids.shape[1]
        lo_off, hi_off = layout
        pos = start + torch.arange(n, device=ids.device)
        slots = torch.remainder(pos, self.capacity)
        cos, sin = (t.index_select(0, pos) for t in self._rope)
        self.slot_pos.index_copy_(0, slots, pos)
        lo, hi = (start + lo_off).clamp_min(0), start + hi_off
        mask = (self.slot_pos[None] >= lo[:, None]) & (self.slot_pos[None] < hi[:, None])  # [n, capacity]

        def attend(L: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kb, vb = self._k[L.layer_number], self._v[L.layer_number]
            kb.index_copy_(2, slots, k)
            vb.index_copy_(2, slots, v)
            return F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask, scale=L.scale)

        x = fold.trunk(ids, cos, sin, attend)
        if mode != "store":  # the denoised block's keys were scratch: the cache holds clean tokens only
            self.slot_pos.index_fill_(0, slots[n1:], -1)
        if n1:
            x = x[n1:]
        if positions is not None and positions.shape[-1] == 0:
            return x.new_zeros(ids.shape[0], 0, fold.w_head.shape[1])
        return fold.head(x, positions)

    def forward(self, model: Any, fold: Any, ids: torch.Tensor, start: int, mode: str, kind: str,
                positions: Optional[torch.Tensor], store_tokens: int) -> torch.Tensor:
        """One cached call (``fast_decode.cached_forward`` semantics); replays a CUDA graph when enabled."""
        b, n = ids.shape
        if start < 0 or start + n > self.length:
            raise UserError(f"a KV-cached call at positions [{start}, {start + n}) exceeds the {self.length} "
                            f"positions this static cache was made for: make the cache with the sample length")
        if n > self.max_call:
            raise UserError(f"a KV-cached call of {n} tokens exceeds the {self.max_call} this static cache was "
                            f"made for (max_call)")
        self._setup(model, fold, b, fold.dtype, ids.device)
        layout = self._layout(mode, kind, n, store_tokens, ids.device)
        if not self._use_graphs(ids):
            start_t = torch.full((1,), start, dtype=torch.long, device=ids.device)
            return self._run(fold, ids, start_t, positions, layout, mode, store_tokens)
        # the folded weights are part of the key: a graph reads the tensors it was captured with
        key = (id(fold), mode, kind, b, n, None if positions is None else tuple(positions.shape), store_tokens)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= MAX_GRAPHS:
                if not self._warned:
                    print(f"sampling: more than {MAX_GRAPHS} call shapes; new shapes run without CUDA graphs",
                          file=sys.stderr)
                    self._warned = True
                start_t = torch.full((1,), start, dtype=torch.long, device=ids.device)
                return self._run(fold, ids, start_t, positions, layout, mode, store_tokens)
            try:
                entry = self._graphs[key] = self._capture(fold, ids, start, positions, layout, mode, store_tokens)
            except Exception as exc:  # noqa: BLE001 -- any capture failure: say it, then decode eagerly (or refuse)
                what = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                if self.strict:
                    raise UserError(f"sampling.cuda_graphs=on: capturing a decoding step failed ({what}); "
                                    f"set sampling.cuda_graphs=auto or off") from exc
                print(f"sampling: CUDA graph capture failed ({what}); decoding runs eagerly", file=sys.stderr)
                self.graphs = False  # the cache state is consistent: a call rewrites the same slots
                start_t = torch.full((1,), start, dtype=torch.long, device=ids.device)
                return self._run(fold, ids, start_t, positions, layout, mode, store_tokens)
        graph, s_ids, s_start, s_pos, out, _ = entry
        s_ids.copy_(ids)
        s_start.fill_(start)
        if s_pos is not None:
            s_pos.copy_(positions, non_blocking=True)
        graph.replay()
        return out.clone()  # the next replay overwrites ``out``

    def _use_graphs(self, ids: torch.Tensor) -> bool:
        return self.graphs and ids.is_cuda

    def _capture(self, fold: Any, ids: torch.Tensor, start: int, positions: Optional[torch.Tensor],
                 layout: Tuple[torch.Tensor, torch.Tensor], mode: str, n1: int) -> tuple:
        """Warm up (twice, on a side stream, as torch.cuda.graphs requires) and capture one call shape.
        The warm-up runs are the real call: running it again rewrites the same slots with the same values."""
        s_ids, s_pos = ids.clone(), None if positions is None else positions.to(ids.device).clone()
        s_start = torch.full((1,), start, dtype=torch.long, device=ids.device)
        run = lambda: self._run(fold, s_ids, s_start, s_pos, layout, mode, n1)  # noqa: E731
        stream = torch.cuda.Stream(device=ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(ids.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return graph, s_ids, s_start, s_pos, out, fold  # fold: kept alive with the graph that reads it
