"""fwd+bwd time of the tiled (and on GPU flex) BD3 attention vs the dense SDPA reference.

    python benchmarks/bench_attention.py [--heads 12 --head-dim 64 --repeats 7 --tile 128 --threads N]

For each (2L, block size B) (GPU: 2L = 2048 x 16 and 8192 x 4 sequences) it times one forward + backward of every backend, interleaving the
backends inside each repetition (in a rotating order) so that load from other processes hits them
alike, and prints the median of ``--repeats`` timed runs after one warm-up, the dense/tiled ratio
(target >= 2.5 at 2L = 2048, B = 16 on CPU) and, on GPU, dense/flex (target >= 3). The 1-minute load
average is printed before and after: on a shared machine read the ratios together with it (each row
also gives the ratio of the fastest runs, which noise from other processes can only make worse).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megabd3.diffusion.masks import AttentionSpec
from megabd3.model.attention import attend

SHAPES = ((2048, 1), (256, 8))  # (2L, batch)
GPU_SHAPES = ((2048, 16), (8192, 4))  # the issue-11 acceptance sizes (benchmarks/gpu_acceptance.py)
BLOCKS = (4, 16, 128)


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # not available on every platform
        return "load average n/a"


def _time_interleaved(steps: Dict[str, Callable[[], None]], repeats: int,
                      cuda: bool) -> Dict[str, List[float]]:
    """Seconds of every timed run per step; the backends alternate within each repetition."""
    names = list(steps)
    for name in names:  # warm-up (compilation, caches)
        steps[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[name]()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = ["dense", "tiled"] + (["flex"] if cuda else [])
    print(f"device={dev} threads={torch.get_num_threads()} heads={args.heads} head_dim={args.head_dim} "
          f"tile={args.tile} dtype={dtype} repeats={args.repeats} (median, interleaved)")
    print(f"start: {_load()}")
    print(f"{'2L':>5} {'batch':>5} {'B':>4} " + " ".join(f"{b + ' ms':>10}" for b in backends)
          + f" {'dense/tiled':>11}" + (f" {'dense/flex':>10}" if cuda else ""), flush=True)
    for two_l, batch in (GPU_SHAPES if cuda else SHAPES):
        L = two_l // 2
        for B in BLOCKS:
            if cuda:
                # a fresh compile per shape, as a training process has (one sequence length, batch dim
                # dynamic); also keeps the many shapes here below the flex recompile limit
                torch._dynamo.reset()
            spec = AttentionSpec("bd3", L, B)
            q, k, v = (torch.randn(batch, args.heads, two_l, args.head_dim, device=dev, dtype=dtype,
                                   requires_grad=True) for _ in range(3))
            g = torch.randn_like(q)

            def step(be: str) -> None:
                out = attend(q, k, v, spec, be, tile=args.tile)
                torch.autograd.grad(out, (q, k, v), g)

            runs = _time_interleaved({be: (lambda be=be: step(be)) for be in backends}, args.repeats, cuda)
            sec = {be: statistics.median(t) for be, t in runs.items()}
            best = {be: min(t) for be, t in runs.items()}
            row = f"{two_l:>5} {batch:>5} {B:>4} " + " ".join(f"{1e3 * sec[b]:>10.1f}" for b in backends)
            row += f" {sec['dense'] / sec['tiled']:>10.2f}x"
            if cuda:
                row += f" {sec['dense'] / sec['flex']:>9.2f}x"
            # Noise from other processes only ever adds time: the ratio of the fastest runs is the
            # steadier figure on a loaded machine.
            row += f"   (fastest runs: dense/tiled {best['dense'] / best['tiled']:.2f}x"
            row += f", dense/flex {best['dense'] / best['flex']:.2f}x)" if cuda else ")"
            print(row, flush=True)
    print(f"end:   {_load()}")


if __name__ == "__main__":
    main()
