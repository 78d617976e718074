"""Read a Hugging Face directory in the released BD3-LM layout into (megabd3 Config, full state dict).

The full state dict loads into any TP/PP layout with megabd3.model.export.load_full_state_dict. Our own
exports carry the resolved megabd3 config in config.json["megabd3"]; for other directories (the
released checkpoints) the config is rebuilt from the released fields.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megabd3.errors import UserError
from megabd3.hf.mapping import from_released

WEIGHTS = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_config(path: Path) -> Optional[dict]:
    f = path / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def is_hf_dir(path: str | Path) -> bool:
    """A transformers model directory (config.json with a model_type), as opposed to a megabd3 run."""
    p = Path(path)
    conf = _read_config(p) if p.is_dir() else None
    return conf is not None and "model_type" in conf


def resolve_hf(path_or_id: str | Path) -> Optional[Path]:
    """The local directory of an HF checkpoint: a directory as given, or a Hub id (downloaded through the
    Hub cache, which works offline when it is cached). None when it is neither (a megabd3 checkpoint)."""
    p = Path(path_or_id)
    if p.exists():
        return p if is_hf_dir(p) else None
    # "runs/missing" is a mistyped local path, not a Hub id: its first component exists here
    if not _HUB_ID.match(str(path_or_id)) or Path(str(path_or_id).split("/")[0]).exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, no access: all one message
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path_or_id!r} is neither a local path nor a reachable Hub model ({first}); "
                        "pass a megabd3 run directory or a downloaded HF directory") from None


def _config_from_released(conf: dict) -> Any:
    from megabd3.config.schema import Config

    cfg = Config()
    m, d = cfg.model, cfg.diffusion
    m.name = "custom"
    m.hidden_size, m.num_layers, m.num_heads = int(conf["hidden_dim"]), int(conf["n_blocks"]), int(conf["n_heads"])
    m.cond_dim, m.dropout = int(conf.get("cond_dim", 129)), float(conf.get("dropout", 0.1))
    m.adaln, m.time_conditioning = bool(conf.get("adaln", True)), bool(conf.get("time_conditioning", False))
    m.mlp_ratio, m.rope_base, m.tie_embeddings = 4, 10000.0, False
    cfg.data.seq_len = int(conf.get("model_length", 1024))
    if conf.get("causal", False):
        d.objective, d.block_size = "ar", 1
    elif conf.get("cross_attn", True):
        d.objective, d.block_size = "bd3lm", int(conf.get("block_size", 1))
    else:
        d.objective = "sedd" if m.time_conditioning else "mdlm"
        d.block_size = cfg.data.seq_len
    d.clip_min = float(conf.get("sampling_eps_min", 1e-3))
    d.clip_max = float(conf.get("sampling_eps_max", 1.0))
    cfg.data.tokenizer = "gpt2"  # the released checkpoints use GPT-2 + an appended mask token
    return cfg


def _check_tokenizer(path: Path, vocab: int, cfg: Any) -> None:
    """Tokenizer files shipped in the directory must give the model's vocabulary (+ an appended mask)."""
    if not (path / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    from megabd3.data.tokenizers import _generic

    # trust_remote_code=False: AutoTokenizer reads config.json, whose auto_map would otherwise prompt
    hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    tok = _generic(str(path.resolve()), hf)
    if tok.model_vocab_size != vocab:
        raise UserError(f"{path}: the model vocabulary is {vocab} but the tokenizer files there give "
                        f"{tok.model_vocab_size} (incl. the mask token); the directory mixes two models")
    cfg.data.tokenizer = str(path.resolve())


def load_hf_dir(path: str | Path) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(megabd3 Config, full state dict) of an HF directory in the released BD3-LM layout."""
    from safetensors.torch import load_file

    from megabd3.config.load import config_from_dict

    path = Path(path)
    conf = _read_config(path)
    if conf is None:
        raise UserError(f"{path} has no readable config.json; it is not a Hugging Face model directory")
    from megabd3.hf.llama_import import LLAMA_MODEL_TYPES, load_llama_dir

    if conf.get("model_type") in LLAMA_MODEL_TYPES:  # AR -> BD3 adaptation of a pretrained causal LM
        return load_llama_dir(path, conf)
    if conf.get("model_type") != "bd3lm":
        raise UserError(f"{path}: model_type {conf.get('model_type')!r} is not supported; only bd3lm "
                        "(BD3-LM / MDLM / AR DiT checkpoints in the released layout) can be imported")
    if not (path / WEIGHTS).is_file():
        raise UserError(f"{path} has no {WEIGHTS}; export or download the safetensors weights")
    cfg = (config_from_dict(conf["megabd3"], source=str(path / "config.json"), training=False, validate=False)
           if isinstance(conf.get("megabd3"), dict) else _config_from_released(conf))
    if "sampling_eps_min" in conf:  # the clip interval stored with the weights (clip search may have moved it)
        cfg.diffusion.clip_min = float(conf["sampling_eps_min"])
        cfg.diffusion.clip_max = float(conf.get("sampling_eps_max", 1.0))
    sd = from_released(load_file(str(path / WEIGHTS)), int(conf["n_heads"]))
    vocab = int(conf["vocab_size"])
    emb = sd.get("embedding.weight")
    if emb is None or emb.shape[0] != vocab or emb.shape[1] != int(conf["hidden_dim"]):
        raise UserError(f"{path}: backbone.vocab_embed.embedding has shape "
                        f"{None if emb is None else list(emb.shape)}, config.json says "
                        f"[{vocab}, {conf['hidden_dim']}]; the directory is inconsistent")
    _check_tokenizer(path, vocab, cfg)
    return cfg, sd


def check_vocab(hf_vocab: int, model_vocab: int, source: str, tokenizer: str) -> None:
    """Fine-tuning from an HF directory: its vocabulary must be the run's tokenizer's (rows would be
    silently trimmed or zero-padded otherwise)."""
    if hf_vocab != model_vocab:
        raise UserError(f"{source} has vocabulary {hf_vocab} but the run's tokenizer {tokenizer} gives "
                        f"{model_vocab}; set data.tokenizer to the checkpoint's tokenizer")
