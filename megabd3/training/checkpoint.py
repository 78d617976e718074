"""Checkpoints: layout, atomic commit, `latest`, keep-last-n, resume and inference loading.

Layout (docs/interfaces.md):

    <run_dir>/checkpoints/step_00001000/
        <DeepSpeed engine files>        model/optimizer/scheduler states, one set per rank (ZeRO shards)
        megabd3_state.pt                global: step, consumed samples, clip interval, config hash, layout
        megabd3_rank_00000.pt ...       per rank: every RNG state and the rank's EMA shard
        config.json                     the resolved config
        model.pt                        full gathered model + EMA state dicts (rank 0), any-layout inference
    <run_dir>/checkpoints/latest        "step_00001000", written last

Atomicity: every rank writes into `.tmp_step_XXXXXXXX/`; after a barrier rank 0 renames the directory
to its final name and only then replaces `latest` (temp file + os.replace). A crash at any point
leaves `latest` naming the previous complete checkpoint; stale `.tmp_*` directories are removed at the
next start. (Per-rank state lives in per-rank files rather than one gathered `megabd3_state.pt` so the
EMA stays sharded like the weights.)
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from megabd3.io import atomic_save_with, atomic_write_text  # noqa: F401  (re-exported)
import torch.distributed as dist

from megabd3.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
GLOBAL_STATE = "megabd3_state.pt"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
TMP_PREFIX = ".tmp_"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"megabd3_rank_{rank:05d}.pt"


@dataclass
class TrainState:
    """What the loop needs besides the engine to continue exactly where it stopped."""

    step: int = 0
    consumed_samples: int = 0
    clip_interval: tuple[float, float] = (1e-3, 1.0)
    config_hash: str = ""
    layout: dict = field(default_factory=dict)
    skipped_steps: int = 0  # optimizer steps suppressed by training.nan_policy=skip


# ---------------------------------------------------------------------------------------------- files
def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through :func:`megabd3.io.atomic_save_with` (temp file, fsync, os.replace)."""
    atomic_save_with(path, lambda fh: torch.save(obj, fh))


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def read_latest(run_dir: str | Path) -> Path | None:
    """The step directory `latest` names, or None when the run has no complete checkpoint."""
    ck = checkpoints_dir(run_dir)
    latest = ck / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    path = ck / name
    if not (path / GLOBAL_STATE).is_file():
        raise UserError(f"{latest} names {name!r} but {path / GLOBAL_STATE} is missing; "
                        f"point {latest} at an existing step_* directory or set checkpoint.resume=false")
    return path


def list_step_dirs(ck: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    if not ck.is_dir():
        return []
    dirs = [p for p in ck.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / GLOBAL_STATE).is_file()]
    return sorted(dirs, key=lambda p: p.name)


def remove_partial(ck: Path) -> list[Path]:
    """Delete `.tmp_*` leftovers of an interrupted save (rank 0, at start-up)."""
    removed = []
    if ck.is_dir():
        for p in ck.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def prune(ck: Path, keep_last_n: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last_n` complete checkpoints (0 keeps all)."""
    if keep_last_n <= 0:
        return []
    dirs = list_step_dirs(ck)
    doomed = [d for d in dirs[:-keep_last_n] if protect is None or d.resolve() != protect.resolve()]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run dir, its checkpoints/ dir, or a step dir; return the step dir."""
    p = Path(path)
    if (p / GLOBAL_STATE).is_file() or (p / MODEL_FILE).is_file():
        return p
    for run_dir in (p, p.parent):
        if (checkpoints_dir(run_dir) / LATEST).is_file() and (p == run_dir or p.name == CHECKPOINTS):
            found = read_latest(run_dir)
            if found is not None:
                return found
    raise UserError(f"no checkpoint at {path}: expected a run directory with checkpoints/latest, "
                    f"or a checkpoints/step_* directory containing {GLOBAL_STATE} or {MODEL_FILE}")


# ------------------------------------------------------------------------------------------- gathering
def _is_zero3(engine) -> bool:  # type: ignore[no-untyped-def]
    return engine is not None and engine.zero_optimization_stage() == 3


def gather_full_state_dict(module: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) state dict of `module` on global rank 0 (None elsewhere); collective.

    ZeRO-3 partitions are gathered with `deepspeed.zero.GatheredParameters`; tensor/pipeline shards
    with the model package's `gather_full_state_dict` when the model is model-parallel.
    """
    ctx = nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with ctx:
        mp = _model_parallel_size()
        if mp > 1:
            from megabd3.model.export import gather_full_state_dict as gather_mp

            sd = gather_mp(module)
        else:
            sd = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()
                  if torch.is_tensor(v)}  # megatron adds None `_extra_state` entries
    rank = dist.get_rank() if dist.is_initialized() else 0
    return sd if rank == 0 else None


def _model_parallel_size() -> int:
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
    except Exception:  # noqa: BLE001 - megatron not initialised (plain single-process use)
        pass
    return 1


# ------------------------------------------------------------------------------------------ save/load
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine,  # type: ignore[no-untyped-def]
    ema,  # EMA | None
    state: TrainState,
    rank_state: dict,
    run_dir: str | Path,
    keep_last_n: int,
    write_config: Callable[[Path], None],
    module: torch.nn.Module | None = None,
    config_dict: dict | None = None,
) -> Path:
    """Write a complete checkpoint for `state.step` and commit it (collective over all ranks)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    ck = checkpoints_dir(run_dir)
    name = step_dirname(state.step)
    tmp = ck / f"{TMP_PREFIX}{name}"
    if rank == 0:
        ck.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    engine.save_checkpoint(str(ck), tag=tmp.name, client_state={"megabd3_step": state.step}, save_latest=False)
    tmp.mkdir(parents=True, exist_ok=True)
    payload = dict(rank_state)
    payload["ema"] = ema.state_dict() if ema is not None else None
    atomic_torch_save(payload, tmp / rank_state_name(rank))

    module = module if module is not None else engine.module
    zero3 = _is_zero3(engine)
    model_sd = gather_full_state_dict(module, zero3)
    ema_sd = None
    if ema is not None:
        with ema.applied():
            ema_sd = gather_full_state_dict(module, zero3)
    if rank == 0:
        atomic_torch_save({"model": model_sd, "ema": ema_sd, "ema_num_updates": ema.num_updates if ema is not None else 0,
                           "step": state.step, "config": config_dict}, tmp / MODEL_FILE)
        write_config(tmp)
        atomic_torch_save(asdict(state), tmp / GLOBAL_STATE)  # written last inside the directory
    _barrier()
    final = ck / name
    if rank == 0:
        if final.exists():  # re-saving a step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ck / LATEST, name + "\n")
        prune(ck, keep_last_n, protect=final)
    _barrier()
    return final


def load_global_state(step_dir: Path) -> TrainState:
    raw = torch.load(step_dir / GLOBAL_STATE, map_location="cpu", weights_only=False)
    raw["clip_interval"] = tuple(raw["clip_interval"])
    return TrainState(**raw)


def load_checkpoint(engine, ema, step_dir: Path, layout: dict) -> tuple[TrainState, dict]:  # type: ignore[no-untyped-def]
    """Restore engine (+optimizer, LR scheduler) and EMA from `step_dir`; return (state, rank_state)."""
    state = load_global_state(step_dir)
    if state.layout and state.layout != layout:
        raise UserError(f"checkpoint {step_dir} was written with layout {state.layout} but this run has {layout}; "
                        f"resume with the same world size/tensor/pipeline sizes, or fine-tune from it with training.init_from")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_file = step_dir / rank_state_name(rank)
    if not rank_file.is_file():
        raise UserError(f"{rank_file} is missing: the checkpoint is incomplete or was written by fewer ranks")
    load_path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load the engine state from {step_dir}; the checkpoint is damaged, "
                        f"point checkpoints/latest at an older step_* directory")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    if ema is not None and rank_state.get("ema") is not None:
        ema.load_state_dict(rank_state["ema"])
    return state, rank_state


def read_model_file(path: str | Path) -> tuple[Path, dict]:
    """Locate and read `model.pt` from a run dir, checkpoints dir, step dir or the file itself."""
    p = Path(path)
    file = p if p.is_file() else resolve_checkpoint(p) / MODEL_FILE
    if not file.is_file():
        raise UserError(f"{file} not found: training.init_from/--checkpoint must name a megabd3 run directory "
                        f"or checkpoints/step_* directory")
    return file, torch.load(file, map_location="cpu", weights_only=False)


def load_for_inference(path: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(Config, full state dict of the EMA weights -- or the raw weights when no EMA was kept)."""
    file, payload = read_model_file(path)
    cfg_file = file.parent / CONFIG_FILE
    from megabd3.config.load import load_config

    if not cfg_file.is_file():
        raise UserError(f"{cfg_file} is missing beside {file}; the checkpoint is incomplete")
    cfg = load_config(str(cfg_file))
    sd = payload["ema"] if payload.get("ema") is not None else payload["model"]
    return cfg, sd


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
