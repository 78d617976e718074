"""Capture and restore every random-number generator a rank uses (exact resume, invariant 7).

A rank's randomness lives in: Python's `random`, NumPy's global state, torch's CPU generator, the
CUDA generators (GPU), and megatron-core's model-parallel RNG tracker (dropout inside tensor-parallel
regions; on CPU it is the CPU tracker installed by `megabd3.parallel.cpu`). All of them are saved per
rank and restored on the same rank, so a resumed run draws the same numbers as an uninterrupted one.

The training loop additionally *derives* its per-micro-batch generators from (seed, global sample
index) (:func:`micro_batch_seed`), so the diffusion noise and dropout do not depend on the data-parallel
layout either; the saved states cover everything else (e.g. data-loader workers, user hooks).
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def _tracker():  # type: ignore[no-untyped-def]
    """megatron-core's model-parallel RNG tracker, or None when megatron is not initialised."""
    try:
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        return tracker if tracker.get_states() else None
    except Exception:  # noqa: BLE001 - megatron absent or tracker unusable on this device
        return None


def capture_rng_state() -> dict[str, Any]:
    """Every generator state of this rank, as picklable objects (tensors are cloned to CPU)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().clone(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": None,
    }
    tracker = _tracker()
    if tracker is not None:
        state["tracker"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in tracker.get_states().items()}
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (restores on the current rank)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None:
        tracker = _tracker()
        if tracker is not None:
            tracker.set_states(state["tracker"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_seed(seed: int, first_sample: int, salt: str = "noise") -> int:
    """A 63-bit seed derived from (run seed, global index of a micro-batch's first sample, purpose).

    Hash-derived rather than `seed + index` so nearby runs/indices do not share streams. Because it
    depends only on the global sample index, DP=2 and a single process with gradient accumulation draw
    identical noise for the same micro-batch.
    """
    digest = hashlib.sha256(f"{seed}:{first_sample}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
