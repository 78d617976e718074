"""The BD3 transformer on megatron-core (TP/PP), implementing the ``model_fn`` of docs/interfaces.md.

Layout: vocab-parallel embedding -> [sigma embedder -> conditioning rows] -> megatron
``TransformerBlock`` of :class:`~megabd3.model.layers.BD3Layer` (megatron ``SelfAttention`` with
``AttnMaskType.arbitrary`` and our SDPA core attention, megatron ``MLP``) -> final fp32 LayerNorm with
adaLN -> untied, zero-initialised ``ColumnParallelLinear`` head run only on ``logits_range``.
Activations inside are [S, b, d] (megatron's convention); inputs/outputs are batch-first.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megabd3.diffusion.masks import AttentionSpec
from megabd3.errors import UserError
from megabd3.model.attention import AttentionCall, BD3CoreAttention, resolve_backend
from megabd3.model.layers import (BD3Layer, BD3LayerSubmodules, FP32LayerNorm, TimestepEmbedder,
                                  cond_rows, pack_cond, unpack_cond)
from megabd3.model.rope import rotary_freqs

# Logit of padded vocabulary rows (Megatron pads V to a multiple of make_vocab_size_divisible_by*TP):
# finite, so that p * log p and similar stay 0 instead of NaN, and exp() of it is exactly 0.
PAD_VOCAB_LOGIT = -1e30


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = max(1, divisible_by) * tp
    return -(-vocab_size // multiple) * multiple


def bd3_layer_spec() -> ModuleSpec:
    """Layer spec: our layer, megatron SelfAttention (arbitrary mask) with our core attention."""
    return ModuleSpec(
        module=BD3Layer,
        submodules=BD3LayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=tensor_parallel.ColumnParallelLinear,
                    core_attention=BD3CoreAttention,
                    linear_proj=tensor_parallel.RowParallelLinear,
                ),
            ),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=tensor_parallel.ColumnParallelLinear,
                linear_fc2=tensor_parallel.RowParallelLinear)),
        ),
    )


#: model.* fields that only model.arch=llama reads (rejected at a non-default value with the dit).
LLAMA_ONLY_FIELDS = ("num_query_groups", "ffn_hidden_size", "norm_eps")


def check_model_config(cfg: Any, training: bool = True) -> None:
    """The rejections build_model enforces itself (also checked at config time by config/validate)."""
    m, par = cfg.model, cfg.parallel
    if par.sequence_parallel:
        raise UserError("parallel.sequence_parallel=true is not supported on megatron's local spec "
                        "(no sequence-parallel LayerNorm without Transformer Engine/apex); set it to false")
    if m.tie_embeddings and par.pipeline_parallel > 1:
        raise UserError(f"model.tie_embeddings=true with parallel.pipeline_parallel="
                        f"{par.pipeline_parallel} is not supported; set model.tie_embeddings=false")
    if m.tie_embeddings and getattr(m, "arch", "dit") != "llama":  # llama: tied head (issue 12)
        raise UserError("model.tie_embeddings=true is not implemented (the reference is untied); "
                        "set model.tie_embeddings=false")
    if getattr(m, "arch", "dit") != "llama":
        # the DiT reads none of the Llama-only fields: a non-default value would be silently ignored
        from megabd3.config.schema import ModelConfig

        base = ModelConfig()
        odd = [f"model.{k}={getattr(m, k)!r}" for k in LLAMA_ONLY_FIELDS
               if getattr(m, k, getattr(base, k)) != getattr(base, k)]
        if odd:
            raise UserError(f"{', '.join(odd)} only apply to model.arch=llama (the dit ignores them); "
                            "reset them to their defaults or set model.arch=llama")
    if m.num_heads % par.tensor_parallel:
        raise UserError(f"model.num_heads ({m.num_heads}) must be divisible by "
                        f"parallel.tensor_parallel ({par.tensor_parallel})")
    if m.hidden_size % m.num_heads:
        raise UserError(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})")
    if (m.hidden_size // m.num_heads) % 2:
        raise UserError(f"head dim {m.hidden_size // m.num_heads} must be even for rotary embeddings; "
                        "change model.hidden_size or model.num_heads")
    if par.virtual_pipeline > 1:  # see config/validate.py: one chunk per stage, no vp_stage chunks
        raise UserError(f"parallel.virtual_pipeline={par.virtual_pipeline} (interleaved pipeline) is not supported; "
                        "set parallel.virtual_pipeline=1")
    stages = par.pipeline_parallel * max(1, par.virtual_pipeline)
    if m.num_layers % stages:
        raise UserError(f"model.num_layers ({m.num_layers}) must be divisible by pipeline_parallel x "
                        f"virtual_pipeline ({stages})")
    if m.init not in ("reference", "megatron"):
        raise UserError(f"model.init: expected reference or megatron, found {m.init!r}")


def pipeline_dtype(cfg: Any) -> torch.dtype:
    """dtype of the hidden states sent between pipeline stages: the dtype the engine runs the module in.

    DeepSpeed casts the module to bf16 under ``precision`` bf16 (``auto`` on GPU), so the stages exchange
    bf16 activations; megatron allocates its receive buffers (and gradient buffers) with this dtype, and
    an fp32 buffer there makes stage 1 fail with "mat1 and mat2 must have the same dtype".
    """
    from megabd3.config.derived import resolve_precision

    return torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32


def transformer_config(cfg: Any, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron's config of ``cfg``. ``params_dtype`` stays fp32 under bf16: the model is built and
    initialised in fp32, DeepSpeed keeps that as the fp32 master and casts the module copy itself."""
    m, par = cfg.model, cfg.parallel
    tc = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        ffn_hidden_size=m.mlp_ratio * m.hidden_size,
        kv_channels=m.hidden_size // m.num_heads,
        hidden_dropout=m.dropout,
        attention_dropout=0.0,
        add_bias_linear=False,
        activation_func=functools.partial(F.gelu, approximate="tanh"),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=True,
        perform_initialization=False,  # init_weights() does it, independent of TP/PP
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline if par.virtual_pipeline > 1 else None,
        pipeline_dtype=pipeline_dtype(cfg),
        params_dtype=params_dtype,
        sequence_parallel=False,
    )
    tc.bd3_adaln = bool(m.adaln)
    tc.bd3_cond_dim = m.cond_dim
    tc.bd3_recompute = bool(m.recompute)
    return tc


class BD3Transformer(MegatronModule):
    """See the module docstring. ``forward`` is the interface's ``model_fn``."""

    def __init__(self, cfg: Any, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None) -> None:
        check_model_config(cfg)
        config = transformer_config(cfg)
        super().__init__(config=config)
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        m = cfg.model
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by,
                                                   cfg.parallel.tensor_parallel)
        self.pre_process, self.post_process = pre_process, post_process
        self.adaln, self.cond_dim = bool(m.adaln), m.cond_dim
        self.time_conditioning = bool(m.time_conditioning)
        self.head_dim = m.hidden_size // m.num_heads
        self.backend, self.tile, self.rope_base = m.attention_backend, m.attention_tile, m.rope_base
        resolve_backend(self.backend, torch.device("cpu"))  # reject unknown names now
        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                self.padded_vocab_size, m.hidden_size, init_method=lambda w: None, config=config)
            self.sigma_map = TimestepEmbedder(m.cond_dim) if self.adaln else None
        self.decoder = TransformerBlock(config, bd3_layer_spec(), post_layer_norm=False,
                                        pre_process=pre_process, post_process=post_process,
                                        vp_stage=vp_stage)
        if post_process:
            self.final_norm = FP32LayerNorm(m.hidden_size)
            self.final_adaLN = nn.Linear(m.cond_dim, 2 * m.hidden_size) if self.adaln else None
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                m.hidden_size, self.padded_vocab_size, config=config, init_method=lambda w: None,
                bias=True, gather_output=False, skip_bias_add=False)
        _mark_tp_params(self)
        from megabd3.model.export import init_weights

        init_weights(self, cfg.training.seed, m.init)

    # -- megatron pipeline hook
    def set_input_tensor(self, input_tensor: Any) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    @property
    def n_cond_rows(self) -> int:
        return cond_rows(self.cond_dim, self.config.hidden_size) if self.adaln else 0

    def _embed(self, input_ids: torch.Tensor, sigma: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.embedding(input_ids).transpose(0, 1).contiguous()  # [S, b, d]
        if not self.adaln:
            return x
        b = input_ids.shape[0]
        if sigma is None or not self.time_conditioning:
            # BD3-LM/MDLM: the reference zeroes sigma; adaLN still exists and trains.
            sigma = torch.zeros(b, device=input_ids.device)
        c = F.silu(self.sigma_map(sigma.reshape(b)))
        return torch.cat([pack_cond(c.to(x.dtype), self.config.hidden_size), x], dim=0)

    def _head(self, h: torch.Tensor, logits_range: Optional[tuple],
              rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of the positions in ``logits_range`` or, if given, of ``rows`` [b, k] (per-sample
        indices into the sequence; the head then runs on b*k positions only)."""
        R = self.n_cond_rows
        x = h[R:]
        if rows is not None and rows.shape[-1] == 0:  # a KV-cache store whose logits nobody reads: no head
            return x.new_zeros(x.shape[1], 0, self.output_layer.weight.shape[0], dtype=torch.float32)
        if logits_range is not None:
            x = x[logits_range[0]:logits_range[1]]
        if rows is not None:
            b = x.shape[1]
            x = x.transpose(0, 1)[torch.arange(b, device=x.device)[:, None], rows].transpose(0, 1)  # [k, b, d]
        x = self.final_norm(x)
        if self.adaln:
            shift, scale = self.final_adaLN(unpack_cond(h[:R], self.cond_dim))[None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        logits, _ = self.output_layer(x)
        return self._mask_padded_vocab(logits.transpose(0, 1).float())  # [b, S_out, V/TP]

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Padded vocabulary rows (this TP rank's share of them) can never be predicted."""
        start = ps.get_tensor_model_parallel_rank() * logits.shape[-1]
        n_real = self.vocab_size - start
        if n_real < logits.shape[-1]:
            pad = torch.arange(logits.shape[-1], device=logits.device) >= n_real
            logits = logits.masked_fill(pad, PAD_VOCAB_LOGIT)
        return logits

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: torch.Tensor, attn: AttentionSpec,
                sigma: Optional[torch.Tensor] = None, logits_range: Optional[tuple] = None,
                cache: Any = None, cache_mode: Optional[str] = None) -> torch.Tensor:
        """Logits [b, S_out, V/TP] (float32) on the last stage, hidden states [R+S, b, d] before it."""
        if attn.kind == "bd3" and position_ids.shape[-1] != 2 * attn.seq_len:
            raise ValueError(f"bd3 input must have 2L = {2 * attn.seq_len} tokens, found {position_ids.shape[-1]}")
        h = self._trunk(input_ids, position_ids, attn, sigma, cache, cache_mode)
        if not self.post_process:
            return h
        return self._head(h, logits_range)

    def _trunk(self, input_ids: Optional[torch.Tensor], position_ids: torch.Tensor, attn: AttentionSpec,
               sigma: Optional[torch.Tensor], cache: Any, cache_mode: Optional[str],
               store_tokens: int = 0) -> torch.Tensor:
        """Embedding + transformer layers -> hidden states [R+S, b, d] (no head)."""
        x = self._embed(input_ids, sigma) if self.pre_process else None
        call = AttentionCall(attn, self.backend, self.tile, cache, cache_mode, store_tokens)
        rope = rotary_freqs(position_ids, self.head_dim, self.rope_base)
        return self.decoder(hidden_states=x, attention_mask=call, rotary_pos_emb=rope)

    # -- KV-cached sampling (docs/interfaces.md; PP = 1)
    def _cached_forward(self, cache: Any, ids: torch.Tensor, position_start: int, mode: str,
                        kind: str, positions: Optional[torch.Tensor] = None, store_tokens: int = 0) -> torch.Tensor:
        if not (self.pre_process and self.post_process):
            raise UserError("KV-cached sampling needs the whole model on one stage; load the checkpoint "
                            "with parallel.pipeline_parallel=1")
        from megabd3.model import fast_decode

        if fast_decode.eligible(self, cache):  # same operations without megatron's per-call dispatch
            return fast_decode.cached_forward(self, cache, ids, position_start, mode, kind, positions, store_tokens)
        b, n = ids.shape
        pos = torch.arange(position_start, position_start + n, device=ids.device).expand(b, n)
        spec = AttentionSpec("causal" if kind == "causal" else "full", n)
        h = self._trunk(ids, pos, spec, None, cache, mode, store_tokens)
        if store_tokens:  # logits of the noisy rows only
            h = torch.cat([h[:self.n_cond_rows], h[self.n_cond_rows + store_tokens:]], 0)
        return self._head(h, None, positions)

    def denoise_block(self, cache: Any, ids: torch.Tensor, position_start: int, kind: str = "bd3",
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of the noisy block ``ids`` [b, B] at positions ``position_start..+B`` attending to the
        cached clean blocks and itself; the cache is not modified.

        ``positions`` (LongTensor [b, k], indices into the block) restricts the output to those rows,
        [b, k, V]: first-hitting samplers need one row per call, and the output head (a V x d matmul
        per row) is then the largest cost of a call.
        """
        return self._cached_forward(cache, ids, position_start, "denoise", kind, positions)

    def store_and_denoise(self, cache: Any, clean: torch.Tensor, ids: torch.Tensor, position_start: int,
                          positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``store_block(cache, clean, position_start - |clean|)`` then ``denoise_block(cache, ids,
        position_start, positions=positions)`` in one forward (BD3 sampling: the finished block's store and
        the next block's first denoising call). Returns the noisy block's logits."""
        n1 = clean.shape[1]
        out = self._cached_forward(cache, torch.cat([clean, ids], 1), position_start - n1, "store_denoise", "bd3",
                                   positions, store_tokens=n1)
        cache.next_position = position_start
        return out

    def store_block(self, cache: Any, ids: torch.Tensor, position_start: int, kind: str = "bd3",
                    positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the clean block ``ids`` and append its keys/values to ``cache``; returns its logits
        (AR samplers use them: the logits at position p predict p + 1). ``positions`` [b, k] restricts
        them to those rows; [b, 0] skips the output head (BD3 samplers never read a stored block's logits,
        and the V x d head is the largest cost of a small block's forward)."""
        out = self._cached_forward(cache, ids, position_start, "store", kind, positions)
        cache.next_position = position_start + ids.shape[1]
        return out


def _mark_tp_params(model: nn.Module) -> None:
    """Tag sharded parameters with megatron's ``tensor_model_parallel``/``partition_dim`` attributes.

    megatron sets them on weights only inside its own initialisation, which we skip
    (``perform_initialization=False``); DeepSpeed's grad norm and our export rely on them.
    """
    for mod in model.modules():
        if isinstance(mod, (tensor_parallel.ColumnParallelLinear, tensor_parallel.VocabParallelEmbedding)):
            dims = {"weight": 0, "bias": 0}
        elif isinstance(mod, tensor_parallel.RowParallelLinear):
            dims = {"weight": 1}  # its bias is replicated
        else:
            continue
        for pname, dim in dims.items():
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter):
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1


def build_model(cfg: Any, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None) -> BD3Transformer:
    """The model of ``cfg`` for this pipeline stage; needs megabd3.parallel.init_distributed first."""
    if not ps.model_parallel_is_initialized():
        raise UserError("build_model needs megabd3.parallel.init.init_distributed(cfg) to run first")
    arch = getattr(cfg.model, "arch", "dit")
    if arch == "llama":  # the Llama-family backbone (issue 12), megabd3/model/llama.py
        from megabd3.model.llama import LlamaTransformer

        return LlamaTransformer(cfg, vocab_size, pre_process, post_process, vp_stage)
    if arch != "dit":
        raise UserError(f"model.arch: expected dit or llama, found {arch!r}")
    return BD3Transformer(cfg, vocab_size, pre_process, post_process, vp_stage)
