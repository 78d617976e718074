"""Load a trained model for sampling/evaluation from any checkpoint, whatever its parallel layout.

Training writes ``model.pt`` (the full gathered model + EMA state dicts) into every
``checkpoints/step_*`` directory, so inference never needs the layout it was trained with: the config
is re-read from the checkpoint's ``config.json`` (plus ``--set`` overrides), the parallel section is
forced to a single process, and the model is rebuilt at TP = PP = 1.

Vocabulary: the checkpoint's embedding rows must equal the tokenizer's model vocabulary padded the
way the run padded it (``make_vocab_size_divisible_by * tensor_parallel``); otherwise the checkpoint
was trained with a different tokenizer and we refuse with one line. Rows are then re-padded to the
TP = 1 padding (padded rows are never predicted).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from megabd3.errors import UserError


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    mult = max(1, divisible_by) * max(1, tp)
    return -(-vocab // mult) * mult


def embedding_rows(state_dict: Dict[str, torch.Tensor]) -> Optional[Tuple[str, int]]:
    """(key, rows) of the input embedding table in a full state dict (None if not found)."""
    cands = [(k, v.shape[0]) for k, v in state_dict.items()
             if torch.is_tensor(v) and v.dim() == 2 and "embed" in k.lower() and "position" not in k.lower()]
    return max(cands, key=lambda kv: kv[1]) if cands else None


def check_vocab(cfg: Any, state_dict: Dict[str, torch.Tensor], tokenizer: Any, source: str) -> None:
    found = embedding_rows(state_dict)
    if found is None:
        return
    key, rows = found
    want = padded_vocab(tokenizer.model_vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_parallel)
    appended = getattr(tokenizer, "vocab_size", None) == getattr(tokenizer, "mask_id", -1)  # mask id after the vocab
    if rows != want and rows != tokenizer.model_vocab_size and appended and rows == tokenizer.vocab_size:
        from megabd3.hf.importer import mask_hint  # a causal LM's tokenizer: the appended mask has no row

        raise UserError(mask_hint(source, tokenizer.name, rows))
    if rows != want and rows != tokenizer.model_vocab_size:
        raise UserError(
            f"{source}: {key} has {rows} rows but tokenizer {tokenizer.name!r} needs {tokenizer.model_vocab_size} "
            f"(padded {want}); the checkpoint was trained with another tokenizer: use its data.tokenizer"
        )


def refit_rows(state_dict: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], vocab: int) -> Dict[str, torch.Tensor]:
    """Truncate/zero-pad vocabulary rows (dim 0, both >= vocab) to the model built here."""
    out = dict(state_dict)
    for k, v in state_dict.items():
        t = target.get(k)
        if t is None or not torch.is_tensor(v) or v.shape == t.shape or v.shape[1:] != t.shape[1:]:
            continue
        if min(v.shape[0], t.shape[0]) >= vocab:
            fitted = torch.zeros_like(t)
            n = min(v.shape[0], t.shape[0])
            fitted[:n] = v[:n]
            out[k] = fitted
    return out


def hf_checkpoint(checkpoint: str, overrides: Sequence[str] = ()) -> Optional[Tuple[Any, Dict[str, torch.Tensor], Path]]:
    """(Config with overrides, full state dict, directory) when ``checkpoint`` is a Hugging Face directory (or
    Hub id) in the released BD3-LM layout; None for a megabd3 checkpoint."""
    from megabd3.hf.importer import load_hf_dir, resolve_hf

    directory = resolve_hf(checkpoint)
    if directory is None:
        return None
    cfg, sd = load_hf_dir(directory)
    if overrides:
        from megabd3.config.load import config_from_dict, config_to_dict

        cfg = config_from_dict(config_to_dict(cfg), source=str(directory / "config.json"), overrides=list(overrides))
    return cfg, sd, directory


def output_location(checkpoint: str, overrides: Sequence[str] = ()) -> Tuple[Path, str]:
    """(directory results go under, tag naming them): the run directory and the step directory's name for a
    megabd3 checkpoint; ``runs/hf_<name>`` and "hf" for a Hugging Face directory (which may be a read-only
    Hub cache)."""
    from megabd3.hf.importer import resolve_hf

    directory = resolve_hf(checkpoint)
    if directory is not None:
        return Path("runs") / f"hf_{directory.name}", "hf"
    _, model_file = inference_config(checkpoint, overrides)
    return model_file.parent.parent.parent, model_file.parent.name


def inference_config(checkpoint: str, overrides: Sequence[str] = ()) -> Tuple[Any, Path]:
    """(Config from the checkpoint's config.json with overrides, path of model.pt -- or of
    model.safetensors for a Hugging Face directory)."""
    from megabd3.config.load import load_config
    from megabd3.training.checkpoint import CONFIG_FILE, MODEL_FILE, resolve_checkpoint

    hf = hf_checkpoint(checkpoint, overrides)
    if hf is not None:
        return hf[0], hf[2] / "model.safetensors"
    p = Path(checkpoint)
    if not p.exists():
        raise UserError(f"checkpoint {checkpoint} does not exist: pass a run directory, its checkpoints/ or a step_* directory")
    step_dir = p.parent if p.is_file() else resolve_checkpoint(p)
    cfg_file, model_file = step_dir / CONFIG_FILE, step_dir / MODEL_FILE
    for f in (cfg_file, model_file):
        if not f.is_file():
            raise UserError(f"{f} is missing: the checkpoint is incomplete (pick another checkpoints/step_* directory)")
    return load_config(str(cfg_file), list(overrides)), model_file


def single_process(cfg: Any) -> Any:
    """A copy of ``cfg`` for one process: TP = PP = 1, no ZeRO (the layout of model.pt does not matter)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor_parallel = cfg.parallel.pipeline_parallel = cfg.parallel.virtual_pipeline = 1
    cfg.parallel.zero_stage = 0
    cfg.parallel.world_size = 1
    return cfg


@dataclass
class LoadedModel:
    """A model loaded for inference and what was actually loaded into it."""

    cfg: Any
    model: Any
    tokenizer: Any
    weights: str  # "ema" or "raw": the state dict that went into the model
    ema_requested: bool
    step: int = 0
    #: the training interval saved with the checkpoint (TrainState.clip_interval), None if unknown
    clip_interval: Optional[Tuple[float, float]] = None


def select_weights(payload: Dict[str, Any], use_ema: bool) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, "ema" | "raw") from a model.pt payload; raw when EMA is off or was never kept."""
    if use_ema and payload.get("ema") is not None:
        return payload["ema"], "ema"
    return payload["model"], "raw"


def saved_clip_interval(step_dir: Path) -> Optional[Tuple[float, float]]:
    """The clip interval training was using at this checkpoint (None without a train-state file)."""
    from megabd3.training.checkpoint import GLOBAL_STATE

    f = step_dir / GLOBAL_STATE
    if not f.is_file():
        return None
    interval = torch.load(f, map_location="cpu", weights_only=False).get("clip_interval")
    return None if interval is None else (float(interval[0]), float(interval[1]))


def load_checkpoint_model(
    checkpoint: str,
    overrides: Sequence[str] = (),
    tokenizer_name: Optional[str] = None,
    use_ema: Optional[bool] = None,
    device: str = "cpu",
) -> LoadedModel:
    """The model of a checkpoint in eval mode on ``device``, with what was loaded (weights, interval)."""
    from megabd3.data.tokenizers import get_tokenizer

    hf = hf_checkpoint(checkpoint, overrides)
    if hf is not None:  # a Hugging Face export holds one set of weights (EMA or live, chosen at export)
        cfg, sd, directory = hf
        model_file, weights, payload, use_ema = directory / "model.safetensors", "hf", {}, bool(use_ema)
        tokenizer = get_tokenizer(tokenizer_name or cfg.data.tokenizer)
    else:
        cfg, model_file = inference_config(checkpoint, overrides)
        tokenizer = get_tokenizer(tokenizer_name or cfg.data.tokenizer)
        payload = torch.load(model_file, map_location="cpu", weights_only=False)
        use_ema = bool(cfg.eval.use_ema if use_ema is None else use_ema)
        sd, weights = select_weights(payload, use_ema)
    check_vocab(cfg, sd, tokenizer, str(model_file))
    run_cfg = single_process(cfg)
    model = build_inference_model(run_cfg, tokenizer.model_vocab_size, device)
    sd = refit_rows(sd, model.state_dict(), tokenizer.model_vocab_size)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"{model_file} does not match model config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        f"the checkpoint's config.json and weights disagree")
    return LoadedModel(cfg=run_cfg, model=model.eval(), tokenizer=tokenizer, weights=weights, ema_requested=use_ema,
                       step=int(payload.get("step") or 0), clip_interval=saved_clip_interval(model_file.parent))


def load_model(
    checkpoint: str,
    overrides: Sequence[str] = (),
    tokenizer_name: Optional[str] = None,
    use_ema: Optional[bool] = None,
    device: str = "cpu",
) -> Tuple[Any, Any, Any]:
    """(cfg, model in eval mode on ``device``, tokenizer) from a checkpoint."""
    m = load_checkpoint_model(checkpoint, overrides, tokenizer_name, use_ema, device)
    return m.cfg, m.model, m.tokenizer


def build_inference_model(cfg: Any, vocab_size: int, device: str) -> Any:
    """The megatron model at TP = PP = 1 (initialises a one-process group when none exists)."""
    from megabd3.model.transformer import build_model

    try:
        from megabd3.parallel.init import init_distributed

        init_distributed(cfg)
    except ImportError:
        pass
    return build_model(cfg, vocab_size).to(device)
