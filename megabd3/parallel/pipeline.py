"""Pipeline-parallel forward/backward through megatron-core's schedules (1F1B / interleaved).

The training loop calls :func:`pipeline_forward_backward` once per optimizer step. Every stage gets
the same micro-batches from ``data_iter`` (dicts with ``input_ids``, ``position_ids``, ``attn`` and
optionally ``sigma``/``logits_range``, plus whatever ``loss_fn`` needs); non-first stages ignore
``input_ids`` (megatron feeds them the previous stage's output through ``set_input_tensor``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megabd3.config.derived import p2p_options
from megabd3.parallel.cpu import cpu_device_mode

LossFn = Callable[[torch.Tensor, Dict[str, Any]], tuple]


def pipeline_forward_backward(model: Union[torch.nn.Module, List[torch.nn.Module]],
                              data_iter: Union[Iterator, List[Iterator]], num_microbatches: int,
                              loss_fn: LossFn, forward_only: bool = False,
                              seq_length: Optional[int] = None, micro_batch_size: Optional[int] = None,
                              ) -> List[Dict[str, Any]]:
    """Run the schedule; returns the per-micro-batch logging dicts of ``loss_fn`` (last stage only).

    ``loss_fn(logits, batch) -> (loss, log_dict)``: ``loss`` is the scalar this micro-batch
    contributes (megatron divides it by ``num_microbatches`` itself, so return the per-micro-batch
    mean); ``log_dict`` values are cloned before megatron's in-place division.
    ``seq_length`` is the length of the tensor exchanged between stages (2L + conditioning rows); it
    is derived from the first micro-batch when omitted.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    first = chunks[0]
    config = first.config
    # batched p2p on NCCL; off on gloo, which reorders same-tag messages (config.derived.p2p_options)
    p2p = p2p_options(pipeline_backend(), len(chunks))
    config.batch_p2p_comm, config.overlap_p2p_comm = p2p.batch_p2p_comm, p2p.overlap_p2p_comm
    config.variable_seq_lengths = False
    iters = data_iter if isinstance(data_iter, list) else [data_iter] * len(chunks) if len(chunks) > 1 else data_iter

    shapes: Dict[str, int] = {}

    def forward_step(batch_iter: Iterator, chunk: torch.nn.Module):  # noqa: ANN202
        batch = next(batch_iter)
        out = chunk(batch.get("input_ids"), batch["position_ids"], batch["attn"],
                    sigma=batch.get("sigma"), logits_range=batch.get("logits_range"))

        def loss_func(output: torch.Tensor):  # noqa: ANN202
            loss, logs = loss_fn(output, batch)
            logs = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in logs.items()}
            return loss, logs

        return out, loss_func

    if seq_length is None or micro_batch_size is None:
        raise ValueError("pass seq_length (rows exchanged between stages, incl. conditioning rows) and "
                         "micro_batch_size; see stage_seq_length()")
    fb = get_forward_backward_func()
    with cpu_device_mode():
        return fb(forward_step_func=forward_step, data_iterator=iters, model=chunks,
                  num_microbatches=num_microbatches, seq_length=seq_length,
                  micro_batch_size=micro_batch_size, forward_only=forward_only)


def pipeline_backend() -> str:
    """Backend of this rank's pipeline group ("gloo" before torch.distributed is up)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return "gloo"
    return str(dist.get_backend(ps.get_pipeline_model_parallel_group()))


def stage_seq_length(model: Any, input_len: int) -> int:
    """Rows of the hidden tensor between stages: the input length plus the conditioning rows."""
    chunk = model[0] if isinstance(model, (list, tuple)) else model
    return input_len + chunk.n_cond_rows


def is_last_stage() -> bool:
    return ps.is_pipeline_last_stage(ignore_virtual=True)
