"""Build the real collaborators from a config and run training (what launchers/pretrain.py calls).

Order matters for exact resume: distributed init -> seed -> model -> (init_from weights) -> engine ->
EMA -> objective -> resume (engine, EMA, state) -> data loader at consumed_samples -> restore RNGs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megabd3.errors import UserError
from megabd3.training import checkpoint as ckpt
from megabd3.training.ema import EMA, link_fp32_masters
from megabd3.training.engine import Stepper, build_engine
from megabd3.training.logging import RunLogger, banner, config_diff
from megabd3.training.loop import Trainer, TrainerParts
from megabd3.training.rng import seed_everything

# Keys that may change between a checkpoint and its resumption (schedule length, intervals, logging).
RESUMABLE_CHANGES = ("training.steps", "training.eval_interval", "training.log_interval", "checkpoint.",
                     "logging.", "eval.", "sampling.", "parallel.world_size")


def _to_device(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    for b in batches:
        yield {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}


def estimate_flops_per_sample(cfg: Any, n_params: int) -> float:
    """Training FLOPs per sequence: 6 x params x tokens through the network (2L for the BD3 [x_t; x0]
    input, L otherwise) + dense attention score/value matmuls (executed FLOPs; the mask skips none)."""
    L = cfg.data.seq_len
    S = 2 * L if cfg.diffusion.objective == "bd3lm" else L
    attn = 2 * 2 * S * S * cfg.model.hidden_size * cfg.model.num_layers
    return 3.0 * (2.0 * n_params * S + attn)


# model fields an HF directory fixes; shapes alone would not catch rope_base or norm_eps
_HF_FIXED_MODEL_FIELDS = ("arch", "num_layers", "hidden_size", "num_heads", "num_query_groups", "ffn_hidden_size",
                          "norm_eps", "rope_base", "tie_embeddings", "cond_dim", "adaln", "time_conditioning")


def check_model_matches(hf_cfg: Any, cfg: Any, source: str) -> None:
    """Fine-tuning from an HF directory: the run's model section must describe the directory's model."""
    import math

    for key in _HF_FIXED_MODEL_FIELDS:
        want, have = getattr(hf_cfg.model, key), getattr(cfg.model, key)
        if key in ("num_query_groups", "ffn_hidden_size") and hf_cfg.model.arch == "dit":
            continue
        same = math.isclose(want, have, rel_tol=1e-6) if isinstance(want, float) else want == have
        if not same:
            raise UserError(f"model.{key}={have!r} but {source} has {want!r}; set model.{key}={want!r} "
                            "(the run's model section must describe the checkpoint)")


def load_init_weights(module: torch.nn.Module, init_from: str) -> dict:
    """Fine-tune start: load the full `model.pt` weights of `init_from` into this rank's shards of
    `module` (any TP/PP layout, via megabd3.model.export); returns the payload (with the EMA weights)."""
    from megabd3.model.export import load_full_state_dict

    from megabd3.hf.importer import check_vocab, mask_hint, resolve_hf

    if not Path(init_from).exists() and resolve_hf(init_from) is None:
        raise UserError(f"training.init_from={init_from!r} does not exist; point it at a pretraining run directory, "
                        f"its checkpoints/step_* directory or a Hugging Face BD3-LM directory")
    _, payload = ckpt.read_model_file(init_from)
    if payload.get("hf_config") is not None:  # issue 12: HF rows are not padded; a mismatch is another tokenizer
        chunk = module[0] if isinstance(module, (list, tuple)) else module
        check_model_matches(payload["hf_config"], chunk.cfg, init_from)
        rows = int(payload["model"]["embedding.weight"].shape[0])
        if int(chunk.vocab_size) == rows + 1:
            raise UserError(mask_hint(init_from, str(chunk.cfg.data.tokenizer), rows))
        check_vocab(int(payload["model"]["embedding.weight"].shape[0]), int(chunk.vocab_size), init_from,
                    str(chunk.cfg.data.tokenizer))
    load_full_state_dict(module, payload["model"], strict=True)
    return payload


@torch.no_grad()
def restore_fp32_masters(engine, full: dict) -> int:  # type: ignore[no-untyped-def]
    """Fine-tune under bf16: the module got `model.pt`'s fp32 master weights rounded to bf16, and DeepSpeed
    built its fp32 master from those bf16 copies. Write the exact fp32 values into the master (this
    rank's slice only: ZeRO-0's linked master, ZeRO-1/2 fragment, ZeRO-3 partition; no communication).
    Returns how many parameters were set."""
    from deepspeed.utils import safe_set_full_fp32_param

    from megabd3.model.export import local_from_full, named_global_params
    from megabd3.training.ema import MASTER_ATTR

    n = 0
    for name, chunk, p in named_global_params(engine.module):
        kind = ckpt._master_kind(p)
        if not kind or name not in full:
            continue
        local = local_from_full(name, chunk, p, full[name])
        if kind == "linked":
            getattr(p, MASTER_ATTR).copy_(local.reshape(getattr(p, MASTER_ATTR).shape))
        else:
            safe_set_full_fp32_param(p, local)
        n += 1
    return n


@torch.no_grad()
def carry_ema(engine, ema: EMA, ema_sd: dict, ema_updates: int) -> None:  # type: ignore[no-untyped-def]
    """Set the EMA shadow to the pretraining EMA weights `ema_sd` (full state dict), in this rank's
    storage layout (ZeRO-3 partition, fp32 fragment, TP shard), without touching the live weights and
    without gathering anything (the old ZeRO-3 path gathered the whole model on every rank)."""
    ema.load_full(engine.module, ema_sd, ema_updates)


def _model_parallel_mpu(layout: Any) -> Any:
    """The megatron mpu adapter when the model is tensor/pipeline parallel (ZeRO groups are then the
    data-parallel groups), else None."""
    if layout.tp * layout.pp == 1:
        return None
    from megabd3.parallel.mpu import MegatronMPU

    return MegatronMPU()


def preflight(cfg: Any):  # type: ignore[no-untyped-def]
    """Checks that need no process group, run before any heavy start-up so bad paths fail in seconds:
    the datasets exist and were tokenized with `data.tokenizer` (manifest), `init_from` exists.
    Returns the tokenizer."""
    from megabd3.data.manifest import check_manifest
    from megabd3.data.tokenizers import get_tokenizer

    tok = get_tokenizer(cfg.data.tokenizer)
    for split in ("train", "valid"):
        prefix = getattr(cfg.data, f"{split}_prefix")
        if split == "train" or prefix:
            if not prefix or not Path(prefix + ".idx").is_file():
                raise UserError(f"data.{split}_prefix={prefix!r}: {prefix}.idx not found; run tools/preprocess_data.py "
                                f"or fix the path in the config")
            check_manifest(prefix, tok, check_max_id_samples=cfg.data.check_max_id_samples, seed=cfg.training.seed)
    if cfg.training.init_from:
        from megabd3.hf.importer import resolve_hf

        init = Path(cfg.training.init_from)
        if resolve_hf(cfg.training.init_from) is not None:  # an HF directory (or cached Hub id)
            return tok
        if not init.exists():
            raise UserError(f"training.init_from={cfg.training.init_from!r} does not exist; point it at a pretraining "
                            f"run directory or its checkpoints/step_* directory")
        ckpt.resolve_checkpoint(init)  # a directory without a checkpoint fails here, with its own message
    return tok


def run_training(cfg: Any) -> dict:
    """Train according to `cfg`; returns a summary dict (rank 0 meaningful)."""
    from megabd3.config.deepspeed import derive_deepspeed_config
    from megabd3.config.errors import raise_if
    from megabd3.config.load import config_hash, config_to_dict, save_resolved
    from megabd3.config.schema import Config
    from megabd3.config.validate import validate
    from megabd3.data.loader import build_loader
    from megabd3.diffusion.objectives import build_objective
    from megabd3.parallel.init import init_distributed

    tok = preflight(cfg)
    layout = init_distributed(cfg)
    raise_if(validate(cfg, layout.world_size), "config")
    run_dir = Path(cfg.training.run_dir)
    # before the model, the engine and save_resolved: a refused resume (say, a changed model width, which
    # would otherwise die inside DeepSpeed's load) costs seconds and leaves the run directory untouched
    from megabd3.training.resume_check import check_resume_compatible

    found = ckpt.read_latest(run_dir) if cfg.checkpoint.resume else None
    check_resume_compatible(found, cfg)
    vocab = tok.model_vocab_size
    seed_everything(cfg.training.seed)
    from megabd3.model.transformer import build_model

    from megatron.core import parallel_state as ps

    from megabd3.training.zero_init import partitioned_init

    # ZeRO-3: build partitioned (deepspeed.zero.Init), same weights as an unpartitioned build
    with partitioned_init(cfg, derive_deepspeed_config(cfg, layout.dp), mpu=_model_parallel_mpu(layout)):
        model = build_model(cfg, vocab, pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
                            post_process=ps.is_pipeline_last_stage(ignore_virtual=True))
    init = load_init_weights(model, cfg.training.init_from) if cfg.training.init_from else None
    ds_config = derive_deepspeed_config(cfg, layout.dp)
    n_micro = int(ds_config["gradient_accumulation_steps"])
    if layout.pp > 1:  # megatron's schedule accumulates the micro-batches; DeepSpeed sees one per step
        ds_config.update(gradient_accumulation_steps=1,
                         train_batch_size=int(ds_config["train_micro_batch_size_per_gpu"]) * layout.dp)
    mpu = None
    if layout.tp * layout.pp > 1:
        from megabd3.parallel.mpu import MegatronMPU

        mpu = MegatronMPU()
    engine = build_engine(model, cfg, ds_config, layout.device, mpu=mpu)
    link_fp32_masters(engine)  # bf16 ZeRO-0: the EMA and model.pt follow the fp32 master weights
    if init is not None:  # bf16: the master from model.pt's fp32 values, not from their bf16 rounding
        restore_fp32_masters(engine, init["model"])
    ema = EMA(list(engine.module.parameters()), cfg.training.ema) if cfg.training.ema > 0 else None
    if ema is not None and init is not None and init.get("ema") is not None:  # fine-tune: continue the EMA
        carry_ema(engine, ema, init["ema"], init.get("ema_num_updates", 0))
    objective = build_objective(cfg, tok.mask_id, vocab)
    from megabd3.training.pipeline_step import run_pipeline

    tp_rank = ps.get_tensor_model_parallel_rank()
    stepper = Stepper(engine, objective, seed=cfg.training.seed, micro_batch_size=cfg.training.micro_batch_size,
                      grad_accum=n_micro, dp_rank=layout.dp_rank, dp_size=layout.dp,
                      device=layout.device, nan_policy=cfg.training.nan_policy, reports_loss=tp_rank == 0,
                      pipeline=run_pipeline if layout.pp > 1 else None)

    def make_loader(consumed: int) -> Iterator[dict]:
        return _to_device(iter(build_loader(cfg, "train", layout.dp_rank, layout.dp, consumed)), layout.device)

    def evaluate(step: int) -> dict | None:
        if not cfg.data.valid_prefix:
            return None
        from megabd3.eval.nelbo import eval_seed, evaluate_nelbo
        from megabd3.training.pipeline_step import PipelineModelFn

        engine.eval()
        # PP: megatron's forward-only schedule; the metrics and clip choice come from the last stage
        model_fn = engine if layout.pp == 1 else PipelineModelFn(engine.module)
        ctx = ema.applied() if (ema is not None and cfg.eval.use_ema) else torch.no_grad()
        # per data-parallel rank: one seed everywhere would give different sequences identical t draws
        gen = torch.Generator(device=layout.device).manual_seed(eval_seed(cfg.training.seed, layout.dp_rank))
        with ctx:
            batches = _to_device(iter(build_loader(cfg, "valid", layout.dp_rank, layout.dp, 0)), layout.device)
            # var_nelbo_train: the paper's Var. NELBO, under the live training schedule and interval
            out = evaluate_nelbo(cfg, model_fn, batches, mask_id=tok.mask_id, vocab_size=vocab, generator=gen,
                                 var_nelbo=cfg.eval.var_nelbo, train_objective=objective,
                                 train_interval=objective.train_interval, max_batches=cfg.eval.max_batches)
            if cfg.diffusion.clip_search.enabled:
                from megabd3.diffusion.clip_search import candidate_intervals, search_clip_interval
                from megabd3.config.derived import effective_block_size

                cs = cfg.diffusion.clip_search
                cands = candidate_intervals(cs.widths, cs.delta, cfg.diffusion.sampling_eps, effective_block_size(cfg))
                vb = _to_device(iter(build_loader(cfg, "valid", layout.dp_rank, layout.dp, 0)), layout.device)
                res = search_clip_interval(objective, model_fn, vb, gen, candidates=cands, num_batches=cs.num_batches,
                                           fix=cs.fix)
                out.update(res.as_log())
                out["clip_interval"] = tuple(objective.train_interval)
        engine.train()
        return out

    layout_d = {"world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "zero": cfg.parallel.zero_stage,
                "global_batch": cfg.training.micro_batch_size * n_micro * layout.dp}  # checked on DP-resharding resume
    chash = config_hash(cfg, ignore=[k.rstrip(".") for k in RESUMABLE_CHANGES])
    state = ckpt.TrainState(clip_interval=tuple(objective.train_interval), config_hash=chash, layout=layout_d)
    if layout.rank == 0:
        ckpt.remove_partial(ckpt.checkpoints_dir(run_dir))
        save_resolved(cfg, run_dir)
    dist.barrier()
    rng, last = None, None
    if found is not None:
        state, rank_state = ckpt.load_checkpoint(engine, ema, found, layout_d)
        # the hash only guards checkpoints without a config.json (check_resume_compatible did the rest,
        # and it allows cosmetic changes -- description, a moved run_dir -- that change the hash)
        if not (found / ckpt.CONFIG_FILE).is_file() and state.config_hash and state.config_hash != chash:
            raise UserError(f"{found} was trained with a different config (hash {state.config_hash} != {chash}); "
                            f"use a new training.run_dir, or set checkpoint.resume=false to start over")
        objective.set_train_interval(state.clip_interval)
        rng, last = rank_state["rng"], found
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    parts = TrainerParts(engine=engine, stepper=stepper, ema=ema, make_loader=make_loader, evaluate=evaluate,
                         write_config=lambda d: save_resolved(cfg, d), config_dict=config_to_dict(cfg),
                         layout=layout_d, tokens_per_sample=cfg.data.seq_len,
                         flops_per_sample=estimate_flops_per_sample(cfg, n_params * layout.tp * layout.pp),
                         after_step=lambda step, _s: objective.set_progress(step / cfg.training.steps))
    logger = RunLogger(cfg, run_dir, layout.rank, state.step, cfg.training.steps)
    logger.write(banner("megabd3 pretrain", {
        "world": {"ranks": layout.world_size, "tp x pp x dp": f"{layout.tp} x {layout.pp} x {layout.dp}",
                  "zero stage": cfg.parallel.zero_stage, "device": str(layout.device), "backend": layout.backend,
                  "ds batch": f"{ds_config.get('train_batch_size')} = {ds_config.get('train_micro_batch_size_per_gpu')}"
                              f" x {ds_config.get('gradient_accumulation_steps')} x {layout.dp}"},
        "model": {"parameters (local stage)": f"{n_params:,}", "vocab": vocab},
        "data": {"train": cfg.data.train_prefix, "valid": cfg.data.valid_prefix, "seq_len": cfg.data.seq_len,
                 "tokens/step": parts.tokens_per_sample * stepper.mb * stepper.ga * layout.dp},
        "resume": {"from": str(found) if found else "(fresh start)", "step": state.step,
                   "consumed samples": state.consumed_samples},
        "config diff vs defaults": {k: f"{a!r} -> {b!r}" for k, (a, b) in config_diff(cfg, Config()).items()},
    }))
    trainer = Trainer(cfg, parts, state, rank=layout.rank, world_size=layout.world_size, dp_size=layout.dp,
                      last_checkpoint=last)
    try:
        result = trainer.train(logger, rng_to_restore=rng)
    finally:
        logger.close()
    summary = {"step": result.step, "stopped_by": result.stopped_by, "last_eval": result.last_eval,
               "checkpoint": str(trainer.last_checkpoint)}
    if layout.rank == 0 and result.last_eval:
        print(f"final validation: nelbo {result.last_eval['nelbo']:.4f} | ppl {result.last_eval['ppl']:.2f}", flush=True)
    return summary
