"""Quantities derived from a config that several packages need: block size, batch plan, precision.

One place computes them so the trainer, the DeepSpeed config and the validator always agree.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from megabd3.config.schema import Config


def effective_block_size(cfg: Config) -> int:
    """The block size the objective really uses: 1 for ar, L for mdlm/sedd, else diffusion.block_size."""
    objective = cfg.diffusion.objective
    if objective == "ar":
        return 1
    if objective in ("mdlm", "sedd"):
        return cfg.data.seq_len
    return cfg.diffusion.block_size


def model_parallel_size(cfg: Config) -> int:
    """Ranks that hold one copy of the model: tensor_parallel x pipeline_parallel."""
    return cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel


@dataclass(frozen=True)
class P2POptions:
    """megatron's point-to-point settings for the pipeline schedule."""

    batch_p2p_comm: bool
    overlap_p2p_comm: bool


def p2p_options(backend: str, virtual_pipeline: int = 1) -> P2POptions:
    """The p2p settings for a pipeline group on ``backend`` (``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``).

    gloo: both off. Batched p2p on gloo matches two same-tag messages between one pair of ranks in the
    wrong order (with PP=2 the previous and next rank are the same peer): silently wrong gradients
    (shared/reference/cpu_distributed.md section C); the unbatched even/odd path is correct. Overlap
    stays off too: it posts the same-peer send/recv pairs concurrently, the very case gloo reorders.
    NCCL: megatron's 1F1B schedule does not support overlap, so batch the send/recv pairs into one
    ``batch_isend_irecv`` (one NCCL group call); the interleaved schedule cannot batch and overlap at
    once, so it overlaps instead.
    """
    if "nccl" not in backend.lower():
        return P2POptions(batch_p2p_comm=False, overlap_p2p_comm=False)
    if virtual_pipeline > 1:
        return P2POptions(batch_p2p_comm=False, overlap_p2p_comm=True)
    return P2POptions(batch_p2p_comm=True, overlap_p2p_comm=False)


def padded_vocab_size(cfg: Config, vocab_size: int) -> int:
    """Round the model vocabulary up to a multiple of make_vocab_size_divisible_by x tensor_parallel."""
    multiple = max(1, cfg.model.make_vocab_size_divisible_by) * max(1, cfg.parallel.tensor_parallel)
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's sequences are split: global = micro x accumulation x dp."""

    micro_batch_size: int
    gradient_accumulation: int
    dp_size: int
    global_batch_size: int


def batch_plan_problems(cfg: Config, dp_size: int) -> list[str]:
    """Why the batch sizes cannot be split over ``dp_size`` data-parallel ranks (empty if they can)."""
    t = cfg.training
    problems: list[str] = []
    if t.micro_batch_size < 1 or dp_size < 1:
        return problems  # reported by the per-field checks
    if t.global_batch_size > 0:
        per_step = t.micro_batch_size * dp_size
        if t.global_batch_size % per_step:
            problems.append(
                f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                f"training.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp_size} = {per_step}; "
                f"change global_batch_size or micro_batch_size"
            )
        else:
            accum = t.global_batch_size // per_step
            if t.gradient_accumulation not in (1, accum):
                problems.append(
                    f"training.gradient_accumulation={t.gradient_accumulation} disagrees with "
                    f"global_batch_size / (micro_batch_size x dp) = {t.global_batch_size} / "
                    f"({t.micro_batch_size} x {dp_size}) = {accum}; leave gradient_accumulation at 1 "
                    f"(it is derived) or set global_batch_size=0"
                )
    return problems


def batch_plan(cfg: Config, dp_size: int) -> BatchPlan:
    """The batch split for ``dp_size`` data-parallel ranks; raises ConfigError if it does not divide."""
    from megabd3.config.errors import raise_if

    raise_if(batch_plan_problems(cfg, dp_size), "the batch configuration")
    t = cfg.training
    if t.global_batch_size > 0:
        accum = t.global_batch_size // (t.micro_batch_size * dp_size)
    else:
        accum = t.gradient_accumulation
    return BatchPlan(t.micro_batch_size, accum, dp_size, t.micro_batch_size * accum * dp_size)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """world_size / (TP x PP); raises ConfigError when it does not divide."""
    from megabd3.config.errors import ConfigError

    mp = model_parallel_size(cfg)
    if mp < 1 or world_size % mp:
        raise ConfigError(
            [f"world size {world_size} is not a multiple of tensor_parallel x pipeline_parallel = {mp}"],
            "the parallel layout",
        )
    return world_size // mp


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether torch sees a GPU. Imports torch lazily: only precision=auto and flex need to know."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_precision(cfg: Config, cuda: Optional[bool] = None) -> str:
    """bf16 or fp32. ``auto`` is bf16 iff CUDA is available (``cuda`` overrides the detection)."""
    precision = cfg.parallel.precision
    if precision != "auto":
        return precision
    has_cuda = cuda_available() if cuda is None else cuda
    return "bf16" if has_cuda else "fp32"
