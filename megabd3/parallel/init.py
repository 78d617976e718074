"""torch.distributed + megatron-core ``parallel_state`` initialisation."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megabd3.errors import UserError
from megabd3.parallel import cpu


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits: global rank/size, the TP x PP x DP split, device and backend."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    device: torch.device
    backend: str


def _env_rank() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun/deepspeed env, else SLURM's, else a single process.

    SLURM's variables are mapped in one place, megabd3.training.launch.map_slurm_env (also run by the
    launchers before any heavy import); it is repeated here for callers that skip the launchers."""
    from megabd3.training.launch import map_slurm_env

    env = os.environ
    map_slurm_env(env)
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))
    return 0, 0, 1


def process_group_backend(backend: str) -> str:
    """The backend string for the default process group.

    NCCL alone has no CPU backend ("No backend type associated with device type cpu"), and CPU tensors
    still reach the default group (DeepSpeed's and megatron's object collectives, barriers, checkpoint
    bookkeeping). A mixed group routes CPU tensors to gloo and CUDA tensors to NCCL. Groups created later
    without an explicit backend (megatron's TP/PP/DP groups) inherit it. Our own per-step collectives
    still put their tensors on the CUDA device (layout.device) so the hot path stays on NCCL.
    """
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def init_distributed(cfg, seed: int | None = None) -> ParallelLayout:  # noqa: ANN001 - Config
    """Initialise torch.distributed (if needed) and megatron's TP/PP/DP groups; seed the RNG tracker.

    gloo on CPU, nccl on GPU (``parallel.backend`` may force either; nccl becomes the mixed
    ``cpu:gloo,cuda:nccl`` group, see process_group_backend). Applies the CPU compatibility layer when
    CUDA is absent.
    """
    par = cfg.parallel
    use_cuda = torch.cuda.is_available()
    backend = par.backend if par.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise UserError(f"parallel.backend: expected auto, nccl or gloo, found {par.backend!r}")
    if backend == "nccl" and not use_cuda:
        raise UserError("parallel.backend=nccl needs CUDA; set parallel.backend to gloo or auto")
    rank, local_rank, world = _env_rank()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        cpu.apply()
    if not dist.is_initialized():
        pg_backend = process_group_backend(backend)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(pg_backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(pg_backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, pp, vp = par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise UserError(
            f"parallel.tensor_parallel ({tp}) x parallel.pipeline_parallel ({pp}) must divide the "
            f"world size ({world}); change the parallel sizes or the number of processes"
        )
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not _same_layout(ps, tp, pp, vp):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.training.seed if seed is None else seed)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return ParallelLayout(rank=rank, world_size=world, tp=tp, pp=pp, dp=world // (tp * pp),
                          dp_rank=ps.get_data_parallel_rank(), device=device, backend=backend)


def _same_layout(ps, tp: int, pp: int, vp: int) -> bool:  # noqa: ANN001 - megatron's parallel_state
    """Whether megatron's groups already exist with these sizes (reuse them).

    destroy_model_parallel() forgets megatron's groups but never destroys the torch process groups behind
    them, and each gloo group keeps its threads: re-initialising per run leaked ~56 threads per run in a
    process that trains many models one after another (the reproduction suite's workers).
    """
    if not ps.model_parallel_is_initialized():
        return False
    want_vp = vp if vp > 1 else None
    return (ps.get_tensor_model_parallel_world_size() == tp and ps.get_pipeline_model_parallel_world_size() == pp
            and ps.get_virtual_pipeline_model_parallel_world_size() == want_vp)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the process group (tests, clean exits)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
