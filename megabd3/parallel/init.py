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
    """(rank, local_rank, world_size) from torchrun env, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if "SLURM_PROCID" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1))
        # torch's env:// init reads these; srun does not set them.
        env.setdefault("RANK", str(rank))
        env.setdefault("WORLD_SIZE", str(world))
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
            env["MASTER_ADDR"] = _first_host(nodelist)
        env.setdefault("MASTER_PORT", "29500")
        return rank, int(env["LOCAL_RANK"]), world
    return 0, 0, 1


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``node[01-04,07],gpu2``."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("]")[0].split(",")[0].split("-")[0]
        return prefix + first
    return head


def init_distributed(cfg, seed: int | None = None) -> ParallelLayout:  # noqa: ANN001 - Config
    """Initialise torch.distributed (if needed) and megatron's TP/PP/DP groups; seed the RNG tracker.

    gloo on CPU, nccl on GPU (``parallel.backend`` may force either). Applies the CPU compatibility
    layer when CUDA is absent.
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
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
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
