"""Worker for tests/dist/test_llama_parallel.py: the llama backbone at several TP/PP layouts, one after
another in one launch (megabd3.parallel.init re-creates megatron's groups when the layout changes).

Usage: torchrun --nproc-per-node 2 _llama_parallel_worker.py <in.pt> <out.pt>
in.pt: {"hf_config": LlamaConfig kwargs, "hf": {"tied"|"untied": HF state dict}, "layouts": [(tied, tp, pp)]}.
For each layout, every rank converts the HF state dict (hf_to_megabd3), builds the model, loads it and
records (rank 0 writes a list of dicts, one per layout):
* ``gathered``: gather_full_state_dict after the load, and ``hf_back``: megabd3_to_hf of it;
* ``causal``: full logits [b, S, V] of a causal forward, ``bd3``: logits of the x_t half of a BD3 2L input;
* ``ce_loss``/``ce_grad_norm``/``ce_grads``: vocab-parallel cross entropy on the bd3 logits, backward
  through megatron's pipeline schedule (every layout), global grad norm and gathered full gradients;
* PP = 1 only: ``obj_loss``/``obj_grad_norm`` of one BD3-objective training step (diffusion/objectives,
  the loss the trainer optimises, on TP vocab shards).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import transformers
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megabd3.config.schema import Config
from megabd3.diffusion.masks import AttentionSpec
from megabd3.diffusion.objectives import build_objective
from megabd3.model.export import gather_full_state_dict, load_full_state_dict, named_global_params
from megabd3.model.hf_llama import LlamaShape, hf_to_megabd3, megabd3_to_hf, model_config_from_hf
from megabd3.model.transformer import build_model
from megabd3.parallel.init import destroy_distributed, init_distributed
from megabd3.parallel.pipeline import pipeline_forward_backward, stage_seq_length

L, BLOCK, MB = 16, 4, 2


def _gather_vocab(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, x.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


def _grad_norm(model: torch.nn.Module) -> float:
    """Global grad norm: TP-sharded parameters on every TP rank, replicated ones once; over TP x PP."""
    sq = torch.zeros((), dtype=torch.float64)
    for _, _, p in named_global_params(model):
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False)
                                   or ps.get_tensor_model_parallel_rank() == 0):
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt().item()


def run_layout(hf_config: transformers.LlamaConfig, hf_sd: dict, tied: bool, tp: int, pp: int, V: int) -> dict:
    cfg = Config()
    for k, v in model_config_from_hf(hf_config).items():
        setattr(cfg.model, k, v)
    cfg.model.make_vocab_size_divisible_by = 48  # 128 -> 144 at TP 1, 192 at TP 2: padded rows differ
    cfg.model.attention_backend = "dense"
    cfg.diffusion.block_size, cfg.data.seq_len = BLOCK, L
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = tp, pp
    init_distributed(cfg)
    shape = LlamaShape.from_hf_config(hf_config)
    full = hf_to_megabd3(hf_sd, shape)
    model = build_model(cfg, V, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_full_state_dict(model, full)
    gathered = gather_full_state_dict(model)
    res: dict = {"layout": (tied, tp, pp), "gathered": gathered, "hf_back": megabd3_to_hf(gathered, shape)}

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V - 1, (MB, L), generator=gen)
    xt = torch.where(torch.rand(MB, L, generator=gen) < 0.5, V - 1, x0)
    pos = torch.arange(L)[None].expand(MB, L)
    causal = {"input_ids": x0, "position_ids": pos, "attn": AttentionSpec("causal", L), "target": x0}
    bd3 = {"input_ids": torch.cat([xt, x0], 1), "position_ids": torch.cat([pos, pos], 1),
           "attn": AttentionSpec("bd3", L, BLOCK), "logits_range": (0, L), "target": x0}

    def ce(logits: torch.Tensor, batch: dict):  # noqa: ANN202
        # megatron's vocab-parallel CE works in place on its input: give it a copy
        loss = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().clone(),
                                            batch["target"].t().contiguous()).mean()
        return loss, {"loss": loss, "logits": _gather_vocab(logits)[..., :V]}

    model.eval()
    logs = pipeline_forward_backward(model, iter([causal]), 1, ce, forward_only=True,
                                     seq_length=stage_seq_length(model, L), micro_batch_size=MB)
    if ps.is_pipeline_last_stage():
        res["causal"] = logs[0]["logits"]
    model.train()
    logs = pipeline_forward_backward(model, iter([bd3]), 1, ce, forward_only=False,
                                     seq_length=stage_seq_length(model, 2 * L), micro_batch_size=MB)
    res["ce_grad_norm"] = _grad_norm(model)
    if ps.is_pipeline_last_stage():
        res["bd3"], res["ce_loss"] = logs[0]["logits"], float(logs[0]["loss"])
    for _, _, p in named_global_params(model):  # gradients as a "state dict", gathered like weights
        p.data.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
        p.grad = None
    res["ce_grads"] = gather_full_state_dict(model)

    if pp == 1:  # one BD3-objective training step (forward + backward) from the same weights
        load_full_state_dict(model, full)
        cfg.diffusion.objective = "bd3lm"
        objective = build_objective(cfg, V - 1, V)
        loss = objective(model, x0, torch.Generator().manual_seed(3), train=True).loss
        loss.backward()
        res["obj_loss"], res["obj_grad_norm"] = float(loss), _grad_norm(model)
        for _, _, p in named_global_params(model):
            p.grad = None
    return res


def main() -> None:
    inp, out_path = torch.load(sys.argv[1]), sys.argv[2]
    hf_config = transformers.LlamaConfig(**inp["hf_config"])
    results = []
    for tied, tp, pp in inp["layouts"]:
        hf_config.tie_word_embeddings = tied
        res = run_layout(hf_config, inp["hf"]["tied" if tied else "untied"], tied, tp, pp, hf_config.vocab_size)
        objs = [None] * dist.get_world_size()
        dist.all_gather_object(objs, res)  # the last stage's logits/loss reach rank 0
        merged = dict(objs[0])
        for o in objs:
            merged.update({k: v for k, v in o.items() if k not in merged})
        results.append(merged)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main()
