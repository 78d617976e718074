"""Worker for tests/dist/test_zero3_ema.py::test_streaming_export_tp_pp: TP = 2 x PP = 2 on 4 gloo ranks.

The streaming export (per-tensor gather to the first rank, `to_all=False`) and the every-rank variant
must equal what the pre-streaming code produced (all_gather over TP, all_gather_object of whole stage
dicts over PP), byte for byte once saved. Usage: torchrun --nproc-per-node 4 ... <out_dir>
"""
from __future__ import annotations

import io
import json
from contextlib import nullcontext
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megabd3.config.schema import Config
from megabd3.model.export import VOCAB_ROWS, _tp_info, gather_full_state_dict, named_global_params
from megabd3.model.transformer import build_model
from megabd3.parallel.init import destroy_distributed, init_distributed


def old_gather(model) -> dict:  # noqa: ANN001
    """The pre-streaming implementation (full CPU copy of every stage on every rank)."""
    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    stage = {}
    for name, chunk, p in named_global_params(model):
        t = p.detach()
        is_tp, dim = _tp_info(p)
        if is_tp and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=dim)
        if name in VOCAB_ROWS:
            t = t[: chunk.vocab_size]
        stage[name] = t.cpu().clone()
    gathered = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(gathered, stage, group=ps.get_pipeline_model_parallel_group())
    full = {}
    for part in gathered:
        full.update(part)
    return full


def saved(sd: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def dp_replicas(cfg: Config) -> dict:
    """PP = 2 x DP = 2, bf16 weights exported through an fp32 "master" materializer: only global rank 0
    keeps the dict (replica 1 returns None before any TP/PP traffic), every rank materialises each of its
    parameters exactly once (no dtype probe: the travelling dtype comes from `dtype_of`), and the second
    stage's tensors arrive as fp32."""
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = 1, 2
    init_distributed(cfg)
    model = build_model(cfg, 50, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    with torch.no_grad():
        for i, (_, _, p) in enumerate(named_global_params(model)):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i + 100 * ps.get_pipeline_model_parallel_rank())))
    ref = gather_full_state_dict(model)  # fp32, every rank
    model.to(torch.bfloat16)
    calls = []

    def as_master(name: str, p: torch.nn.Parameter):  # noqa: ANN202
        calls.append(name)
        return nullcontext(p.detach().float())

    sd = gather_full_state_dict(model, to_all=False, materialize=as_master)
    res = {"dp_calls": len(calls), "dp_local": len(list(named_global_params(model))), "dp_none": sd is None}
    if dist.get_rank() == 0:
        res["dp_dtypes"] = sorted({str(t.dtype) for t in sd.values()})
        res["dp_fp32_equal"] = list(sd) == list(ref) and all(
            torch.equal(sd[k], ref[k].bfloat16().float()) for k in ref)
    return res


def main() -> None:
    out = Path(sys.argv[1])
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.cond_dim = 2, 32, 2, 16
    cfg.model.dropout, cfg.model.attention_backend, cfg.model.make_vocab_size_divisible_by = 0.0, "dense", 8
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = 2, 2
    init_distributed(cfg)
    model = build_model(cfg, 50, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    with torch.no_grad():  # distinct values (the real init zeroes the head and adaLN); replicated = same on TP ranks
        for i, (_, _, p) in enumerate(named_global_params(model)):
            seed = i + 100 * ps.get_pipeline_model_parallel_rank() + 1000 * ps.get_tensor_model_parallel_rank() * _tp_info(p)[0]
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    old = old_gather(model)
    stream = gather_full_state_dict(model, to_all=False)
    every = gather_full_state_dict(model)
    res = {"others_none": [stream is None] if dist.get_rank() != 0 else [],
           "every_equal": saved(every) == saved(old)}
    res.update(dp_replicas(cfg))
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, res)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({
            "stream_equal": saved(stream) == saved(old), "keys": len(old),
            "others_none": all(all(r["others_none"]) for r in results),
            "every_equal": all(r["every_equal"] for r in results),
            "dp_fp32_equal": results[0]["dp_fp32_equal"], "dp_dtypes": results[0]["dp_dtypes"],
            "dp_calls": [r["dp_calls"] for r in results], "dp_local": [r["dp_local"] for r in results],
            "dp_none": [r["dp_none"] for r in results]}))
    destroy_distributed()


if __name__ == "__main__":
    main()
