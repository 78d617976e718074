"""Activation peak of one micro-batch's forward + backward through the real model and objective, traced
with fake tensors (no memory, no compute).

The model is built under ``FakeTensorMode`` (its weights are fake). :class:`LiveBytes` is a dispatch mode
stacked above the fake mode that counts the bytes of every tensor storage created while it is active and
subtracts them when the storage dies (weak references), keeping the peak. Two things make the real
training code run unchanged on fake weights:

* *small real tensors stay real*: an op whose tensor inputs are all real (the token ids, the noise drawn
  from a real ``torch.Generator``, positions, masks) runs for real, so the objective's data-dependent
  steps (resampling loops, ``bool(...)`` checks in rope/attention) work; a factory op (no tensor input)
  runs for real only when its output is small. Anything that touches a weight is fake.
* gradients are not activations: a post-accumulate-grad hook moves each ``.grad`` storage out of the
  activation count (the ZeRO accounting reports gradients).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# Factory ops with at most this many output elements run for real (index tensors, small masks).
REAL_FACTORY_NUMEL = 1 << 20


class _Entry:
    __slots__ = ("nbytes", "counted")

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.counted = nbytes, True


class LiveBytes(TorchDispatchMode):
    """Live bytes of tensor storages created while active (fake and real) and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, entry: _Entry) -> None:
        if entry.counted:
            self.live -= entry.nbytes

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        entry = _Entry(int(st.nbytes()))
        self._seen[st] = entry
        weakref.finalize(st, self._free, entry)
        self.live += entry.nbytes
        self.peak = max(self.peak, self.live)

    def exclude(self, t: torch.Tensor) -> None:
        """Stop counting ``t``'s storage (e.g. a parameter's gradient)."""
        entry = self._seen.get(t.untyped_storage())
        if entry is not None and entry.counted:
            entry.counted = False
            self.live -= entry.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(a, FakeTensor) for a in tensors):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)  # the fake mode below runs it
            if not tensors and _all_small(out):  # a small factory: redo it for real (RNG, aranges)
                with unset_fake_temporarily():
                    out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _all_small(out: Any) -> bool:
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(leaves) and all(t.numel() <= REAL_FACTORY_NUMEL for t in leaves)


@dataclass(frozen=True)
class ActivationTrace:
    """One micro-batch through one pipeline stage."""

    peak: int   # peak live bytes during forward + backward (weights and gradients excluded)
    saved: int  # live bytes at the end of the forward: what each in-flight micro-batch keeps under 1F1B
    tokens: int = 0  # sequence length the model saw (bd3lm: x_t and x_0 side by side, 2 x seq_len)


class _StageOutput(Exception):
    """Stops the objective after a non-last stage's forward (it has no logits to reduce)."""


def trace_micro_batch(model: torch.nn.Module, objective: Any, x0: torch.Tensor, generator: torch.Generator,
                      mode: FakeTensorMode, *, first: bool, last: bool, hidden_size: int,
                      act_dtype: torch.dtype, cond_rows: int) -> ActivationTrace:
    """Forward + backward of the training objective on ``x0`` [b, L] (real token ids) through ``model``
    (this rank's stage, fake weights in ``mode``). Non-first stages receive a fake hidden-state tensor of
    the pipeline's shape; non-last stages get a fake output gradient, as megatron's schedule would."""
    tracker = LiveBytes()
    _clear_model_caches()  # a real cached mask would be reused as is; start from the same state as a run
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.exclude(p.grad)) for p in params]
    box: dict[str, Any] = {}

    def model_fn(input_ids, position_ids, attn, sigma=None, logits_range=None):  # type: ignore[no-untyped-def]
        box["tokens"] = int(position_ids.shape[-1])
        if not first:  # the previous stage's activations, received into a buffer of this shape
            rows = cond_rows + position_ids.shape[-1]
            h = torch.empty(rows, position_ids.shape[0], hidden_size, dtype=act_dtype, device=input_ids.device)
            h.requires_grad_(True)
            model.set_input_tensor(h)
        out = model(input_ids, position_ids, attn, sigma=sigma, logits_range=logits_range)
        if not last:
            box["out"] = out
            raise _StageOutput
        return out

    model.train()
    try:
        with mode, tracker:
            try:
                loss: Optional[torch.Tensor] = objective(model_fn, x0, generator, train=True).loss
            except _StageOutput:
                loss = None
            saved = tracker.live
            if loss is not None:
                loss.backward()
            else:
                out = box.pop("out")
                out.backward(torch.empty_like(out))
                del out
            del loss
        return ActivationTrace(peak=tracker.peak, saved=saved, tokens=int(box.get("tokens", 0)))
    finally:
        _clear_model_caches()
        for h in hooks:
            h.remove()
        for p in params:
            p.grad = None
        if not first:
            model.set_input_tensor(None)


class _FlexFootprint(torch.autograd.Function):
    """FlexAttention's memory footprint without its kernel: the forward saves q, k, v, the output and the
    fp32 log-sum-exp [b, h, S] (what flex's autograd function keeps); the backward allocates dq, dk, dv
    and flex's fp32 row-sum ``delta`` [b, h, S]. Values are never computed (fake tensors)."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[no-untyped-def]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        q, k, v, out, lse = ctx.saved_tensors
        delta = torch.empty_like(lse)  # noqa: F841 - allocated by flex's backward, counted by the trace
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def flex_standin(target_cuda: bool) -> Iterator[bool]:
    """While active, attention that would run FlexAttention on the target device (``flex``, or ``auto``
    when the run is on CUDA) uses :class:`_FlexFootprint`: FlexAttention cannot run on CPU (fake) tensors,
    and its saved tensors are what matter for memory. Yields whether the model's attention is patched."""
    from megabd3.model import attention

    original = attention.attend

    def attend(q, k, v, spec, backend, scale=None, tile=128, call=None):  # type: ignore[no-untyped-def]
        if backend == "flex" or (backend == "auto" and target_cuda):
            return _FlexFootprint.apply(q, k, v)
        return original(q, k, v, spec, backend, scale, tile, call=call)

    attention.attend = attend
    try:
        yield True
    finally:
        attention.attend = original


def _clear_model_caches() -> None:
    """Drop the attention backends' memoised masks/plans: ones built during a trace may be fake tensors,
    and a later real forward in this process (tests, the benchmark) must not pick them up."""
    from megabd3.model import attention

    for obj in vars(attention).values():
        if callable(getattr(obj, "cache_clear", None)):
            obj.cache_clear()


def pipeline_in_flight(pp_rank: int, pp: int, n_micro: int) -> int:
    """Micro-batches whose activations stage ``pp_rank`` holds at once under megatron's 1F1B schedule."""
    return max(1, min(pp - pp_rank, n_micro))


def activation_bytes(trace: ActivationTrace, in_flight: int) -> int:
    """Peak activation bytes of a stage holding ``in_flight`` micro-batches: the earlier ones keep what
    their forward saved while the last one runs its forward and backward."""
    return trace.peak + (in_flight - 1) * trace.saved

