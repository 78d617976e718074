"""fwd+bwd time of the tiled (and on GPU flex) BD3 attention vs the dense SDPA reference.

    python benchmarks/bench_attention.py [--heads 12 --head-dim 64 --repeats 3]

Prints one row per (2L, block size) with the median of ``--repeats`` timed runs after a warm-up,
and the dense/tiled ratio (target >= 2.5 at 2L = 2048, B = 16 on CPU).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.model.attention import attend


def _time(fn, repeats: int, cuda: bool) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=128)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = ["dense", "tiled"] + (["flex"] if cuda else [])
    print(f"device={dev} threads={torch.get_num_threads()} heads={args.heads} head_dim={args.head_dim} "
          f"tile={args.tile} dtype={dtype}")
    print(f"{'2L':>5} {'batch':>5} {'B':>4} " + " ".join(f"{b + ' ms':>10}" for b in backends)
          + f" {'dense/tiled':>11}" + (f" {'dense/flex':>10}" if cuda else ""))
    for two_l, batch in ((2048, 1), (256, 8)):
        L = two_l // 2
        for B in (4, 16, 128):
            spec = AttentionSpec("bd3", L, B)
            q, k, v = (torch.randn(batch, args.heads, two_l, args.head_dim, device=dev, dtype=dtype,
                                   requires_grad=True) for _ in range(3))
            g = torch.randn_like(q)
            ms = {}
            for be in backends:
                def step(be=be):  # noqa: ANN001, ANN202
                    out = attend(q, k, v, spec, be, tile=args.tile)
                    torch.autograd.grad(out, (q, k, v), g)
                ms[be] = 1e3 * _time(step, args.repeats, cuda)
            row = f"{two_l:>5} {batch:>5} {B:>4} " + " ".join(f"{ms[b]:>10.1f}" for b in backends)
            row += f" {ms['dense'] / ms['tiled']:>10.2f}x"
            if cuda:
                row += f" {ms['dense'] / ms['flex']:>9.2f}x"
            print(row, flush=True)


if __name__ == "__main__":
    main()
