"""Process-environment preparation shared by every launcher (deepspeed, torchrun, srun, plain python).

Runs before torch.distributed is initialised:
* srun: map SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE when RANK is unset;
  MASTER_ADDR (unless exported, as launchers/slurm/*.sbatch do) is the first host of the step's nodelist,
  MASTER_PORT is derived from the job id, so a bare multi-node `srun python launchers/pretrain.py` works;
* plain `python launchers/pretrain.py`: a world of one on 127.0.0.1;
* CPU: OMP_NUM_THREADS=1 per rank unless the user set it (2 ranks on 2 cores thrash otherwise), and
  skip DeepSpeed's start-up JIT build of the shm all-reduce op (92 s on a cold cache; only used by
  inference_all_reduce).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from megabd3.errors import UserError

LOOPBACK = "127.0.0.1"
# srun sets the STEP_* variables for its job step (which may use a subset of the job's nodes); the
# JOB_*/plain names are the allocation's.
NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def expand_nodelist(nodelist: str) -> list[str]:
    """All hosts of a SLURM hostlist expression, in order, e.g. ``node[01-02,07],gpu2`` ->
    node01 node02 node07 gpu2; ``a-[1-3]`` -> a-1 a-2 a-3; ``n[001-002]x`` -> n001x n002x; several
    bracket groups (``r[1-2]n[1-2]``) expand as a product. Ranges keep the zero padding of their start."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item, nodelist))
    if not hosts:
        raise UserError(f"empty SLURM nodelist {nodelist!r}; export MASTER_ADDR=<first node> before srun")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that are outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [it.strip() for it in items if it.strip()]


def _expand_item(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        if "[" in item or "]" in item:
            raise UserError(f"unbalanced brackets in SLURM nodelist {whole!r}; export MASTER_ADDR=<first node>")
        return [item]
    prefix, body, rest = item[:m.start()], m.group(1), item[m.end():]
    tails = _expand_item(rest, whole) if rest else [""]
    out: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise UserError(f"cannot parse range {part!r} in SLURM nodelist {whole!r}; export MASTER_ADDR=<first node>")
        if sep and int(hi) < int(lo):
            raise UserError(f"descending range {part!r} in SLURM nodelist {whole!r}; export MASTER_ADDR=<first node>")
        names = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)] if sep else [lo]
        out.extend(prefix + n + t for n in names for t in tails)
    return out


def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of `nodelist`: `scontrol show hostnames` when the binary exists (the authority on the
    cluster's syntax), else our parser (containers without the SLURM client)."""
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True)
            hosts = res.stdout.split()
            if hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass  # e.g. no slurmctld reachable from this node: parse it ourselves
    return expand_nodelist(nodelist)


def slurm_master_addr(env: dict[str, str]) -> str:
    """The rendezvous host of a SLURM job: its first node, or 127.0.0.1 when it runs on one node."""
    nodelist = next((env[k] for k in NODELIST_VARS if env.get(k)), "")
    n_nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "0"))) or 0)
    if not nodelist:
        if n_nodes > 1:
            raise UserError(f"SLURM reports {n_nodes} nodes but no SLURM_JOB_NODELIST; export MASTER_ADDR=<first node> "
                            f"before srun")
        return LOOPBACK
    hosts = slurm_hostnames(nodelist)
    # one node: loopback needs no name resolution and no open port on the public interface
    return LOOPBACK if len(hosts) == 1 else hosts[0]


def map_slurm_env(env: dict[str, str] | None = None) -> bool:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE (and MASTER_ADDR/PORT unless set) from SLURM_* when RANK is unset
    and this process is an srun task; True if it did. The one place that reads SLURM's variables."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = slurm_master_addr(env)
    env.setdefault("MASTER_PORT", str(slurm_master_port(env)))
    return True


def slurm_master_port(env: dict[str, str]) -> int:
    """A rendezvous port every task of one srun step derives alike: from the job id and the step id, so
    concurrent steps of one allocation (several srun in one sbatch) do not bind the same port."""
    def num(key: str) -> int:
        raw = env.get(key, "0")
        return int(raw) if raw.isdigit() else 0  # SLURM_STEP_ID may be "batch"/"extern" outside srun

    return 10000 + (num("SLURM_JOB_ID") + 1009 * num("SLURM_STEP_ID")) % 50000


def single_process_env(env: dict[str, str] | None = None) -> None:
    """A world of one when no launcher set RANK (so deepspeed does not look for MPI)."""
    env = os.environ if env is None else env
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


def prepare_environment() -> None:
    """Everything above, in order. Call first thing in a launcher, before heavy imports."""
    from megabd3 import quiet

    quiet.install()  # before deepspeed/megatron are imported (the launchers also call it at their top)
    map_slurm_env()
    single_process_env()
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        # the default group is "cpu:gloo,cuda:nccl" and megatron's groups inherit it: connect each gloo
        # pair on first use rather than building a full gloo mesh per group at start-up (hundreds of ranks)
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    else:
        quiet.install_cpu_only()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        skip_shm_op_build()
    line = quiet.extras_line(cuda) if os.environ.get("RANK", "0") == "0" else None
    if line:
        print(line, flush=True)


def skip_shm_op_build() -> None:
    """Make DeepSpeed's TorchBackend skip the shm-comm JIT build (CPU only).

    `import deepspeed.comm.torch as m` would bind the torch *package* (attribute shadowing), so the
    module object is taken from sys.modules.
    """
    import deepspeed  # noqa: F401 - imports deepspeed.comm.torch

    mod = sys.modules.get("deepspeed.comm.torch")
    if mod is not None and hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None
