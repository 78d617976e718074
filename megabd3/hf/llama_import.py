"""Import a Hugging Face Llama-family causal LM directory (``LlamaForCausalLM``: Llama, SmolLM2) as megabd3's
``model.arch=llama`` backbone, for AR -> BD3 adaptation (issue 12).

``load_llama_dir`` returns (megabd3 Config, full state dict) like the BD3-LM importer, so the directory
works wherever a checkpoint does: ``training.init_from`` (fine-tuning), ``evaluate.py --checkpoint`` and
``sample.py --checkpoint``. The Config describes the pretrained model as it is: objective ``ar`` at its
own vocabulary; a BD3 adaptation run sets ``diffusion.objective=bd3lm`` (see
configs/adapt/smollm2_135m_bd3.json and the README's adaptation section for the choices made).

Only what the llama backbone computes exactly is accepted (one-line UserError otherwise): model_type
llama, SiLU MLP, no biases, plain RoPE, no sliding window, head_dim = hidden / heads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from megabd3.errors import UserError

LLAMA_MODEL_TYPES = ("llama",)


def _hf_config(path: Path, conf: dict) -> Any:
    from transformers import LlamaConfig

    if conf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act {conf['hidden_act']!r} is not supported; the llama backbone's MLP is SwiGLU (silu)")
    if conf.get("sliding_window") not in (None, 0) and conf.get("use_sliding_window", True):
        raise UserError(f"{path}: sliding-window attention ({conf['sliding_window']}) is not supported by the llama backbone")
    if int(conf.get("pretraining_tp", 1) or 1) != 1:
        raise UserError(f"{path}: pretraining_tp={conf['pretraining_tp']} is not supported; re-save the model with pretraining_tp=1")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in conf]
    if missing:
        raise UserError(f"{path / 'config.json'} lacks {', '.join(missing)}; it is not a complete LlamaForCausalLM config")
    return LlamaConfig.from_dict(conf)


def _state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    from safetensors.torch import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: Dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(path / f)))
        return out
    raise UserError(f"{path} has no model.safetensors (or index); save the model with safe_serialization=True")


def load_llama_dir(path: Path, conf: dict) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(megabd3 Config, full state dict) of a LlamaForCausalLM directory."""
    from megabd3.config.schema import Config
    from megabd3.model.hf_llama import LlamaShape, hf_to_megabd3, model_config_from_hf

    c = _hf_config(path, conf)
    model = model_config_from_hf(c)
    sd = hf_to_megabd3(_state_dict(path), LlamaShape.from_hf_config(c))
    vocab = int(c.vocab_size)
    if sd["embedding.weight"].shape[0] != vocab:
        raise UserError(f"{path}: embed_tokens has {sd['embedding.weight'].shape[0]} rows but config.json says "
                        f"vocab_size {vocab}; the directory is inconsistent")
    if isinstance(conf.get("megabd3"), dict):  # our own export (megabd3.hf.llama_export): the exact config
        from megabd3.config.load import config_from_dict

        cfg = config_from_dict(conf["megabd3"], source=str(path / "config.json"), training=False, validate=False)
        m = cfg.model
        effective = {"arch": m.arch, "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                     "num_query_groups": m.num_query_groups or m.num_heads,
                     "ffn_hidden_size": m.ffn_hidden_size or m.mlp_ratio * m.hidden_size, "norm_eps": m.norm_eps,
                     "rope_base": m.rope_base, "tie_embeddings": bool(m.tie_embeddings)}
        for k, have in effective.items():  # the HF fields describe the weights; an edited config.json must agree
            v = model[k]
            if (abs(have - v) > 1e-6 * abs(v)) if isinstance(v, float) else have != v:
                raise UserError(f"{path / 'config.json'}: megabd3.model.{k}={have!r} disagrees with the HF fields "
                                f"({v!r}); restore the exported config.json")
        if (path / "tokenizer_config.json").is_file():  # the exported tokenizer (with its mask), not the run's path
            from megabd3.hf.importer import _check_tokenizer

            _check_tokenizer(path, vocab, cfg)
        return cfg, sd
    cfg = Config()
    cfg.model.name = "custom"
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.diffusion.objective, cfg.diffusion.block_size = "ar", 1
    cfg.data.seq_len = min(int(getattr(c, "max_position_embeddings", 1024) or 1024), cfg.data.seq_len)
    if (path / "tokenizer_config.json").is_file():
        # a plain causal-LM tokenizer has no mask token, so megabd3 would append one (vocab + 1 rows):
        # hf.importer.check_vocab then names tools/add_mask_token.py as the fix
        cfg.data.tokenizer = str(path.resolve())
    return cfg, sd
