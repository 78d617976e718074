#!/usr/bin/env python
"""Tokens/s of KV-cached vs uncached BD3-LM sampling (and AR with/without its cache), one run.

    python benchmarks/bench_sampling.py                      # demo model, 1024 tokens, block 16
    python benchmarks/bench_sampling.py --length 256 --quick

The model is configs/demo.json's model section with random weights (throughput does not depend on the
weights), GPT-2 vocabulary size. Both paths sample the same seed and must give the same tokens
(checked and reported). Target: cached >= 5x uncached at 1024 tokens, block 16. A two-block warm-up
of each path runs first, and the 1-minute load average is printed before and after (the machine is
shared: compare ratios only from runs on an idle machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megabd3.errors import cli_main  # noqa: E402


def build(config: str, vocab: int, device: str):
    from megabd3.config.load import load_config
    from megabd3.model.transformer import build_model
    from megabd3.parallel.init import init_distributed

    cfg = load_config(config, ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.zero_stage=0",
                               "parallel.precision=fp32"])
    init_distributed(cfg)
    model = build_model(cfg, vocab).to(device).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return cfg, model


def timed(sampler_cls, model, opts, seed=0):
    from megabd3.sampling.backend import ModelBackend

    s = sampler_cls(ModelBackend(model, opts.vocab_size, opts.window), opts)
    t0 = time.perf_counter()
    res = s.sample(1, torch.Generator().manual_seed(seed))
    dt = time.perf_counter() - t0
    return res[0], dt


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.json")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50258, help="model vocabulary (GPT-2 + mask)")
    p.add_argument("--ar-length", type=int, default=256, help="AR tokens to generate")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from megabd3.sampling.ar import ARSampler
    from megabd3.sampling.block import BD3Sampler
    from megabd3.sampling.common import SamplerOptions

    torch.set_grad_enabled(False)
    cfg, model = build(args.config, args.vocab, args.device)
    print(f"model: {cfg.model.name} d{cfg.model.hidden_size}/{cfg.model.num_heads}h/{cfg.model.num_layers}L, "
          f"vocab {args.vocab}, backend {cfg.model.attention_backend}, threads {torch.get_num_threads()}")
    o = SamplerOptions(length=args.length, mask_id=args.vocab - 1, bos_id=50256 % args.vocab, eod_id=-1,
                       vocab_size=args.vocab, block_size=args.block, window=args.length, top_p=0.9)
    # warm-up (one-time costs: lazy imports, mask/plan caches, allocator) charged to neither path
    warm = dataclasses.replace(o, length=2 * args.block)
    for kv in (True, False):
        timed(BD3Sampler, model, dataclasses.replace(warm, kv_cache=kv))
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
    print("| sampler | tokens | NFE | cache fills | wall s | tokens/s |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)

    def row(name, r, dt):  # printed as soon as measured: the uncached run is the slow one
        print(f"| {name} | {r.length - 1} | {r.nfe} | {r.cache_forwards} | {dt:.2f} | {(r.length - 1) / dt:.1f} |", flush=True)

    cached, t_c = timed(BD3Sampler, model, o)
    row("bd3 cached", cached, t_c)
    uncached, t_u = timed(BD3Sampler, model, dataclasses.replace(o, kv_cache=False))
    row("bd3 uncached", uncached, t_u)
    oa = dataclasses.replace(o, length=args.ar_length, block_size=1)
    ar_c, t_ac = timed(ARSampler, model, oa)
    row("ar cached", ar_c, t_ac)
    ar_u, t_au = timed(ARSampler, model, dataclasses.replace(oa, kv_cache=False))
    row("ar uncached", ar_u, t_au)
    print(f"bd3 cached/uncached speed-up: {t_u / t_c:.2f}x (target >= 5x); same tokens: {cached.tokens == uncached.tokens}")
    print(f"ar cached/uncached speed-up: {t_au / t_ac:.2f}x; same tokens: {ar_c.tokens == ar_u.tokens}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min; timings are only comparable on an idle machine)")


if __name__ == "__main__":
    main()
