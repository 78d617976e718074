"""A fake process group at any world size, for planning runs from a single process (``--dry-run``).

torch ships a "fake" c10d backend for tests (``torch.testing._internal.distributed.fake_pg``): a group of
the requested size and rank in which every collective returns immediately without communicating.
:func:`fake_world` initialises it as the default group *for one chosen rank* (no rendezvous: the store is
an in-process ``FakeStore``, never ``env://``, so ``MASTER_ADDR``/``RANK`` from torchrun or SLURM are
ignored), runs megatron's real ``parallel_state.initialize_model_parallel`` on it, seeds megatron's RNG
tracker, and destroys everything on exit. Building a model inside it gives exactly the shapes that rank
would build (TP shards, its pipeline stage's layers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch.distributed as dist

from megabd3.errors import UserError

FAKE_BACKEND = "fake"


def _register_fake_backend() -> None:
    """Register torch's fake backend (importing its test module does it); fall back to registering the
    C++ ``FakeProcessGroup`` ourselves if the test module is absent from a stripped torch build."""
    try:
        import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers "fake"
        return
    except ImportError:
        pass
    if FAKE_BACKEND in dist.Backend.backend_list:
        return
    try:
        from torch._C._distributed_c10d import FakeProcessGroup
    except ImportError as exc:  # pragma: no cover - every supported torch has it
        raise UserError(f"this torch build has no fake process group ({exc}); --dry-run needs torch >= 2.3") from exc

    def create(common_opts, backend_opts):  # type: ignore[no-untyped-def]
        return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)

    dist.Backend.register_backend(FAKE_BACKEND, create, extended_api=True, devices=["cpu", "cuda"])


def _store() -> dist.Store:
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        return FakeStore()
    except ImportError:  # the fake backend never reads the store; any in-process store will do
        return dist.HashStore()


@dataclass(frozen=True)
class FakeRank:
    """Where the chosen rank sits in megatron's groups."""

    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    first_stage: bool
    last_stage: bool


@contextlib.contextmanager
def fake_world(rank: int, world_size: int, tp: int, pp: int, seed: int = 0) -> Iterator[FakeRank]:
    """Be rank ``rank`` of a fake ``world_size``-rank job with megatron's TP x PP x DP groups.

    Refuses to run inside a real distributed job (one default group per process); always tears the fake
    groups down, also on errors, so the process can enter it again for another rank.
    """
    if dist.is_initialized():
        raise UserError("the dry run needs a process without torch.distributed; run --dry-run with plain "
                        "python, not under torchrun/srun/deepspeed")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    from megabd3.parallel import cpu

    cpu.apply()  # no-op on CUDA machines; megatron's CPU fallbacks otherwise
    _register_fake_backend()
    if ps.model_parallel_is_initialized():  # left over from an earlier run in this process
        ps.destroy_model_parallel()
    # TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch wrap every new group in a ProcessGroupWrapper whose helper
    # gloo group cannot be built on the fake store ("fn INTERNAL ASSERT FAILED ... Not implemented"); nothing
    # here communicates, so the debug checks have nothing to check: off while the fake world exists.
    debug_level = dist.get_debug_level()
    # megatron's CUDA seed path would create a CUDA context (a login node with a GPU); the fake world never
    # runs a kernel, so the CPU tracker is installed unconditionally and megatron's tracker restored on exit.
    saved_tracker = (mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    dist.set_debug_level(dist.DebugLevel.OFF)
    try:
        dist.init_process_group(FAKE_BACKEND, store=_store(), rank=rank, world_size=world_size)
        # gloo side groups cannot be built on a fake store, and nothing here communicates on CPU anyway.
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        cpu.cpu_model_parallel_seed(seed)
        yield FakeRank(rank=rank, world_size=world_size, tp_rank=ps.get_tensor_model_parallel_rank(),
                       pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                       dp_size=ps.get_data_parallel_world_size(),
                       first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
                       last_stage=ps.is_pipeline_last_stage(ignore_virtual=True))
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved_tracker
        dist.set_debug_level(debug_level)


def rank_of(tp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """Global rank of (tp_rank, dp_rank 0, pp_rank) in megatron's default order tp-cp-ep-dp-pp."""
    return tp_rank + tp * dp * pp_rank

