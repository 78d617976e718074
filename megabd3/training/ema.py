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
are produced by the checkpoint code, one parameter at a time.

ZeRO-3 *persistent* parameters (numel below `stage3_param_persistence_threshold`: norms, biases,
`sigma_map`) are not released after a forward: their full tensor stays gathered in `p.data`, refreshed
from the partitions only after an optimizer step. Writing `ds_tensor` alone would leave the forward
running on their live values. :func:`regathered` therefore releases every gathered ZeRO-3 parameter
before the partitions are written and all-gathers them again afterwards -- DeepSpeed's own recipe
around checkpoint loads (`partition` + `all_gather` of `persistent_parameters`). We keep persistence
(instead of a threshold of 0) because it saves one small all-gather per parameter per forward, which is
latency-bound on NCCL; the swap costs one gather of those small tensors per evaluation. ZeRO++ hpZ
(`zero_hpz_partition_size > 1`) adds a secondary intra-node partition that forwards gather from;
the swap drops it (DeepSpeed rebuilds it from the next gathered values), see :func:`_invalidate_secondary`.

Low-precision training (bf16): the module holds bf16 copies and DeepSpeed's optimizer the fp32 master
weights. Averaging the bf16 copies would bake their rounding into the EMA, so the shadow tracks the fp32
master in the optimizer's own layout: under ZeRO-0 the replicated fp32 master (:func:`link_fp32_masters`),
under ZeRO-3 the rank's fp32 partition (same layout as
`ds_tensor`), under ZeRO-0/1/2 (BF16_Optimizer / ZeRO-1/2 hp mapping) the rank's fp32 *fragment* of the
flat partition -- so the EMA is partitioned over data-parallel ranks there too. In fp32 training the
module weights are the master values and the shadow stays the module's local storage (as before).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

LOCAL, MASTER, ZERO3, FRAGMENT = "local", "master", "zero3", "fragment"
MASTER_ATTR = "_megabd3_fp32_master"


def link_fp32_masters(engine) -> None:  # type: ignore[no-untyped-def]
    """ZeRO-0 with bf16: DeepSpeed's FP16_(Unfused)Optimizer keeps fp32 masters (per parameter, or one
    flat buffer per group), replicated on every rank, and links nothing to the parameters. Give each low-precision parameter a
    view of its slice (the flat buffers are updated in place, also by checkpoint loads) so the EMA and
    the model.pt export read the master. ZeRO-1/2/3 link their own (`_hp_mapping`, `_z3_optimizer`)."""
    opt = getattr(engine, "optimizer", None)
    groups = getattr(opt, "fp16_groups", None)
    if groups is None or engine.zero_optimization_stage() > 0:
        return
    if getattr(opt, "fp32_groups", None) is not None:  # FP16_UnfusedOptimizer (torch AdamW): one master per param
        for params, masters in zip(groups, opt.fp32_groups):
            for p, m in zip(params, masters):
                setattr(p, MASTER_ATTR, m.detach())
        return
    for params, flat in zip(groups, getattr(opt, "fp32_groups_flat", [])):  # FP16_Optimizer (fused Adam)
        offset = 0
        for p in params:  # _flatten_dense_tensors: the group's tensors back to back, no padding
            setattr(p, MASTER_ATTR, flat.detach().narrow(0, offset, p.numel()).view_as(p))
            offset += p.numel()


def local_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """The storage this rank owns for `p`: the ZeRO-3 partition when partitioned, else the data."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def shadow_kind(p: torch.nn.Parameter) -> str:
    """Which tensor the EMA averages for `p` (see the module docstring)."""
    if p.dtype == torch.float32:
        return LOCAL
    if getattr(p, MASTER_ATTR, None) is not None:
        return MASTER
    if getattr(p, "_z3_optimizer", None) is not None:
        return ZERO3
    if hasattr(p, "_hp_mapping"):
        return FRAGMENT
    return LOCAL


def tracked(p: torch.nn.Parameter, kind: str) -> torch.Tensor:
    """The rank's current values of what the EMA averages for `p` (re-read every time: DeepSpeed
    re-links the fp32 fragments when it loads a checkpoint)."""
    if kind == MASTER:
        return getattr(p, MASTER_ATTR)
    if kind == ZERO3:
        return p._z3_optimizer.get_local_fp32_param(p)
    if kind == FRAGMENT:
        m = p._hp_mapping
        return m.get_hp_fragment() if m is not None else torch.zeros(0, device=p.device)
    return local_tensor(p)


def _fragment_range(p: torch.nn.Parameter) -> tuple[int, int]:
    m = p._hp_mapping
    return (0, 0) if m is None else (int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel))


def _full_from_fragment(p: torch.nn.Parameter, frag: torch.Tensor) -> torch.Tensor:
    """Assemble the full fp32 tensor from every rank's fragment (DeepSpeed's get_full_hp_param recipe)."""
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    start, n = _fragment_range(p)
    buf.narrow(0, start, n).copy_(frag)
    dist.all_reduce(buf, group=p._dp_group)
    return buf.view(p.shape)


def _gathered_zero3(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """ZeRO-3 parameters whose full tensor is currently materialised (persistent ones between steps)."""
    held = [p for p in params if hasattr(p, "ds_tensor") and hasattr(p, "ds_status")]
    if not held:
        return []
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in held if p.ds_status == ZeroParamStatus.AVAILABLE]


def _check_same_set(params: list[torch.nn.Parameter], held: list[torch.nn.Parameter]) -> None:
    """Every rank of the ZeRO group must release/re-gather the same parameters (the gathers are
    collective); a divergent set would hang in `all_gather` -- fail with a message instead. One tiny
    all-reduce per swap, only when ZeRO-3 parameters are present."""
    z3 = [p for p in params if hasattr(p, "ds_tensor")]
    if not z3 or not dist.is_initialized():
        return
    group = getattr(z3[0], "ds_process_group", None)
    n = torch.tensor([len(held), -len(held)], dtype=torch.int64, device=z3[0].device)  # the accelerator (ds_tensor may be offloaded)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    if int(n[0]) != -int(n[1]):
        raise RuntimeError(f"ZeRO-3 ranks hold different numbers of gathered parameters ({-int(n[1])}..{int(n[0])}; "
                           f"this rank {len(held)}): the EMA swap must run outside forward passes on every rank")


def _invalidate_secondary(params: list[torch.nn.Parameter]) -> None:
    """ZeRO++ hpZ (`zero_hpz_partition_size > 1`) keeps a second, intra-node partition
    (`ds_secondary_tensor`) that every forward gathers from when present. Writes to `ds_tensor` do not
    reach it, so drop it -- DeepSpeed's own recipe after checkpoint loads (`invalidate_secondary_tensor`):
    the next gather falls back to the primary partitions, and the release after it rebuilds the
    secondary copy from the gathered (now current) values."""
    for p in params:
        if getattr(p, "ds_secondary_tensor", None) is not None:
            p.ds_secondary_tensor = None


@contextlib.contextmanager
def regathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block, writes to the ZeRO-3 partitions (`ds_tensor`) also reach the gathered full
    tensors: those are released on entry and all-gathered again on exit (and hpZ secondary partitions
    are dropped). Collective over the ZeRO group when ZeRO-3 parameters are present; a no-op otherwise."""
    held = _gathered_zero3(params)
    _check_same_set(params, held)
    if held:
        held[0].partition(param_list=held, has_been_updated=False)  # frees p.data, keeps ds_tensor
    try:
        yield
    finally:
        _invalidate_secondary(params)  # before the gather: it would read the stale secondary copy
        if held:
            held[0].all_gather(param_list=held)


class EMA:
    """EMA of a list of parameters (the trainable ones, in a fixed order)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.decay = float(decay)
        self.num_updates = 0
        self.kinds = [shadow_kind(p) for p in self.params]
        self.shadow = [tracked(p, k).detach().float().clone() for p, k in zip(self.params, self.kinds)]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._backup: list[torch.Tensor] | None = None

    def decay_at(self, n: int) -> float:
        """Decay used for the n-th update (n >= 1), with the reference's (1+n)/(10+n) warm-up."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current (post-optimizer-step) weights."""
        self.num_updates += 1
        one_minus = 1.0 - self.decay_at(self.num_updates)
        for s, p, k in zip(self.shadow, self.params, self.kinds):
            s.sub_(one_minus * (s - tracked(p, k).float()))

    @torch.no_grad()
    def store_and_apply(self) -> None:
        """Back up the live weights and write the shadow into the parameters' storage (collective when
        a shadow is a fragment, or ZeRO-3 parameters are gathered)."""
        if self._backup is not None:
            raise RuntimeError("EMA weights are already applied")
        self._backup = [local_tensor(p).detach().clone() for p in self.params]
        with regathered(self.params):
            for s, p, k in zip(self.shadow, self.params, self.kinds):
                local_tensor(p).copy_(_full_from_fragment(p, s) if k == FRAGMENT else s)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the backed-up live weights back (bit-exact)."""
        if self._backup is None:
            raise RuntimeError("EMA weights are not applied")
        with regathered(self.params):
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

    def tracks(self, p: torch.nn.Parameter) -> bool:
        return id(p) in self._index

    @contextlib.contextmanager
    def full_shadow(self, p: torch.nn.Parameter) -> Iterator[torch.Tensor]:
        """The EMA of `p` as one full (tensor-parallel-local) fp32 tensor, for streaming exports.
        Collective over the ZeRO group for partitioned shadows; nothing else is materialised."""
        i = self._index[id(p)]
        s, k = self.shadow[i], self.kinds[i]
        if k == FRAGMENT:
            yield _full_from_fragment(p, s)
        elif hasattr(p, "ds_tensor"):
            group = getattr(p, "ds_process_group", None)
            s = s.to(p.ds_tensor.device)  # an offloaded fp32 partition lives on the CPU; NCCL needs CUDA
            parts = [torch.empty_like(s) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, s.contiguous(), group=group)
            yield torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
        else:
            yield s

    @torch.no_grad()
    def copy_from_params(self) -> None:
        """Reset the shadow to the current weights (e.g. after loading pretrained weights)."""
        for s, p, k in zip(self.shadow, self.params, self.kinds):
            s.copy_(tracked(p, k).float())

    @torch.no_grad()
    def load_full(self, module: torch.nn.Module, full: dict[str, torch.Tensor], num_updates: int) -> None:
        """Set the shadow from a full state dict (`model.pt`'s "ema": global names, unsharded) in this
        rank's layout, without communication and without touching the live weights: fine-tuning from
        a pretraining EMA, and resuming at another data-parallel size."""
        from megabd3.model.export import local_from_full, named_global_params, zero3_partition

        for name, chunk, p in named_global_params(module):
            if id(p) not in self._index:
                continue
            if name not in full:
                raise ValueError(f"EMA weights have no {name!r} (a different model)")
            i = self._index[id(p)]
            local = local_from_full(name, chunk, p, full[name]).to(self.shadow[i].device)
            if hasattr(p, "ds_tensor"):
                local = zero3_partition(local, p, torch.float32)
            elif self.kinds[i] == FRAGMENT:
                start, n = _fragment_range(p)
                local = local.reshape(-1).narrow(0, start, n)
            self.shadow[i].copy_(local.reshape(self.shadow[i].shape))
        self.num_updates = int(num_updates)

    def _from_full_local(self, i: int, saved: torch.Tensor) -> torch.Tensor:
        """A bf16 ZeRO-1/2 shadow saved before the EMA tracked fp32 fragments held the full local tensor:
        cut this rank's fragment out of it."""
        p, own = self.params[i], self.shadow[i]
        if self.kinds[i] == FRAGMENT and saved.shape != own.shape and saved.numel() == p.numel():
            start, n = _fragment_range(p)
            return saved.reshape(-1).narrow(0, start, n)
        return saved

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = [self._from_full_local(i, t) for i, t in enumerate(state["shadow"])] \
            if len(state["shadow"]) == len(self.shadow) else state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA state does not match the model's local parameters (different model or layout)")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for s, t in zip(self.shadow, shadow):
            s.copy_(t)
