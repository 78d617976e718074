"""Process-environment preparation shared by every launcher (deepspeed, torchrun, srun, plain python).

Runs before torch.distributed is initialised:
* srun: map SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE when RANK is unset
  (MASTER_ADDR/MASTER_PORT come from the sbatch script);
* plain `python launchers/pretrain.py`: a world of one on 127.0.0.1;
* CPU: OMP_NUM_THREADS=1 per rank unless the user set it (2 ranks on 2 cores thrash otherwise), and
  skip DeepSpeed's start-up JIT build of the shm all-reduce op (92 s on a cold cache; only used by
  inference_all_reduce).
"""
from __future__ import annotations

import os
import sys


def map_slurm_env(env: dict[str, str] | None = None) -> bool:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE from SLURM_* when unset; True if it did."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env.setdefault("LOCAL_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000))
    return True


def single_process_env(env: dict[str, str] | None = None) -> None:
    """A world of one when no launcher set RANK (so deepspeed does not look for MPI)."""
    env = os.environ if env is None else env
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


def prepare_environment() -> None:
    """Everything above, in order. Call first thing in a launcher, before heavy imports."""
    map_slurm_env()
    single_process_env()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        skip_shm_op_build()


def skip_shm_op_build() -> None:
    """Make DeepSpeed's TorchBackend skip the shm-comm JIT build (CPU only).

    `import deepspeed.comm.torch as m` would bind the torch *package* (attribute shadowing), so the
    module object is taken from sys.modules.
    """
    import deepspeed  # noqa: F401 - imports deepspeed.comm.torch

    mod = sys.modules.get("deepspeed.comm.torch")
    if mod is not None and hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None
