"""Exponential moving average of the weights, kept on each rank's *local* parameter storage.

DeepSpeed has no EMA. Ours follows the reference (`models/ema.py` of bd3lms/MDLM): shadow weights start
as a copy of the initial weights, and after every optimizer step

    n += 1;  decay_n = min(decay, (1 + n) / (10 + n));  shadow -= (1 - decay_n) * (shadow - param)

Under ZeRO-3 a parameter's full tensor exists only inside a forward pass; between steps each rank holds
its partition in `param.ds_tensor`. The EMA is an elementwise map, so averaging the partition is the
same as partitioning the average: we keep the shadow of exactly what the rank stores (the ZeRO-3
partition, the tensor-parallel shard, or the full tensor), which costs no communication and keeps the
EMA as sharded as the weights. Swapping the shadow into that storage (:meth:`EMA.applied`) makes the
next forward -- which gathers partitions -- run with EMA weights; full gathered copies for inference
are produced by the checkpoint code under `deepspeed.zero.GatheredParameters`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def local_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """The storage this rank owns for `p`: the ZeRO-3 partition when partitioned, else the data."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    """EMA of a list of parameters (the trainable ones, in a fixed order)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [local_tensor(p).detach().float().clone() for p in self.params]
        self._backup: list[torch.Tensor] | None = None

    def decay_at(self, n: int) -> float:
        """Decay used for the n-th update (n >= 1), with the reference's (1+n)/(10+n) warm-up."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current (post-optimizer-step) weights."""
        self.num_updates += 1
        one_minus = 1.0 - self.decay_at(self.num_updates)
        for s, p in zip(self.shadow, self.params):
            s.sub_(one_minus * (s - local_tensor(p).float()))

    @torch.no_grad()
    def store_and_apply(self) -> None:
        """Back up the live weights and write the shadow into the parameters' storage."""
        if self._backup is not None:
            raise RuntimeError("EMA weights are already applied")
        self._backup = [local_tensor(p).detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            local_tensor(p).copy_(s)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the backed-up live weights back (bit-exact)."""
        if self._backup is None:
            raise RuntimeError("EMA weights are not applied")
        for b, p in zip(self._backup, self.params):
            local_tensor(p).copy_(b)
        self._backup = None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """`with ema.applied():` -- run evaluation/export with EMA weights, then restore."""
        self.store_and_apply()
        try:
            yield
        finally:
            self.restore()

    @torch.no_grad()
    def copy_from_params(self) -> None:
        """Reset the shadow to the current weights (e.g. after loading pretrained weights)."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(local_tensor(p).float())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA state does not match the model's local parameters (different model or layout)")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for s, t in zip(self.shadow, shadow):
            s.copy_(t)
