"""Layout-independent weights: global parameter names, TP/PP-independent init, gather and load.

A *full* state dict uses global names (``decoder.layers.<global index>.…``), unsharded tensors, and
vocabulary-sized (unpadded) embedding/output rows, so it loads into any TP/PP layout. Tensor-parallel
shards are cut along megatron's ``partition_dim`` attribute.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Dict, Iterable, Iterator, List, Tuple, Union

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
    size = p.shape[dim]
    return full.narrow(dim, ps.get_tensor_model_parallel_rank() * size, size)


def _fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Trim or zero-pad dim 0 to ``rows`` (vocabulary padding differs between TP sizes)."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


# ------------------------------------------------------------------------------------------ init


def _init_full(name: str, shape: List[int], fan_in: Dict[str, int], seed: int, mode: str) -> torch.Tensor:
    if re.search(r"(norm1|norm2|final_norm)\.weight$", name):
        return torch.ones(shape)
    if "adaLN_modulation" in name or "final_adaLN" in name or name.startswith("output_layer."):
        return torch.zeros(shape)  # adaLN-Zero and the zero output head of the reference
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    if mode == "megatron":
        if name.endswith(".bias"):
            return torch.zeros(shape)
        return torch.empty(shape).normal_(0.0, 0.02, generator=g)
    # reference: PyTorch defaults. Linear/Embedding weights kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in));
    # Linear biases U(+-1/sqrt(fan_in of their weight)).
    fan = shape[1] if not name.endswith(".bias") else fan_in[name[: -len("bias")] + "weight"]
    bound = 1.0 / math.sqrt(fan)
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


@torch.no_grad()
def init_weights(model, seed: int, mode: str = "reference") -> None:  # noqa: ANN001
    """Initialise every parameter from a generator seeded by (seed, global name) on the full tensor,
    then keep this rank's shard: the weights do not depend on the TP/PP layout."""
    tp = ps.get_tensor_model_parallel_world_size()
    params = list(named_global_params(model))
    fan_in = {n: full_shape(p, tp)[1] for n, _, p in params if p.dim() == 2}
    for name, chunk, p in params:
        shape = full_shape(p, tp)
        if name in VOCAB_ROWS:
            real = chunk.vocab_size
            full = _fit_rows(_init_full(name, [real] + shape[1:], fan_in, seed, mode), shape[0])
        else:
            full = _init_full(name, shape, fan_in, seed, mode)
        p.copy_(_shard(full, p).to(p.dtype))


# ------------------------------------------------------------------------------------- gather/load


@torch.no_grad()
def gather_full_state_dict(model) -> Dict[str, torch.Tensor]:  # noqa: ANN001
    """All TP shards and PP stages of this model replica as one full state dict (CPU tensors).

    Collective over the TP and PP groups: every rank of the replica must call it; every rank gets
    the result (rank 0 typically saves it).
    """
    tp = ps.get_tensor_model_parallel_world_size()
    tp_group = ps.get_tensor_model_parallel_group()
    stage: Dict[str, torch.Tensor] = {}
    for name, chunk, p in named_global_params(model):
        t = p.detach()
        is_tp, dim = _tp_info(p)
        if is_tp and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=dim)
        if name in VOCAB_ROWS:
            t = t[: chunk.vocab_size]
        stage[name] = t.cpu().clone()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return stage
    gathered: List[Dict[str, torch.Tensor]] = [None] * ps.get_pipeline_model_parallel_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, stage, group=ps.get_pipeline_model_parallel_group())
    full: Dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part)
    return full


@torch.no_grad()
def load_full_state_dict(model, state: Dict[str, torch.Tensor], strict: bool = True) -> None:  # noqa: ANN001
    """Load a full state dict into this rank's shards (any TP/PP layout). ``strict`` also rejects
    keys that belong to no stage of the model -- checked on the names this stage owns only."""
    tp = ps.get_tensor_model_parallel_world_size()
    seen = set()
    for name, chunk, p in named_global_params(model):
        if name not in state:
            raise UserError(f"checkpoint has no weight {name!r}; it was saved from a different model "
                            "config (model.* keys must match the training run)")
        full = state[name].to(torch.float32)
        want = full_shape(p, tp)
        if name in VOCAB_ROWS:
            full = _fit_rows(full, want[0])
        if list(full.shape) != want:
            raise UserError(f"checkpoint weight {name!r} has shape {list(full.shape)}, the model expects "
                            f"{want}; make model.* in the config match the checkpoint")
        p.copy_(_shard(full, p).to(device=p.device, dtype=p.dtype))
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
