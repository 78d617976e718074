"""Checkpoints: layout, atomic commit, `latest`, keep-last-n, resume and inference loading.

Layout (docs/interfaces.md):

    <run_dir>/checkpoints/step_00001000/
        <DeepSpeed engine files>        model/optimizer/scheduler states, one set per rank (ZeRO shards)
        megabd3_state.pt                global: step, consumed samples, clip interval, config hash, layout
        megabd3_rank_00000.pt ...       per rank: every RNG state and the rank's EMA shard
        config.json                     the resolved config
        model.pt                        full gathered model + EMA state dicts (rank 0), any-layout inference;
                                        streamed one parameter at a time; fp32 master weights under bf16
        universal/                      (only after a resume at another data-parallel size) DeepSpeed
                                        universal checkpoint converted from the ZeRO shards, reused
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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

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


@contextmanager
def _zero3_full(p: torch.Tensor, zero3: bool) -> Iterator[torch.Tensor]:
    """`p`'s full (TP-local) tensor: a ZeRO-3 parameter is gathered alone, for this block only."""
    if zero3 and hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield p.data
    else:
        yield p.detach()


@contextmanager
def _master_full(p: torch.Tensor, zero3: bool) -> Iterator[torch.Tensor]:
    """`p`'s full fp32 master weights when DeepSpeed keeps them apart from a low-precision module copy
    (bf16: ZeRO-0's replicated master, ZeRO-3 partitions, ZeRO-1/2 / BF16_Optimizer fragments -- one
    parameter-sized all-reduce),
    else its module weights -- which are the master values in fp32 training."""
    from megabd3.training.ema import MASTER_ATTR

    kind = _master_kind(p)
    if kind == "linked":  # ZeRO-0 bf16
        yield getattr(p, MASTER_ATTR)
    elif kind == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        yield safe_get_full_fp32_param(p)
    else:
        with _zero3_full(p, zero3) as t:
            yield t


def _master_kind(p: torch.Tensor) -> str:
    """Where `p`'s fp32 master lives: "linked" (ZeRO-0, :func:`link_fp32_masters`), "deepspeed" (ZeRO-1/2/3
    optimizer state), or "" (none apart from the module: fp32 training, or a frozen parameter -- the
    optimizer keeps no master for it and `safe_get_full_fp32_param` returns None)."""
    from megabd3.training.ema import MASTER_ATTR

    if p.dtype == torch.float32 or not p.requires_grad:
        return ""
    if getattr(p, MASTER_ATTR, None) is not None:
        return "linked"
    if getattr(p, "_z3_optimizer", None) is not None or hasattr(p, "_hp_mapping"):
        return "deepspeed"
    return ""


def _master_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype :func:`_master_full` yields for `p`, known without materialising anything."""
    return torch.float32 if _master_kind(p) else p.dtype


Materialize = Callable[[str, torch.nn.Parameter], ContextManager[torch.Tensor]]


def gather_full_state_dict(module: torch.nn.Module, zero3: bool, all_ranks: bool = False,
                           materialize: Materialize | None = None,
                           dtype_of: Callable[[torch.nn.Parameter], torch.dtype] | None = None,
                           ) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) state dict of `module` on global rank 0 (None elsewhere; every rank with
    `all_ranks`); collective.

    Streams: one parameter at a time is materialised (a ZeRO-3 gather by default, or `materialize`'s
    tensor: fp32 master, EMA shadow), copied to the CPU on the receiving rank and released, so no
    device ever holds the full model. Tensor/pipeline shards go through the model package's
    `gather_full_state_dict` (per-tensor gather to the first rank of the model-parallel group).
    dtype_of: the dtype `materialize` yields per parameter (what travels between pipeline stages).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    mat: Materialize = materialize or (lambda _name, p: _master_full(p, zero3))
    if materialize is None:
        dtype_of = _master_dtype
    if _model_parallel_size() > 1:
        from megabd3.model.export import gather_full_state_dict as gather_mp

        sd = gather_mp(module, to_all=all_ranks, materialize=mat, dtype_of=dtype_of)
        return sd if (all_ranks or rank == 0) else None
    keep = all_ranks or rank == 0
    names = {id(p): n for n, p in module.named_parameters()}
    sd: dict[str, torch.Tensor] = {}
    # state_dict order (and buffers) as before streaming, so model.pt is byte-identical for the same weights
    for key, t in module.state_dict(keep_vars=True).items():
        if not torch.is_tensor(t):
            continue  # megatron adds None `_extra_state` entries
        ctx = mat(names[id(t)], t) if id(t) in names else nullcontext(t.detach())
        with ctx as full:
            if keep:
                sd[key] = full.detach().to("cpu", copy=True)
    return sd if keep else None


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
    # streamed one parameter at a time; fp32 master weights under bf16; the EMA straight from its shadow
    model_sd = gather_full_state_dict(module, zero3)
    ema_sd = None
    if ema is not None:
        def ema_tensor(_name: str, p: torch.nn.Parameter) -> ContextManager[torch.Tensor]:
            return ema.full_shadow(p) if ema.tracks(p) else _master_full(p, zero3)

        ema_sd = gather_full_state_dict(module, zero3, materialize=ema_tensor,
                                        dtype_of=lambda p: torch.float32 if ema.tracks(p) else _master_dtype(p))
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


UNIVERSAL = "universal"  # DeepSpeed universal checkpoint, converted on demand inside a step directory


def reshard_problem(saved: dict, layout: dict) -> str | None:
    """Why a checkpoint written with layout `saved` cannot be resumed with `layout` (None: it can,
    possibly at another data-parallel size). Only the data-parallel size may change, at TP = PP = 1."""
    if not saved:
        return None
    changed = {k for k in saved.keys() & layout.keys() if saved[k] != layout[k]}  # keys both know
    if not changed:
        return None
    for key in ("tp", "pp", "zero"):
        if key in changed:
            return (f"{key} changed ({saved.get(key)} -> {layout.get(key)}); resume with the checkpoint's "
                    f"parallel.tensor_parallel/pipeline_parallel/zero_stage, or fine-tune from it with training.init_from")
    if "global_batch" in changed:
        return (f"the global batch changed ({saved['global_batch']} -> {layout['global_batch']} sequences per step); "
                "set training.global_batch_size to the checkpoint's so the step count and data order carry over")
    if saved.get("tp", 1) * saved.get("pp", 1) != 1:
        return ("the data-parallel size can change only without tensor/pipeline parallelism; resume with "
                f"world size {saved.get('world_size')}, or fine-tune from it with training.init_from")
    return None


def universal_command(step_dir: Path, out: Path) -> list[str]:
    """DeepSpeed's offline ZeRO -> universal conversion of `step_dir` into `out` (also what a user runs
    by hand when the automatic conversion fails). Extraction/merging are CPU-bound: up to 8 workers."""
    import sys

    workers = str(max(1, min(8, os.cpu_count() or 1)))
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
            "--output_folder", str(out), "--num_extract_workers", workers, "--num_merge_workers", workers,
            "--inject_missing_state"]


def _convert_universal(step_dir: Path, out: Path) -> None:
    """Run the conversion into a temp directory and rename it into place; raises on failure (the temp
    directory is removed, so a retry starts clean)."""
    import subprocess

    tmp = step_dir / f"{TMP_PREFIX}{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        proc = subprocess.run(universal_command(step_dir, tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}: {proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _universal_dir(engine, step_dir: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(load_dir, tag) of a DeepSpeed universal checkpoint of `step_dir`: ZeRO-1/2/3 optimizer shards
    merged per parameter, loadable at any data-parallel size. Converted once by rank 0 (a subprocess:
    `deepspeed.checkpoint.ds_to_universal`) and kept inside the step directory; collective. Rank 0
    always broadcasts the outcome -- whatever goes wrong there (even KeyboardInterrupt) -- so the other
    ranks raise the same error instead of waiting in the broadcast until the process-group timeout."""
    out = step_dir / UNIVERSAL
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = ""
    caught: BaseException | None = None
    if rank == 0 and not out.is_dir():
        try:
            _convert_universal(step_dir, out)
        except BaseException as e:  # noqa: BLE001 - reported to every rank below, then re-raised here
            error, caught = f"{type(e).__name__}: {e}", e
    flag = [error]
    if dist.is_initialized():
        dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        cmd = " ".join(universal_command(step_dir, step_dir / UNIVERSAL))
        msg = (f"converting {step_dir} for a new data-parallel size failed (ds_to_universal): {flag[0][-2000:]}\n"
               f"run the conversion offline ({cmd}) and resume again, or resume with the checkpoint's world size")
        if caught is not None and not isinstance(caught, Exception):
            raise caught  # KeyboardInterrupt/SystemExit stay what they are (after the others were told)
        raise UserError(msg) from caught
    return str(step_dir), UNIVERSAL


@contextmanager
def _loading_universal(engine, on: bool) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """DeepSpeed reads `checkpoint.load_universal` from its config at load time; switch it for this load
    only (the run's config stays as derived)."""
    cfg = engine._config
    old = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = on
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = old


def load_checkpoint(engine, ema, step_dir: Path, layout: dict) -> tuple[TrainState, dict]:  # type: ignore[no-untyped-def]
    """Restore engine (+optimizer, LR scheduler) and EMA from `step_dir`; return (state, rank_state).

    At another data-parallel size (TP = PP = 1, same ZeRO stage and global batch): ZeRO-1/2/3 load a
    universal checkpoint converted from the shards (ZeRO-0 state is replicated and loads as is), the EMA
    comes from `model.pt`'s full EMA weights, and rank r restores the RNG state of old rank
    min(r, old world - 1). The loss curve continues within fp tolerance, not bit for bit: gradient
    all-reduce order differs, and any draw from the global RNGs (not the per-sample noise, which is
    seeded by global sample index) differs from the uninterrupted run.
    """
    state = load_global_state(step_dir)
    problem = reshard_problem(state.layout, layout)
    if problem:
        raise UserError(f"checkpoint {step_dir} was written with layout {state.layout} but this run has {layout}: "
                        f"{problem}")
    reshard = bool(state.layout) and state.layout.get("world_size") != layout.get("world_size")
    rank = dist.get_rank() if dist.is_initialized() else 0
    src = min(rank, int(state.layout.get("world_size", 1)) - 1) if reshard else rank
    rank_file = step_dir / rank_state_name(src)
    if not rank_file.is_file():
        raise UserError(f"{rank_file} is missing: the checkpoint is incomplete or was written by fewer ranks")
    load_dir, tag = str(step_dir.parent), step_dir.name
    universal = reshard and engine.zero_optimization_stage() > 0
    if universal:
        load_dir, tag = _universal_dir(engine, step_dir)
    with _loading_universal(engine, universal):
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load the engine state from {step_dir}; the checkpoint is damaged, "
                        f"point checkpoints/latest at an older step_* directory")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    if ema is not None and reshard:
        _, payload = read_model_file(step_dir)
        if payload.get("ema") is not None:
            ema.load_full(engine.module, payload["ema"], payload.get("ema_num_updates", 0))
    elif ema is not None and rank_state.get("ema") is not None:
        ema.load_state_dict(rank_state["ema"])
    state.layout = dict(layout)  # later saves record the layout they were written with
    return state, rank_state


def read_model_file(path: str | Path) -> tuple[Path, dict]:
    """Locate and read `model.pt` from a run dir, checkpoints dir, step dir or the file itself.
    A Hugging Face directory (or Hub id) in the released BD3-LM layout gives the same payload keys."""
    # --- issue 12: HF checkpoints (megabd3.hf) -------------------------------------------------------
    from megabd3.hf.importer import load_hf_dir, resolve_hf

    hf_dir = resolve_hf(path)
    if hf_dir is not None:
        cfg, sd = load_hf_dir(hf_dir)
        return hf_dir / "model.safetensors", {"model": sd, "ema": None, "ema_num_updates": 0, "step": 0,
                                              "config": None, "hf_config": cfg}
    # --- end issue 12 ---------------------------------------------------------------------------------
    p = Path(path)
    file = p if p.is_file() else resolve_checkpoint(p) / MODEL_FILE
    if not file.is_file():
        raise UserError(f"{file} not found: training.init_from/--checkpoint must name a megabd3 run directory "
                        f"or checkpoints/step_* directory")
    # mmap: every rank of a node maps the same file and shares the page cache instead of holding its own
    # copy in host RAM; only the tensors (slices) a rank copies out are read from disk
    return file, torch.load(file, map_location="cpu", mmap=True, weights_only=True)


def load_for_inference(path: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(Config, full state dict of the EMA weights -- or the raw weights when no EMA was kept)."""
    file, payload = read_model_file(path)
    if payload.get("hf_config") is not None:  # issue 12: an HF directory carries its own config
        return payload["hf_config"], payload["model"]
    cfg_file = file.parent / CONFIG_FILE
    from megabd3.config.load import load_config

    if not cfg_file.is_file():
        raise UserError(f"{cfg_file} is missing beside {file}; the checkpoint is incomplete")
    cfg = load_config(str(cfg_file))
    sd = payload["ema"] if payload.get("ema") is not None else payload["model"]
    return cfg, sd


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
