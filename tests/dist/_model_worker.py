"""Worker for tests/dist/test_model_parallel.py: one BD3 forward/backward at a given TP/PP layout.

Usage: torchrun --nproc-per-node N _model_worker.py <tp> <pp> <out.pt>
Writes (rank 0): full logits [b, L, V] of every micro-batch, mean loss, global grad norm and the
gathered full gradient dict, all computed from the same random full state dict.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megabd3.config.schema import Config
from megabd3.diffusion.masks import AttentionSpec
from megabd3.model.export import gather_full_state_dict, load_full_state_dict, named_global_params
from megabd3.model.transformer import build_model
from megabd3.parallel.init import destroy_distributed, init_distributed
from megabd3.parallel.pipeline import pipeline_forward_backward, stage_seq_length

V, L, B, MB, NMB = 50, 16, 4, 2, 2


def main() -> None:
    tp, pp, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.cond_dim = 4, 64, 4, 32
    cfg.model.dropout = 0.0
    cfg.model.attention_backend = "tiled"
    cfg.model.make_vocab_size_divisible_by = 8
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = tp, pp
    init_distributed(cfg)
    model = build_model(cfg, V, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage())
    # Same random full weights at every layout (the real init zeroes the head and adaLN).
    full = gather_full_state_dict(model)
    for name in sorted(full):
        g = torch.Generator().manual_seed(sum(map(ord, name)) * 7 + 1)
        full[name] = torch.randn(full[name].shape, generator=g) * 0.2
    load_full_state_dict(model, full, strict=False)

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(NMB):
        x0 = torch.randint(0, V, (MB, L), generator=gen)
        xt = torch.where(torch.rand(MB, L, generator=gen) < 0.5, V - 1, x0)
        batches.append({"input_ids": torch.cat([xt, x0], 1),
                        "position_ids": torch.arange(L).repeat(2)[None].expand(MB, -1),
                        "attn": AttentionSpec("bd3", L, B), "logits_range": (0, L),
                        "sigma": torch.rand(MB, generator=gen), "target": x0})

    def loss_fn(logits, batch):  # noqa: ANN001, ANN202
        # megatron's vocab-parallel CE subtracts the max from its input in place: give it a copy
        ce = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().clone(), batch["target"].t().contiguous())
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        loss = ce.mean()
        return loss, {"loss": loss, "logits": torch.cat(parts, -1)[..., :V]}

    logs = pipeline_forward_backward(model, iter(batches), NMB, loss_fn, forward_only=False,
                                     seq_length=stage_seq_length(model, 2 * L), micro_batch_size=MB)
    # global grad norm: sharded params on every TP rank, replicated ones once; summed over TP x PP
    sq = torch.zeros(())
    for name, _, p in named_global_params(model):
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0:
            sq += p.grad.float().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    for _, _, p in named_global_params(model):
        p.data.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    grads = gather_full_state_dict(model)
    result = {"grad_norm": sq.sqrt().item(), "grads": grads}
    if ps.is_pipeline_last_stage():
        result["loss"] = sum(float(l["loss"]) for l in logs) / NMB
        result["logits"] = torch.cat([l["logits"] for l in logs], 0)
    # ship the last stage's results to rank 0
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, result)
    if dist.get_rank() == 0:
        merged = dict(objs[0])
        for o in objs:
            merged.update({k: v for k, v in o.items() if k in ("loss", "logits")})
        torch.save(merged, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main()
