"""Write a ``model.arch=llama`` checkpoint (e.g. an AR -> BD3 adapted SmolLM2) as a ``LlamaForCausalLM`` directory.

The weights go back into the layout they were imported from (megabd3/model/hf_llama.py), so
``transformers.AutoModelForCausalLM`` loads the directory strictly with no remote code. What transformers
computes on it is the causal LM forward: for an ``ar`` run that is the model; for a BD3/MDLM-adapted
run it is only the trunk, since the denoiser's 2L block-diffusion input and shifted logits live in
megabd3. config.json therefore also carries the resolved megabd3 config under ``"megabd3"``, and
``megabd3.hf.llama_import`` restores objective, block size and ``model.shift_logits`` from it, so
``--checkpoint`` / ``training.init_from`` on the directory give back the same model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megabd3.errors import UserError


def llama_hf_config(cfg: Any, vocab: int, tokenizer: Any = None) -> Dict[str, Any]:
    """The ``LlamaConfig`` dict of a megabd3 llama config (plus the megabd3 block)."""
    from dataclasses import asdict

    from transformers import LlamaConfig

    m = cfg.model
    hf = LlamaConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size or m.mlp_ratio * m.hidden_size,
                     num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                     num_key_value_heads=m.num_query_groups or m.num_heads, rms_norm_eps=m.norm_eps,
                     max_position_embeddings=max(int(cfg.data.seq_len), 2048), tie_word_embeddings=bool(m.tie_embeddings),
                     hidden_act="silu", attention_bias=False, mlp_bias=False,
                     rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_base)})
    conf = hf.to_dict()
    # transformers 4.x reads RoPE's base from a top-level rope_theta (5.x from rope_parameters); without it a
    # 4.x install would silently use 10000
    conf["rope_theta"] = float(m.rope_base)
    conf["architectures"] = ["LlamaForCausalLM"]
    if tokenizer is not None:
        conf.update(bos_token_id=int(tokenizer.bos_id), eos_token_id=int(tokenizer.eos_id),
                    pad_token_id=int(tokenizer.pad_id), mask_token_id=int(tokenizer.mask_id))
    conf["megabd3"] = asdict(cfg)
    return conf


def export_llama_state_dict(sd: Dict[str, torch.Tensor], cfg: Any, out: Path, *, tokenizer: Any = None,
                            card: Optional[str] = None) -> Path:
    """Write OUT (must not exist or be empty; checked by the caller): config.json, model.safetensors,
    tokenizer files, README.md."""
    from safetensors.torch import save_file

    from megabd3.model.hf_llama import LlamaShape, megabd3_to_hf

    vocab = int(tokenizer.model_vocab_size) if tokenizer is not None else int(sd["embedding.weight"].shape[0])
    rows = int(sd["embedding.weight"].shape[0])
    if rows < vocab:
        raise UserError(f"the checkpoint's embedding has {rows} rows but the tokenizer needs {vocab}; "
                        "fix data.tokenizer in the run's config.json")
    # model.pt may hold the TP-padded vocabulary; padded rows are never predicted, so drop them
    fitted = {k: (v[:vocab] if k in ("embedding.weight", "output_layer.weight") else v) for k, v in sd.items()}
    tensors = megabd3_to_hf(fitted, LlamaShape.from_model_config(cfg.model))
    if cfg.model.tie_embeddings:
        tensors.pop("lm_head.weight")  # tied: transformers re-ties it on load (safetensors refuses shared storage)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    conf = llama_hf_config(cfg, vocab, tokenizer)
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(out))
    if card:
        (out / "README.md").write_text(card)
    return out
