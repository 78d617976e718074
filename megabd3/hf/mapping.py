"""Our layout-free full state dict <-> the released BD3-LM parameter names (bd3lm_hf_format.md).

The only non-trivial tensor is the fused qkv weight: megatron orders its output rows per head
[h, (q, k, v), hd]; the released layout orders them [(q, k, v), h, hd].
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from megabd3.errors import UserError

_TOP = {
    "embedding.weight": "backbone.vocab_embed.embedding",
    "sigma_map.mlp.0.weight": "backbone.sigma_map.mlp.0.weight",
    "sigma_map.mlp.0.bias": "backbone.sigma_map.mlp.0.bias",
    "sigma_map.mlp.2.weight": "backbone.sigma_map.mlp.2.weight",
    "sigma_map.mlp.2.bias": "backbone.sigma_map.mlp.2.bias",
    "final_norm.weight": "backbone.output_layer.norm_final.weight",
    "output_layer.weight": "backbone.output_layer.linear.weight",
    "output_layer.bias": "backbone.output_layer.linear.bias",
    "final_adaLN.weight": "backbone.output_layer.adaLN_modulation.weight",
    "final_adaLN.bias": "backbone.output_layer.adaLN_modulation.bias",
}
_LAYER = {
    "norm1.weight": "norm1.weight",
    "norm2.weight": "norm2.weight",
    "self_attention.linear_qkv.weight": "attn_qkv.weight",
    "self_attention.linear_proj.weight": "attn_out.weight",
    "mlp.linear_fc1.weight": "mlp.0.weight",
    "mlp.linear_fc1.bias": "mlp.0.bias",
    "mlp.linear_fc2.weight": "mlp.2.weight",
    "mlp.linear_fc2.bias": "mlp.2.bias",
    "adaLN_modulation.weight": "adaLN_modulation.weight",
    "adaLN_modulation.bias": "adaLN_modulation.bias",
}
_OURS_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^backbone\.blocks\.(\d+)\.(.+)$")
# buffers of the released model that carry no learned weights of ours
HF_BUFFERS = ("backbone.rotary_emb.inv_freq", "sampling_eps_min", "sampling_eps_max")


def qkv_to_released(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d_in = w.shape[1]
    hd = w.shape[0] // (3 * n_heads)
    return w.view(n_heads, 3, hd, d_in).transpose(0, 1).reshape(3 * n_heads * hd, d_in)


def qkv_from_released(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d_in = w.shape[1]
    hd = w.shape[0] // (3 * n_heads)
    return w.view(3, n_heads, hd, d_in).transpose(0, 1).reshape(3 * n_heads * hd, d_in)


def to_released(sd: Dict[str, torch.Tensor], n_heads: int) -> Dict[str, torch.Tensor]:
    """Our full state dict -> released names (weights only; buffers are added by the exporter)."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = _OURS_LAYER.match(name)
        if m and m.group(2) in _LAYER:
            if m.group(2).endswith("linear_qkv.weight"):
                t = qkv_to_released(t, n_heads)
            out[f"backbone.blocks.{m.group(1)}.{_LAYER[m.group(2)]}"] = t
        elif name in _TOP:
            out[_TOP[name]] = t
        else:
            raise UserError(f"weight {name!r} has no place in the released BD3-LM layout; only the adaLN DiT "
                            "backbone (model family bd3lm/mdlm/ar/sedd) can be exported")
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_released(sd: Dict[str, torch.Tensor], n_heads: int) -> Dict[str, torch.Tensor]:
    """Released names -> our full state dict (buffers dropped)."""
    top = {v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _LAYER.items()}
    out: Dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in HF_BUFFERS:
            continue
        m = _HF_LAYER.match(name)
        if m and m.group(2) in layer:
            ours = layer[m.group(2)]
            if ours.endswith("linear_qkv.weight"):
                t = qkv_from_released(t, n_heads)
            out[f"decoder.layers.{m.group(1)}.{ours}"] = t
        elif name in top:
            out[top[name]] = t
        else:
            raise UserError(f"HF checkpoint weight {name!r} is not part of the BD3-LM DiT layout; "
                            "only model_type bd3lm checkpoints can be imported")
    return {k: v.to(torch.float32) for k, v in out.items()}
