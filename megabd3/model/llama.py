"""The Llama-family backbone (Llama / Qwen2-without-bias / SmolLM2) on megatron-core (issue 12).

Built from megatron-core's own local GPT layer spec (``get_gpt_layer_local_spec(normalization=
"RMSNorm")``: ``TransformerLayer`` with pre-RMSNorm, ``SelfAttention`` with grouped-query
``linear_qkv`` and ``MLP`` with ``gated_linear_unit`` + SiLU = SwiGLU), with two changes:
``attn_mask_type`` arbitrary and our :class:`~megabd3.model.attention.BD3CoreAttention` (behind a
GQA key/value expansion) as core attention, so the same ``AttentionSpec`` (causal / full / bd3 2L)
and KV cache drive it as the DiT backbone. No adaLN, no biases; the final RMSNorm and the
(optionally tied) head follow the trunk. It subclasses :class:`BD3Transformer` for ``forward``,
the head's vocabulary padding and the cached-sampling methods.

Parallelism. TP: megatron's column/row-parallel layers as in the DiT. ``linear_qkv`` is laid out per
query group ([q heads of group 0, k0, v0, q heads of group 1, ...]), so a contiguous row split
hands each TP rank whole groups (hence num_query_groups % TP == 0); the fused ``linear_fc1`` =
[gate; up] is split per half (rank r holds [gate_r; up_r], megatron's ``partition_stride`` = 2,
honoured by export.py), so the layout-free full state dict does not depend on TP. A tied head reads
the vocab-parallel embedding's own shard. PP: untied models only -- a tied head would need the
embedding shared between the first and last stage (megatron's embedding group), which this
backbone does not implement, so tie_embeddings with pipeline_parallel > 1 is rejected.

Parameter names (full state dict, see megabd3/model/hf_llama.py for the HF mapping):
``embedding.weight``, ``decoder.layers.i.{input_layernorm, pre_mlp_layernorm}.weight``,
``decoder.layers.i.self_attention.{linear_qkv, linear_proj}.weight``,
``decoder.layers.i.mlp.{linear_fc1, linear_fc2}.weight``, ``final_norm.weight`` and, untied,
``output_layer.weight``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import nn

from megabd3.errors import UserError
from megabd3.model.attention import BD3CoreAttention, resolve_backend
from megabd3.model.export import (VOCAB_ROWS, _fit_rows, _init_full, _shard, full_shape_of,
                                   named_global_params, write_local)
from megabd3.model.shift import ShiftedLogitsMixin
from megabd3.model.transformer import (BD3Transformer, _mark_tp_params, check_model_config,
                                       padded_vocab_size, transformer_config)


class GQACoreAttention(BD3CoreAttention):
    """BD3 core attention for grouped-query attention: megatron hands the core attention keys and
    values with ``num_query_groups`` heads; our backends (and the KV cache) take as many key/value
    heads as query heads, so each group's head is repeated for its queries. Query head i belongs to
    group i // (heads / groups) in megatron's ``linear_qkv`` layout, which is what
    ``repeat_interleave`` produces (and what HF's ``repeat_kv`` does)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                attention_mask: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        rep = query.shape[2] // key.shape[2]
        if rep > 1:
            key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


def llama_layer_spec() -> ModuleSpec:
    """megatron's local GPT layer spec with RMSNorm, our core attention and the arbitrary mask type."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=False)
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {}, attn_mask_type=AttnMaskType.arbitrary)
    attn.submodules.core_attention = GQACoreAttention
    return spec


def num_query_groups(m: Any) -> int:
    return m.num_query_groups or m.num_heads


def ffn_hidden_size(m: Any) -> int:
    return m.ffn_hidden_size or m.mlp_ratio * m.hidden_size


def check_llama_config(cfg: Any) -> None:
    """Rejections specific to model.arch=llama (the shared ones are in transformer.check_model_config)."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    g = num_query_groups(m)
    if m.adaln or m.time_conditioning:
        raise UserError("model.arch=llama has no adaLN; set model.adaln=false and model.time_conditioning=false")
    if g < 1 or m.num_heads % g:
        raise UserError(f"model.num_query_groups ({g}) must divide model.num_heads ({m.num_heads})")
    if g % tp:
        # linear_qkv is grouped per query group, so its contiguous TP row split must give every
        # rank whole groups (a group's q heads, its k and its v head)
        raise UserError(f"model.num_query_groups ({g}) must be divisible by parallel.tensor_parallel ({tp})")
    # TP > 1 is supported: linear_fc1 = [gate; up] is sharded as [gate_r; up_r] (partition_stride 2,
    # see LlamaTransformer.__init__), which export.py's shard/gather honour. Tied + PP > 1 is
    # rejected by transformer.check_model_config (no shared embedding group across stages).
    if ffn_hidden_size(m) % tp:
        raise UserError(f"model.ffn_hidden_size ({ffn_hidden_size(m)}) must be divisible by "
                        f"parallel.tensor_parallel ({tp})")
    if m.recompute:
        # megatron's TransformerLayer does not read bd3_recompute, and its own recompute path is
        # reentrant (it cannot carry our AttentionCall object)
        raise UserError("model.recompute=true is not supported with model.arch=llama yet; set model.recompute=false")
    if not m.norm_eps > 0:
        raise UserError(f"model.norm_eps={m.norm_eps!r} must be > 0")


def llama_transformer_config(cfg: Any) -> Any:
    """:func:`transformer_config` of the DiT with the Llama family's choices."""
    m = cfg.model
    tc = transformer_config(cfg)
    # Set after construction: __post_init__ only fills defaults for these (num_query_groups None ->
    # heads, ffn_hidden_size None -> 4d), which we override with explicit values anyway.
    tc.normalization, tc.layernorm_epsilon = "RMSNorm", m.norm_eps
    tc.num_query_groups, tc.ffn_hidden_size = num_query_groups(m), ffn_hidden_size(m)
    tc.gated_linear_unit, tc.activation_func = True, F.silu
    tc.add_bias_linear, tc.add_qkv_bias = False, False
    tc.bd3_adaln = False
    return tc


@torch.no_grad()
def init_llama_weights(model: nn.Module, seed: int, mode: str) -> None:
    """export.init_weights for this backbone: RMSNorm weights start at 1 (init_weights knows only the
    DiT's norm names), matrices from the same (seed, global name)-seeded, TP/PP-independent draw."""
    tp = ps.get_tensor_model_parallel_world_size()
    params = list(named_global_params(model))
    fan_in = {n: full_shape_of(p, tp)[1] for n, _, p in params if len(full_shape_of(p, tp)) == 2}
    for name, chunk, p in params:
        shape = full_shape_of(p, tp)
        if len(shape) == 1:  # input_layernorm / pre_mlp_layernorm / final_norm: replicated
            full = torch.ones(shape)
        elif name in VOCAB_ROWS:
            full = _fit_rows(_init_full(name, [chunk.vocab_size] + shape[1:], fan_in, seed, mode), shape[0])
        else:
            full = _init_full(name, shape, fan_in, seed, mode)
        write_local(p, _shard(full, p).to(p.dtype))


class LlamaRMSNorm(nn.Module):
    """The final norm, as HF's LlamaRMSNorm: computed in float32, weight applied after the cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaTransformer(ShiftedLogitsMixin, BD3Transformer):
    """See the module docstring; ``forward`` is the interface's ``model_fn`` (sigma is ignored)."""

    def __init__(self, cfg: Any, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None) -> None:
        from megatron.core.enums import ModelType

        check_model_config(cfg)
        check_llama_config(cfg)
        config = llama_transformer_config(cfg)
        MegatronModule.__init__(self, config=config)
        self.model_type = ModelType.encoder_or_decoder
        m = cfg.model
        self.cfg, self.vocab_size = cfg, vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by,
                                                   cfg.parallel.tensor_parallel)
        self.pre_process, self.post_process = pre_process, post_process
        self.adaln, self.cond_dim, self.time_conditioning = False, m.cond_dim, False
        self.tied = bool(m.tie_embeddings)
        self.head_dim = m.hidden_size // m.num_heads
        self.backend, self.tile, self.rope_base = m.attention_backend, m.attention_tile, m.rope_base
        resolve_backend(self.backend, torch.device("cpu"))
        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                self.padded_vocab_size, m.hidden_size, init_method=lambda w: None, config=config)
        self.decoder = TransformerBlock(config, llama_layer_spec(), post_layer_norm=False,
                                        pre_process=pre_process, post_process=post_process,
                                        vp_stage=vp_stage)
        if post_process:
            self.final_norm = LlamaRMSNorm(m.hidden_size, m.norm_eps)
            # Tied: the head reads the embedding's weight -- this TP rank's vocab-parallel shard,
            # the same rows its column-parallel head computes; PP > 1 is rejected, so both live on
            # this stage.
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                m.hidden_size, self.padded_vocab_size, config=config, init_method=lambda w: None,
                bias=False, gather_output=False, skip_bias_add=False,
                skip_weight_param_allocation=self.tied)
        _mark_tp_params(self)
        for layer in self.decoder.layers:
            # megatron's attribute for a [gate; up] weight whose TP shards are [gate_r; up_r] (its
            # gated MLP chunks the local output in two); export.py's shard/gather honour it
            layer.mlp.linear_fc1.weight.partition_stride = 2
        init_llama_weights(self, cfg.training.seed, m.init)

    def _embed(self, input_ids: torch.Tensor, sigma: Optional[torch.Tensor]) -> torch.Tensor:
        return self.embedding(input_ids).transpose(0, 1).contiguous()  # [S, b, d]; no conditioning

    def _head(self, h: torch.Tensor, logits_range: Optional[tuple],
              rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = h
        if rows is not None and rows.shape[-1] == 0:  # a KV-cache store whose logits nobody reads: no head
            rows_out = (self.embedding.weight if self.tied else self.output_layer.weight).shape[0]
            return x.new_zeros(x.shape[1], 0, rows_out, dtype=torch.float32)
        if logits_range is not None:
            x = x[logits_range[0]:logits_range[1]]
        if rows is not None:
            b = x.shape[1]
            x = x.transpose(0, 1)[torch.arange(b, device=x.device)[:, None], rows].transpose(0, 1)
        x = self.final_norm(x)
        weight = self.embedding.weight if self.tied else None
        logits, _ = self.output_layer(x, weight=weight)
        return self._mask_padded_vocab(logits.transpose(0, 1).float())
