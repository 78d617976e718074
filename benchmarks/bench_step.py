"""Tokens/s of a full BD3 forward+backward of the tiny model, with the output head on the x_t half
only (``logits_range=(0, L)``) vs on all 2L positions (what the reference does).

    python benchmarks/bench_step.py [--seq-len 1024 --batch 2 --block 16 --vocab 50258 --steps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megabd3.config.schema import Config
from megabd3.diffusion.masks import AttentionSpec
from megabd3.model.transformer import build_model
from megabd3.parallel.init import init_distributed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50258)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    cfg = Config()  # tiny: d256, 8 heads, 8 layers
    cfg.model.attention_backend = args.backend
    init_distributed(cfg)
    model = build_model(cfg, args.vocab).train()
    L, b = args.seq_len, args.batch
    ids = torch.randint(0, args.vocab, (b, 2 * L))
    pos = torch.arange(L).repeat(2)[None].expand(b, -1)
    target = torch.randint(0, args.vocab, (b, L))
    spec = AttentionSpec("bd3", L, args.block)
    print(f"tiny model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), L={L}, batch={b}, "
          f"block={args.block}, vocab={args.vocab}, backend={args.backend}, threads={torch.get_num_threads()}")
    for name, rng in (("x_t-only head", (0, L)), ("head on all 2L", None)):
        def step() -> None:
            logits = model(ids, pos, spec, logits_range=rng)[:, :L]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"{name:>16}: {t * 1e3:8.1f} ms/step  {b * L / t:9.1f} tokens/s (sequence tokens L per sample)")


if __name__ == "__main__":
    main()
