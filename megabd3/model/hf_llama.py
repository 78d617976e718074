"""HF ``LlamaForCausalLM`` state dict <-> megabd3 llama full state dict (megabd3/model/llama.py).

The full state dict is layout-free (megabd3/model/export.py): it loads into any TP/PP layout with
``load_full_state_dict``. Mapping, per layer i (``hn`` = head dim, ``g`` = key/value heads,
``r`` = heads / g):

- ``q_proj, k_proj, v_proj`` -> ``linear_qkv`` in megatron's grouped order: for each query group,
  its ``r`` query heads, then its key head, then its value head ([g * (r + 2) * hn, d]); megatron's
  ``get_query_key_value_tensors`` views the projection as [.., g, (r + 2) * hn] and splits it so.
- ``gate_proj, up_proj`` -> ``linear_fc1`` = cat(gate, up): megatron's gated MLP applies the
  activation to the first half and multiplies by the second.
- ``input_layernorm`` / ``post_attention_layernorm`` -> ``input_layernorm`` / ``pre_mlp_layernorm``;
  ``o_proj`` / ``down_proj`` -> ``linear_proj`` / ``linear_fc2``; ``model.norm`` -> ``final_norm``.
- ``embed_tokens`` -> ``embedding``; ``lm_head`` -> ``output_layer`` when untied. Tied checkpoints
  may or may not carry ``lm_head.weight``; it is then dropped (it must equal the embedding).

Rejected (UserError): attention/MLP biases (Qwen2's q/k/v biases), and shapes that contradict the
given sizes. HF's ``rotate_half`` RoPE is megatron's non-interleaved RoPE, so no q/k permutation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict

import torch

from megabd3.errors import UserError

Tensors = Dict[str, torch.Tensor]

_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_FUSED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class LlamaShape:
    """The sizes the conversion needs (HF config names in the comments)."""

    num_layers: int  # num_hidden_layers
    hidden_size: int  # hidden_size
    num_heads: int  # num_attention_heads
    num_query_groups: int  # num_key_value_heads
    tied: bool  # tie_word_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, c: Any) -> "LlamaShape":
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if hd * c.num_attention_heads != c.hidden_size:
            raise UserError(f"HF head_dim {hd} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}; "
                            "megabd3's llama backbone needs head_dim = hidden_size / heads")
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                   bool(getattr(c, "tie_word_embeddings", False)))

    @classmethod
    def from_model_config(cls, m: Any) -> "LlamaShape":
        return cls(m.num_layers, m.hidden_size, m.num_heads, m.num_query_groups or m.num_heads,
                   bool(m.tie_embeddings))


def _take(sd: Tensors, name: str) -> torch.Tensor:
    if name not in sd:
        raise UserError(f"HF Llama state dict has no {name!r}; is it a LlamaForCausalLM checkpoint "
                        "of the configured size?")
    return sd[name]


def hf_to_megabd3(hf: Tensors, shape: LlamaShape) -> Tensors:
    """HF LlamaForCausalLM state dict -> megabd3 llama full state dict (fp32 CPU tensors)."""
    biases = sorted(k for k in hf if k.endswith(".bias"))
    if biases:
        raise UserError(f"HF checkpoint has biases ({biases[0]}, ...), which the llama backbone lacks "
                        "(Qwen2-style q/k/v biases are not supported yet); use a bias-free Llama/SmolLM2")
    g, hn, d = shape.num_query_groups, shape.head_dim, shape.hidden_size
    r = shape.num_heads // g
    out: Tensors = {"embedding.weight": _take(hf, "model.embed_tokens.weight"),
                    "final_norm.weight": _take(hf, "model.norm.weight")}
    if not shape.tied:
        out["output_layer.weight"] = _take(hf, "lm_head.weight")
    elif "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
        raise UserError("tie_word_embeddings is true but lm_head.weight differs from embed_tokens; "
                        "set tie_word_embeddings=false (model.tie_embeddings=false)")
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(shape.num_layers):
        pre, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for src, name in _RENAMES.items():
            out[dst + name] = _take(hf, pre + src)
        q = _take(hf, pre + "self_attn.q_proj.weight")
        k = _take(hf, pre + "self_attn.k_proj.weight")
        v = _take(hf, pre + "self_attn.v_proj.weight")
        if list(q.shape) != [g * r * hn, d] or list(k.shape) != [g * hn, d] or list(v.shape) != [g * hn, d]:
            raise UserError(f"layer {i}: q/k/v shapes {list(q.shape)}/{list(k.shape)}/{list(v.shape)} do not "
                            f"match {shape.num_heads} heads, {g} key/value heads of dim {hn}")
        qkv = torch.cat([q.view(g, r * hn, d), k.view(g, hn, d), v.view(g, hn, d)], dim=1)
        out[dst + "self_attention.linear_qkv.weight"] = qkv.reshape(g * (r + 2) * hn, d)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [_take(hf, pre + "mlp.gate_proj.weight"), _take(hf, pre + "mlp.up_proj.weight")], dim=0)
        known |= {pre + n for n in list(_RENAMES) + list(_FUSED)}
    extra = sorted(k for k in hf if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise UserError(f"HF state dict has weights the llama backbone lacks ({extra[:3]}); "
                        "check num_hidden_layers and the architecture")
    return {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in out.items()}


def megabd3_to_hf(sd: Tensors, shape: LlamaShape) -> Tensors:
    """megabd3 llama full state dict -> HF LlamaForCausalLM state dict (inverse of hf_to_megabd3;
    tied models get ``lm_head.weight`` = the embedding, as ``LlamaForCausalLM.state_dict`` lists it)."""
    g, hn, d = shape.num_query_groups, shape.head_dim, shape.hidden_size
    r = shape.num_heads // g
    out: Tensors = {"model.embed_tokens.weight": _take(sd, "embedding.weight"),
                    "model.norm.weight": _take(sd, "final_norm.weight")}
    out["lm_head.weight"] = out["model.embed_tokens.weight"] if shape.tied else _take(sd, "output_layer.weight")
    for i in range(shape.num_layers):
        pre, src = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, name in _RENAMES.items():
            out[pre + hf_name] = _take(sd, src + name)
        qkv = _take(sd, src + "self_attention.linear_qkv.weight").view(g, (r + 2) * hn, d)
        q, k, v = qkv.split([r * hn, hn, hn], dim=1)
        out[pre + "self_attn.q_proj.weight"] = q.reshape(g * r * hn, d)
        out[pre + "self_attn.k_proj.weight"] = k.reshape(g * hn, d)
        out[pre + "self_attn.v_proj.weight"] = v.reshape(g * hn, d)
        gate, up = _take(sd, src + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = gate, up
    return {k: t.contiguous() for k, t in out.items()}


def model_config_from_hf(c: Any) -> Dict[str, Any]:
    """``model.*`` overrides that build megabd3's llama backbone of HF config ``c`` (vocab size is
    passed to build_model separately; dropout 0 as pretrained Llama checkpoints use none)."""
    # transformers >= 4.5x keeps RoPE settings in rope_parameters / rope_scaling (with rope_type
    # "default" and rope_theta for plain RoPE); older versions in rope_theta and rope_scaling=None
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"HF RoPE scaling {rope!r} is not supported by the llama backbone; "
                        "use a checkpoint with plain RoPE")
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", None) or 10000.0))
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise UserError("HF attention_bias/mlp_bias=true is not supported by the llama backbone")
    s = LlamaShape.from_hf_config(c)
    return {"arch": "llama", "num_layers": s.num_layers, "hidden_size": s.hidden_size,
            "num_heads": s.num_heads, "num_query_groups": s.num_query_groups,
            "ffn_hidden_size": c.intermediate_size, "norm_eps": float(c.rms_norm_eps),
            "rope_base": theta, "tie_embeddings": s.tied,
            "adaln": False, "time_conditioning": False, "dropout": 0.0}
