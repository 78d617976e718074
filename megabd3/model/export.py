"""Layout-independent weights: global parameter names, TP/PP-independent init, gather and load.

A *full* state dict uses global names (``decoder.layers.<global index>.…``), unsharded tensors, and
vocabulary-sized (unpadded) embedding/output rows, so it loads into any TP/PP layout. Tensor-parallel
shards are cut along megatron's ``partition_dim`` attribute, honouring its ``partition_stride``: a
stride-s weight (the Llama backbone's fused ``linear_fc1`` = [gate; up], s = 2) is s equal chunks
along that dim, and rank r's shard is the concatenation of rank r's contiguous slice of each chunk
([gate_r; up_r]) -- what megatron's gated MLP splits its local output into.
"""
from __future__ import annotations

import math
import re
import zlib
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megabd3.errors import UserError

VOCAB_ROWS = ("embedding.weight", "output_layer.weight", "output_layer.bias")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _chunks(model: Union[torch.nn.Module, List[torch.nn.Module]]) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def global_name(chunk: torch.nn.Module, local: str) -> str:
    """Local parameter name -> global name (layer index = the layer's global layer_number - 1)."""
    mm = _LAYER.match(local)
    if not mm:
        return local
    layer = chunk.decoder.layers[int(mm.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local[mm.end():]


def _tp_info(p: torch.Tensor) -> Tuple[bool, int]:
    return bool(getattr(p, "tensor_model_parallel", False)), int(getattr(p, "partition_dim", -1))


def _stride(p: torch.Tensor) -> int:
    """megatron's ``partition_stride`` of a TP-sharded parameter (1 = one contiguous slice per rank)."""
    return int(getattr(p, "partition_stride", 1) or 1)


def strided_shard(full: torch.Tensor, dim: int, rank: int, tp: int, stride: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim``: the concatenation over the ``stride`` equal
    chunks of ``full`` of each chunk's ``rank``-th of ``tp`` contiguous slices (stride 1: a plain slice)."""
    n = full.shape[dim]
    if n % (stride * tp):
        raise UserError(f"a tensor-parallel weight of size {n} along dim {dim} does not split into "
                        f"{stride} x {tp} equal parts; pick a parallel.tensor_parallel that divides it")
    part = n // (stride * tp)
    if stride == 1:
        return full.narrow(dim, rank * part, part)
    return torch.cat([c.narrow(dim, rank * part, part) for c in full.chunk(stride, dim)], dim)


def strided_unshard(parts: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`strided_shard`: the full tensor of every rank's shard, in rank order."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [t.chunk(stride, dim) for t in parts]  # pieces[r][j]: rank r's slice of chunk j
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def named_global_params(model) -> Iterator[Tuple[str, torch.nn.Module, torch.nn.Parameter]]:  # noqa: ANN001
    for chunk in _chunks(model):
        for local, p in chunk.named_parameters():
            yield global_name(chunk, local), chunk, p


def full_shape(p: torch.Tensor, tp: int) -> List[int]:
    shape = list(p.shape)
    is_tp, dim = _tp_info(p)
    if is_tp and tp > 1:
        shape[dim] *= tp
    return shape


def _shard(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    is_tp, dim = _tp_info(p)
    tp = ps.get_tensor_model_parallel_world_size()
    if not is_tp or tp == 1:
        return full
    return strided_shard(full, dim, ps.get_tensor_model_parallel_rank(), tp, _stride(p))


def _local_shape(p: torch.Tensor) -> List[int]:
    """This rank's (tensor-parallel) shape of ``p``; a ZeRO-3 parameter's data is empty between forwards."""
    return list(getattr(p, "ds_shape", p.shape))


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (deepspeed.zero.Init or stage 3 engine): its storage is ``p.ds_tensor``."""
    return getattr(p, "ds_tensor", None) is not None


def zero3_partition(local: torch.Tensor, p: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """This rank's ZeRO-3 partition of the (TP-local) tensor ``local``: partition r of the flattened
    tensor zero-padded to equal sizes over ``p.ds_process_group`` -- DeepSpeed's layout of ``p.ds_tensor``."""
    n = p.ds_tensor.numel()
    group = getattr(p, "ds_process_group", None)
    r = dist.get_rank(group=group) if dist.is_initialized() else 0
    flat = local.reshape(-1)[r * n:(r + 1) * n]
    out = torch.zeros(n, dtype=dtype or p.ds_tensor.dtype, device=p.ds_tensor.device)
    out[: flat.numel()].copy_(flat)
    return out


@torch.no_grad()
def write_local(p: torch.nn.Parameter, local: torch.Tensor) -> None:
    """Store the (TP-local) full tensor ``local`` into this rank's storage of ``p``, communication-free:
    the ZeRO-3 partition (and the gathered copy when the parameter is currently materialised)."""
    if is_partitioned(p):
        p.ds_tensor.copy_(zero3_partition(local, p))
        if p.data.numel() == local.numel():  # gathered right now (persistent, or inside a gather)
            p.data.copy_(local.reshape(p.data.shape))
    else:
        p.copy_(local.to(device=p.device, dtype=p.dtype))


def local_from_full(name: str, chunk: torch.nn.Module, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's TP shard of a full (unpadded-vocabulary) tensor, checked against the model's shape."""
    tp = ps.get_tensor_model_parallel_world_size()
    full = full.to(torch.float32)
    want = full_shape_of(p, tp)
    if name in VOCAB_ROWS:
        full = _fit_rows(full, want[0])
    if list(full.shape) != want:
        raise UserError(f"checkpoint weight {name!r} has shape {list(full.shape)}, the model expects "
                        f"{want}; make model.* in the config match the checkpoint")
    return _shard(full, p)


def _fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Trim or zero-pad dim 0 to ``rows`` (vocabulary padding differs between TP sizes)."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


# ------------------------------------------------------------------------------------------ init


def _cpu32() -> torch.Tensor:
    """An empty fp32 CPU tensor made without torch's constructor functions: deepspeed.zero.Init patches
    torch.empty/zeros/ones to allocate on the accelerator in the training dtype, and the init must draw
    the same fp32 CPU values with or without it (new_* methods are not patched)."""
    return torch.from_numpy(np.zeros(0, dtype=np.float32))


def _init_full(name: str, shape: List[int], fan_in: Dict[str, int], seed: int, mode: str) -> torch.Tensor:
    base = _cpu32()
    if re.search(r"(norm1|norm2|final_norm)\.weight$", name):
        return base.new_ones(shape)
    if "adaLN_modulation" in name or "final_adaLN" in name or name.startswith("output_layer."):
        return base.new_zeros(shape)  # adaLN-Zero and the zero output head of the reference
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    if mode == "megatron":
        if name.endswith(".bias"):
            return base.new_zeros(shape)
        return base.new_empty(shape).normal_(0.0, 0.02, generator=g)
    # reference: PyTorch defaults. Linear/Embedding weights kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in));
    # Linear biases U(+-1/sqrt(fan_in of their weight)).
    fan = shape[1] if not name.endswith(".bias") else fan_in[name[: -len("bias")] + "weight"]
    bound = 1.0 / math.sqrt(fan)
    return base.new_empty(shape).uniform_(-bound, bound, generator=g)


@torch.no_grad()
def init_weights(model, seed: int, mode: str = "reference") -> None:  # noqa: ANN001
    """Initialise every parameter from a generator seeded by (seed, global name) on the full tensor,
    then keep this rank's shard: the weights do not depend on the TP/PP layout."""
    tp = ps.get_tensor_model_parallel_world_size()
    params = list(named_global_params(model))
    fan_in = {n: full_shape_of(p, tp)[1] for n, _, p in params if len(_local_shape(p)) == 2}
    for name, chunk, p in params:
        shape = full_shape_of(p, tp)
        if name in VOCAB_ROWS:
            real = chunk.vocab_size
            full = _fit_rows(_init_full(name, [real] + shape[1:], fan_in, seed, mode), shape[0])
        else:
            full = _init_full(name, shape, fan_in, seed, mode)
        write_local(p, _shard(full, p).to(p.dtype))  # a zero.Init model keeps its partition only


# ------------------------------------------------------------------------------------- gather/load


def _plain(p: torch.nn.Parameter) -> ContextManager[torch.Tensor]:
    return nullcontext(p.detach())


Materializer = Callable[[str, torch.nn.Parameter], ContextManager[torch.Tensor]]


@torch.no_grad()
def gather_full_state_dict(model, to_all: bool = True,  # noqa: ANN001
                           materialize: Optional[Materializer] = None,
                           dtype_of: Optional[Callable[[torch.nn.Parameter], torch.dtype]] = None,
                           ) -> Optional[Dict[str, torch.Tensor]]:
    """All TP shards and PP stages of this model replica as one full state dict (CPU tensors).

    Collective over the TP and PP groups: every rank of the replica must call it. The tensors travel
    one at a time (a TP gather, then a point-to-point hop to the first stage), so no rank ever holds
    more than its own shards plus one full tensor on the device.

    to_all: every rank gets the dict (tests, small tools). Otherwise only global rank 0 (TP rank 0 of
    the first stage of data-parallel replica 0) gets it and every other rank returns None -- the
    streaming export of checkpoint saves. The other replicas still run `materialize` for each of their
    parameters in the same order (it may be collective over data-parallel ranks: ZeRO gathers, fp32
    fragment all-reduces) but skip the TP gather, the PP hop and the CPU copy.
    materialize(global name, param): a context giving the parameter's full TP-local tensor (default:
    its data); checkpoint saves use it for ZeRO-3 gathers, fp32 master weights and EMA shadows.
    dtype_of(param): the dtype `materialize` yields for it (what travels between pipeline stages; the
    receivers allocate by it and senders cast to it). Default: the parameter's dtype for the default
    materializer, else fp32 for floating-point parameters (lossless for bf16/fp16/fp32 values).
    Communication uses the parameters' device (NCCL needs CUDA tensors); the result is on the CPU.
    """
    if dtype_of is None:
        dtype_of = (lambda p: p.dtype) if materialize is None else \
            (lambda p: torch.float32 if p.dtype.is_floating_point else p.dtype)
    materialize = materialize or (lambda _name, p: _plain(p))
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    local = list(named_global_params(model))
    if not to_all and ps.get_data_parallel_rank() != 0:
        # another replica: its ranks (this TP x PP group, all on the same DP rank) only join the
        # DP-collective materialisations, in the order replica 0 runs them (its own stage's parameters)
        for name, _chunk, p in local:
            with materialize(name, p):
                pass
        return None
    device = local[0][2].device if local else torch.device("cpu")
    # metadata (names, full shapes, travelling dtypes) of every stage, in stage order -- small objects only
    mine = []
    for name, chunk, p in local:
        shape = full_shape_of(p, tp)
        if name in VOCAB_ROWS:
            shape[0] = chunk.vocab_size
        mine.append((name, shape, str(dtype_of(p)).replace("torch.", "")))
    metas: List[list] = [mine]
    if pp > 1:
        metas = [None] * pp  # type: ignore[list-item]
        dist.all_gather_object(metas, mine, group=pp_group)
    own = {name: (chunk, p) for name, chunk, p in local}
    keep = to_all or (tp_rank == 0 and pp_rank == 0)
    out: Dict[str, torch.Tensor] = {}
    for stage, entries in enumerate(metas):
        for name, shape, wire in entries:
            t: Optional[torch.Tensor] = None
            if stage == pp_rank:
                chunk, p = own[name]
                with materialize(name, p) as shard:
                    t = _tp_gather(shard, p, tp, tp_rank, tp_group, to_all)
                if t is not None and name in VOCAB_ROWS:
                    t = t[: chunk.vocab_size]
                if t is not None:
                    # cast to the announced dtype: the receiving stage allocated by it
                    t = t.to(getattr(torch, wire)).contiguous() if pp > 1 else t.contiguous()
            if pp > 1:
                t = _pp_move(t, shape, stage, pp_rank, pp_group, tp_rank, to_all, device, entries, name)
                if to_all and tp > 1:
                    t = _tp_broadcast(t, shape, tp_rank, tp_group, device, entries, name)
            if keep:
                out[name] = t.detach().to("cpu", copy=True)  # type: ignore[union-attr]
    return out if keep else None


def full_shape_of(p: torch.Tensor, tp: int) -> List[int]:
    """:func:`full_shape` of a parameter that may be ZeRO-3 partitioned."""
    shape = _local_shape(p)
    is_tp, dim = _tp_info(p)
    if is_tp and tp > 1:
        shape[dim] *= tp
    return shape


def _tp_gather(shard: torch.Tensor, p: torch.Tensor, tp: int, tp_rank: int, group, to_all: bool  # noqa: ANN001
               ) -> Optional[torch.Tensor]:
    """The full tensor of a TP-sharded parameter on TP rank 0 (every TP rank when ``to_all``)."""
    is_tp, dim = _tp_info(p)
    if not is_tp or tp == 1:
        return shard if (to_all or tp_rank == 0) else None
    shard = shard.contiguous()
    if to_all:
        parts = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(parts, shard, group=group)
        return strided_unshard(parts, dim, _stride(p))
    parts = [torch.empty_like(shard) for _ in range(tp)] if tp_rank == 0 else None
    dist.gather(shard, parts, dst=dist.get_global_rank(group, 0), group=group)
    return strided_unshard(parts, dim, _stride(p)) if parts is not None else None


def _dtype(entries: list, name: str) -> torch.dtype:
    return getattr(torch, dict((n, d) for n, _, d in entries)[name])


def _pp_move(t: Optional[torch.Tensor], shape: List[int], stage: int, pp_rank: int, group, tp_rank: int,  # noqa: ANN001
             to_all: bool, device: torch.device, entries: list, name: str) -> Optional[torch.Tensor]:
    """Bring stage ``stage``'s tensor to the first stage (every stage when ``to_all``); TP rank 0s only."""
    if tp_rank != 0:
        return t
    src = dist.get_global_rank(group, stage)
    if to_all:
        buf = t.to(device) if pp_rank == stage else torch.empty(shape, dtype=_dtype(entries, name), device=device)
        dist.broadcast(buf, src=src, group=group)
        return buf
    if stage == 0:
        return t
    if pp_rank == stage:
        dist.send(t.to(device), dst=dist.get_global_rank(group, 0), group=group)
        return None
    if pp_rank == 0:
        buf = torch.empty(shape, dtype=_dtype(entries, name), device=device)
        dist.recv(buf, src=src, group=group)
        return buf
    return None


def _tp_broadcast(t: Optional[torch.Tensor], shape: List[int], tp_rank: int, group, device: torch.device,  # noqa: ANN001
                  entries: list, name: str) -> torch.Tensor:
    buf = t.to(device).contiguous() if tp_rank == 0 else torch.empty(shape, dtype=_dtype(entries, name), device=device)
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf


@torch.no_grad()
def load_full_state_dict(model, state: Dict[str, torch.Tensor], strict: bool = True) -> None:  # noqa: ANN001
    """Load a full state dict into this rank's shards (any TP/PP layout). ``strict`` also rejects
    keys that belong to no stage of the model -- checked on the names this stage owns only.
    ZeRO-3 parameters (a zero.Init model) get their partition written, without communication."""
    seen = set()
    for name, chunk, p in named_global_params(model):
        if name not in state:
            raise UserError(f"checkpoint has no weight {name!r}; it was saved from a different model "
                            "config (model.* keys must match the training run)")
        write_local(p, local_from_full(name, chunk, p, state[name]).to(dtype=p.dtype))
        seen.add(name)
    if strict:
        known = _all_global_names(model, state)
        extra = sorted(k for k in state if k not in known)
        if extra:
            raise UserError(f"checkpoint has weights the model lacks ({extra[:3]}...); "
                            "make model.* in the config match the checkpoint")


def _all_global_names(model, state: Iterable[str]) -> set:  # noqa: ANN001
    """Names the full model would have: this stage's plus any other stage's layers/head/embedding."""
    names = {n for n, _, _ in named_global_params(model)}
    chunk = _chunks(model)[0]
    n_layers = chunk.config.num_layers
    suffixes = {_LAYER.sub("", n) for n in names if _LAYER.match(n)}
    if not suffixes:  # a stage with no layers cannot tell; accept any layer name
        return names | {k for k in state if _LAYER.match(k)}
    for i in range(n_layers):
        names |= {f"decoder.layers.{i}." + s for s in suffixes}
    names |= {k for k in state if not _LAYER.match(k) and (k.startswith(("embedding.", "sigma_map.",
                                                                          "final_", "output_layer.")))}
    return names
