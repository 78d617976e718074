"""CPU compatibility layer for megatron-core 0.16 (reference/cpu_distributed.md section A).

megatron-core assumes CUDA in a handful of places that a CPU/gloo run reaches. :func:`apply` patches
exactly those, and is a no-op when CUDA is available (GPU runs use megatron unmodified):

==============================================  ===============================================
CUDA-only spot                                    replacement
==============================================  ===============================================
RNG tracker (``CudaRNGStatesTracker`` uses        :class:`CPURNGStatesTracker`, same add/fork/
``torch.cuda.get_rng_state``),                    get_states/set_states API on the CPU generator;
``model_parallel_cuda_manual_seed``,              installed as megatron's tracker; the cuda-state
``_get/_set_cuda_rng_state`` (recompute)          getters/setters become no-ops
``torch.cuda.current_device()`` (rotary,          returns ``"cpu"``
p2p shape tensors, memory buffer)
``torch.cuda.synchronize()`` (p2p, timeouts)      no-op
``transformer.utils.get_default_causal_mask``     CPU re-definitions in both modules
/ ``get_sliding_window_causal_mask`` (also in
``fusions.fused_softmax``)
``torch.zeros([], device="cuda")`` literal in     :func:`cpu_device_mode`: a TorchFunctionMode
every pipeline schedule                           rewriting ``device="cuda"`` to ``"cpu"``; wrap
                                                  the forward-backward function in it
==============================================  ===============================================

Tied embeddings with PP > 1 call ``weight.data.cuda()``; that combination is rejected instead.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


class CPURNGStatesTracker:
    """Named CPU generator states with megatron's ``CudaRNGStatesTracker`` interface.

    ``fork(name)`` swaps the global CPU generator to the named state for the duration of the block
    and stores the advanced state back, so dropout inside tensor-parallel regions draws from a
    per-TP-rank stream while everything else stays on the shared default stream.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_: set = set()
        self._is_initialized = False

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def cpu_model_parallel_seed(seed: int, *args: Any, **kwargs: Any) -> None:
    """CPU version of ``model_parallel_cuda_manual_seed``: same seeds, CPU tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tp_rank = kwargs.get("tp_rank")
    if tp_rank is None:
        tp_rank = ps.get_tensor_model_parallel_rank()
    tracker = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def _cpu_causal_mask(sq: int, *args: Any, **kwargs: Any) -> torch.Tensor:
    # megatron convention: True = masked out
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_mask(sq: int, window: int, *args: Any, **kwargs: Any) -> torch.Tensor:
    idx = torch.arange(sq)
    diff = idx[:, None] - idx[None, :]
    return ~((diff >= 0) & (diff < window))


def apply(force: bool = False) -> bool:
    """Install the CPU patches; returns True if they are active. No-op on CUDA unless ``force``."""
    global _APPLIED
    if torch.cuda.is_available() and not force:
        return False
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core import tensor_parallel
    from megatron.core.transformer import utils as tutils

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = lambda *a, **k: None
    mrandom.model_parallel_cuda_manual_seed = cpu_model_parallel_seed
    tensor_parallel.model_parallel_cuda_manual_seed = cpu_model_parallel_seed
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    tutils.get_default_causal_mask = _cpu_causal_mask
    tutils.get_sliding_window_causal_mask = _cpu_sliding_window_mask
    try:
        from megatron.core.fusions import fused_softmax

        fused_softmax.get_default_causal_mask = _cpu_causal_mask
        fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_mask
    except ImportError:  # pragma: no cover - optional module
        pass
    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class CPUDeviceMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` keyword arguments of torch calls to ``"cpu"``.

    megatron's schedules create ``torch.zeros([], device="cuda")``; this mode fixes those calls
    without editing megatron (about 4 us per torch call while active).
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None):  # noqa: ANN204
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def cpu_device_mode() -> contextlib.AbstractContextManager:
    """The device-rewrite mode on CPU-only machines, a null context otherwise."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return CPUDeviceMode()
