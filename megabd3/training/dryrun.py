"""`--dry-run`: check a config against a (possibly fake) world size without training or a process group.

Validates the config, the TP x PP x DP layout, the batch math and the derived DeepSpeed config, reads
the dataset indices (document/token counts, samples per epoch) and estimates per-rank memory for
parameters, gradients and AdamW states under the chosen ZeRO stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def count_params(cfg: Any, vocab: int) -> int:
    """Analytic parameter count of the BD3 transformer (untied embeddings, adaLN, bias-free norms)."""
    d, n, r, c = cfg.model.hidden_size, cfg.model.num_layers, cfg.model.mlp_ratio, cfg.model.cond_dim
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (r * d * d + r * d) + (r * d * d + d) + 2 * d
    if cfg.model.adaln:
        per_layer += c * 6 * d + 6 * d
    head = d * vocab + (c * 2 * d + 2 * d if cfg.model.adaln else 0) + d
    return vocab * d + n * per_layer + head


def memory_estimate(n_params: int, tp: int, pp: int, dp: int, zero: int, bf16: bool) -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer states (fp32 master + 2 Adam moments)."""
    local = n_params / (tp * pp)
    w_bytes = 2 if bf16 else 4
    weights = local * w_bytes / (dp if zero >= 3 else 1)
    grads = local * w_bytes / (dp if zero >= 2 else 1)
    optim = local * (12 if bf16 else 8) / (dp if zero >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optim, "total": weights + grads + optim}


def dry_run(cfg: Any, world_size: int) -> str:
    from megabd3.config.deepspeed import derive_deepspeed_config
    from megabd3.config.derived import data_parallel_size, padded_vocab_size, resolve_precision
    from megabd3.config.errors import raise_if
    from megabd3.config.validate import validate
    from megabd3.errors import UserError

    raise_if(validate(cfg, world_size), "config")
    dp = data_parallel_size(cfg, world_size)
    ds = derive_deepspeed_config(cfg, dp)
    lines = [f"world {world_size} = tp {cfg.parallel.tensor_parallel} x pp {cfg.parallel.pipeline_parallel} x dp {dp}",
             f"global batch {ds['train_batch_size']} = micro {ds['train_micro_batch_size_per_gpu']} x accumulation "
             f"{ds['gradient_accumulation_steps']} x dp {dp}; tokens/step {ds['train_batch_size'] * cfg.data.seq_len:,}"]
    vocab = 50258
    try:
        from megabd3.data.tokenizers import get_tokenizer

        vocab = get_tokenizer(cfg.data.tokenizer).model_vocab_size
    except Exception as exc:  # noqa: BLE001 - the dry run still reports the rest
        lines.append(f"tokenizer {cfg.data.tokenizer}: not available ({exc}); assuming vocab {vocab}")
    for split in ("train", "valid"):
        prefix = getattr(cfg.data, f"{split}_prefix")
        if not prefix:
            continue
        if not Path(prefix + ".idx").is_file():
            raise UserError(f"data.{split}_prefix={prefix!r}: {prefix}.idx not found; run tools/preprocess_data.py")
        from megabd3.data.indexed import IndexedDataset

        idx = IndexedDataset(prefix)
        tokens = int(idx.sizes.sum())
        lines.append(f"{split}: {len(idx):,} documents, {tokens:,} tokens, ~{tokens // cfg.data.seq_len:,} samples of "
                     f"{cfg.data.seq_len} ({tokens // cfg.data.seq_len / max(1, ds['train_batch_size']):.1f} steps/epoch)")
    n = count_params(cfg, padded_vocab_size(cfg, vocab))
    bf16 = resolve_precision(cfg) == "bf16"
    mem = memory_estimate(n, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, dp, cfg.parallel.zero_stage, bf16)
    lines.append(f"parameters ~{n / 1e6:.1f}M; per-rank memory (ZeRO-{cfg.parallel.zero_stage}, {'bf16' if bf16 else 'fp32'}): "
                 + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()) + " (+ activations)")
    lines.append("dry run OK: no training was done")
    return "\n".join(lines)
