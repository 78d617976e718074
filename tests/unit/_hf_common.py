"""Tiny random megabd3 models for the HF export/import and decoding tests, and tiny llama models built from
transformers (single process, TP = PP = 1)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from megabd3.config.schema import Config
from megabd3.hf.export import HERE, REMOTE_CODE
from megabd3.model.export import gather_full_state_dict, load_full_state_dict
from megabd3.model.transformer import build_model
from megabd3.parallel.init import init_distributed

V, L = 40, 16


def tiny_cfg(objective: str = "bd3lm", block: int = 4, **model: Any) -> Config:
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.cond_dim = 2, 32, 4, 16
    cfg.model.dropout, cfg.model.make_vocab_size_divisible_by = 0.0, 16
    cfg.model.attention_backend = "dense"
    cfg.data.seq_len = L
    cfg.diffusion.objective, cfg.diffusion.block_size = objective, block
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def random_model(objective: str = "bd3lm", block: int = 4, seed: int = 3, **model: Any
                 ) -> Tuple[Any, Dict[str, torch.Tensor], Config]:
    """A model with random (non-zero everywhere: adaLN and head too) weights, its full state dict, config."""
    cfg = tiny_cfg(objective, block, **model)
    init_distributed(cfg)
    m = build_model(cfg, V)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(t.shape, generator=g) * 0.3 for k, t in gather_full_state_dict(m).items()}
    load_full_state_dict(m, sd)
    return m.eval(), sd, cfg


def random_dit(vocab: int, **model: Any) -> Any:
    """A d32/4h/2L DiT (cond 48, dense attention, vocab padded to 64) in eval mode whose every weight is
    N(0, 0.2^2), seed 0 (the reference init zeroes adaLN and the head: random so every term matters);
    ``model`` overrides model fields."""
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_heads, m.num_layers, m.cond_dim, m.dropout = 32, 4, 2, 48, 0.0
    m.attention_backend, m.make_vocab_size_divisible_by = "dense", 64
    for k, v in model.items():
        setattr(m, k, v)
    net = build_model(cfg, vocab).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def tiny_llama_hf(vocab: int, max_positions: int) -> Any:
    """A tiny random transformers LlamaForCausalLM (GQA 4/2 heads, tied embeddings, eager attention), seed 0."""
    import transformers

    c = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                                 tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(c).eval()


def llama_from_hf(hf: Any, vocab: int, seq_len: int, block: int, shift: bool,
                  ignore_bos: bool = False) -> Tuple[Config, Any]:
    """The megabd3 llama (BD3-LM, dense attention) on ``hf``'s weights: (config, model in eval mode)."""
    from megabd3.model.hf_llama import LlamaShape, hf_to_megabd3, model_config_from_hf

    cfg = Config()
    for k, v in model_config_from_hf(hf.config).items():
        setattr(cfg.model, k, v)
    cfg.model.attention_backend = "dense"
    cfg.model.shift_logits = shift
    cfg.diffusion.objective, cfg.diffusion.block_size, cfg.data.seq_len = "bd3lm", block, seq_len
    cfg.diffusion.ignore_bos = ignore_bos
    model = build_model(cfg, vocab)
    load_full_state_dict(model, hf_to_megabd3(hf.state_dict(), LlamaShape.from_hf_config(hf.config)))
    return cfg, model.eval()


def released_dir(path, d: int = 32, h: int = 4, c: int = 16, n: int = 2, block: int = 4,  # noqa: ANN001, ANN202
                 eps: Any = (1e-3, 0.999), **fields: Any):
    """A directory in the released layout written from the documented names only (no megabd3 block);
    ``eps``: the sampling_eps_min/max buffers (None: none stored); ``fields`` override config.json (None
    deletes a field)."""
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    t = {"backbone.vocab_embed.embedding": r(V, d), "backbone.rotary_emb.inv_freq":
         1.0 / (10000.0 ** (torch.arange(0, d // h, 2).float() / (d // h))),
         "backbone.sigma_map.mlp.0.weight": r(c, 256), "backbone.sigma_map.mlp.0.bias": r(c),
         "backbone.sigma_map.mlp.2.weight": r(c, c), "backbone.sigma_map.mlp.2.bias": r(c),
         "backbone.output_layer.norm_final.weight": 1 + r(d), "backbone.output_layer.linear.weight": r(V, d),
         "backbone.output_layer.linear.bias": r(V), "backbone.output_layer.adaLN_modulation.weight": r(2 * d, c),
         "backbone.output_layer.adaLN_modulation.bias": r(2 * d)}
    for i in range(n):
        p = f"backbone.blocks.{i}."
        t.update({p + "norm1.weight": 1 + r(d), p + "attn_qkv.weight": r(3 * d, d), p + "attn_out.weight": r(d, d),
                  p + "norm2.weight": 1 + r(d), p + "mlp.0.weight": r(4 * d, d), p + "mlp.0.bias": r(4 * d),
                  p + "mlp.2.weight": r(d, 4 * d), p + "mlp.2.bias": r(d),
                  p + "adaLN_modulation.weight": r(6 * d, c), p + "adaLN_modulation.bias": r(6 * d)})
    if eps is not None:
        t["sampling_eps_min"], t["sampling_eps_max"] = torch.tensor(float(eps[0])), torch.tensor(float(eps[1]))
    from safetensors.torch import save_file

    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    conf = {"model_type": "bd3lm", "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig",
                                                "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
            "block_size": block, "vocab_size": V, "model_length": L, "cross_attn": True, "adaln": True,
            "attn_backend": "sdpa", "causal": False, "hidden_dim": d, "cond_dim": c, "n_blocks": n,
            "n_heads": h, "dropout": 0.1, "time_conditioning": False, "var_min": True,
            "sampling_eps_min": 1e-3, "sampling_eps_max": 0.999}
    _apply(conf, fields)
    (path / "config.json").write_text(json.dumps(conf))
    for f in REMOTE_CODE:
        shutil.copyfile(HERE / f, path / f)
    return path


def _apply(conf: dict, fields: dict) -> None:
    for k, v in fields.items():  # None deletes the field
        if v is None:
            conf.pop(k, None)
        else:
            conf[k] = v


def edit_config(path: Path, **fields) -> None:  # noqa: ANN003
    """Set (or, with None, delete) fields of ``path/config.json``."""
    conf = json.loads((path / "config.json").read_text())
    _apply(conf, fields)
    (path / "config.json").write_text(json.dumps(conf))
