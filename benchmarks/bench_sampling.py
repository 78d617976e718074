#!/usr/bin/env python
"""Sampling throughput, measured in one run: KV-cached BD3 sampling on the fast decoding path and on the
megatron path, uncached BD3, AR with and without its cache, and the same cached BD3 sampling on an
earlier revision of megabd3 (issue 13, item 4).

    python benchmarks/bench_sampling.py                          # trained runs/demo (PTB BPE vocabulary)
    python benchmarks/bench_sampling.py --random --vocab 50258   # demo-sized model, GPT-2 vocabulary, random weights
    python benchmarks/bench_sampling.py --length 256 --ar-length 256   # quick

Model: ``--checkpoint`` (default runs/demo, made by tools/quickstart.sh), or with ``--random`` the model
section of ``--config`` with random weights and ``--vocab`` rows. Every path samples the same seed.
Targets at 1024 tokens, block 4: cached BD3 >= 2x the revision before the speed work (``--baseline-rev``,
default 02d0e0c, checked out into a temporary git worktree and timed in a subprocess on the same model,
seed and options; it must give the same tokens), BD3 cached >= 6x uncached, AR cached >= 3x uncached.
"megatron path" is today's sampler with ``MEGABD3_FAST_DECODE=0`` (it keeps the other speed-ups: fused
block stores, no head on stores, preallocated cache, top-k-first nucleus). Its logits differ from the fast
path's by ~1e-6 (folded weights round differently), so a rare near-tie may pick another token. "fixed-shape
cache" is the ring-buffer cache of ``sampling.cuda_graphs``: with ``--device cuda`` its steps are CUDA
graphs; on CPU it runs eagerly and is slower (it attends over every slot). Today's cached run and the
baseline alternate ``--repeats`` times and the fastest of each counts. A short warm-up of each path runs
first; the 1-minute load average is printed before and after (compare ratios only from runs on an idle
machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megabd3.errors import UserError, cli_main  # noqa: E402


def build(config: str, vocab: int, device: str):
    """The model section of ``config`` at TP = PP = 1 with random weights (throughput test models)."""
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


BASELINE = r"""
import dataclasses, json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/benchmarks")
import torch
torch.set_grad_enabled(False)
a = json.loads(sys.argv[2])
from megabd3.sampling.backend import ModelBackend
from megabd3.sampling.block import BD3Sampler
from megabd3.sampling.common import SamplerOptions
if a["random"]:
    from bench_sampling import build
    cfg, model = build(a["config"], a["vocab"], "cpu")
else:
    from megabd3.eval.inference import load_model
    cfg, model, tok = load_model(a["checkpoint"])
o = SamplerOptions(**a["opts"])
def run(opts):
    s = BD3Sampler(ModelBackend(model, opts.vocab_size, opts.window), opts)
    t0 = time.perf_counter(); r = s.sample(1, torch.Generator().manual_seed(0))[0]
    return r, time.perf_counter() - t0
run(dataclasses.replace(o, length=4 * o.block_size))
r, dt = run(o)
print(json.dumps({"wall": dt, "nfe": r.nfe, "tokens": r.tokens}))
"""


def baseline(rev: str, args, opts) -> dict | None:
    """Cached BD3 sampling on revision ``rev`` (git worktree + subprocess); None when it cannot run."""
    import json
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    tree = Path(tempfile.mkdtemp(prefix="megabd3-baseline-")) / "tree"
    add = subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(tree), rev],
                         capture_output=True, text=True)
    if add.returncode != 0:
        print(f"baseline {rev}: not timed ({(add.stderr.strip().splitlines() or ['git worktree failed'])[-1]})")
        return None
    try:
        fields = {k: getattr(opts, k) for k in ("length", "mask_id", "bos_id", "eod_id", "vocab_size", "block_size",
                                                "window", "top_p", "entropy_threshold")}
        a = {"random": args.random, "config": args.config, "vocab": args.vocab, "checkpoint": args.checkpoint,
             "opts": fields}
        env = dict(os.environ, PYTHONPATH=str(tree))
        out = subprocess.run([sys.executable, "-c", BASELINE, str(tree), json.dumps(a)], capture_output=True,
                             text=True, env=env, cwd=str(root))
        if out.returncode != 0:
            print(f"baseline {rev}: not timed ({(out.stderr.strip().splitlines() or ['failed'])[-1]})")
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)


_STATIC: dict = {}  # one fixed-shape backend per (model, window): on CUDA its graphs are captured by the first run


def timed(sampler_cls, model, opts, seed=0, fast: bool = True, static: bool = False):
    from megabd3.model.fast_decode import ENV
    from megabd3.sampling.backend import ModelBackend

    if static:  # the fixed-shape cache: CUDA graphs on a GPU (sampling.cuda_graphs=auto), eager on CPU
        key = (id(model), opts.window)
        if key not in _STATIC:
            _STATIC[key] = ModelBackend(model, opts.vocab_size, opts.window, fixed_shape=True)
        backend, opts = _STATIC[key], dataclasses.replace(opts, cuda_graphs="auto")
    else:
        backend = ModelBackend(model, opts.vocab_size, opts.window)
    os.environ[ENV] = "1" if fast else "0"
    try:
        s = sampler_cls(backend, opts)
        t0 = time.perf_counter()
        res = s.sample(1, torch.Generator(device=model_device(model)).manual_seed(seed))
        sync(model)
        return res[0], time.perf_counter() - t0
    finally:
        os.environ.pop(ENV, None)


def model_device(model) -> torch.device:  # noqa: ANN001
    return next(model.parameters()).device


def sync(model) -> None:  # noqa: ANN001
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo", help="trained checkpoint (ignored with --random)")
    p.add_argument("--random", action="store_true", help="random weights of --config's model with --vocab rows")
    p.add_argument("--config", default="configs/demo.json")
    p.add_argument("--vocab", type=int, default=50258, help="--random: model vocabulary (GPT-2 + mask)")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--ar-length", type=int, default=1024, help="AR tokens to generate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of today's cached BD3 run and the baseline's (the fastest of each counts)")
    p.add_argument("--baseline-rev", default="02d0e0c",
                   help="earlier revision whose cached BD3 sampler is timed for the speed-up ('' skips it)")
    args = p.parse_args(argv)
    from megabd3.sampling.ar import ARSampler
    from megabd3.sampling.block import BD3Sampler
    from megabd3.sampling.common import SamplerOptions

    torch.set_grad_enabled(False)
    if args.random:
        cfg, model = build(args.config, args.vocab, args.device)
        vocab, mask, bos, what = args.vocab, args.vocab - 1, 50256 % args.vocab, f"random weights, vocab {args.vocab}"
    else:
        if not Path(args.checkpoint).exists():
            raise UserError(f"{args.checkpoint} not found: run tools/quickstart.sh first, or pass --random")
        from megabd3.eval.inference import load_model

        cfg, model, tok = load_model(args.checkpoint, device=args.device)
        vocab, mask, bos, what = tok.model_vocab_size, tok.mask_id, tok.bos_id, f"{args.checkpoint}, vocab {tok.model_vocab_size}"
    print(f"model: {cfg.model.name} d{cfg.model.hidden_size}/{cfg.model.num_heads}h/{cfg.model.num_layers}L ({what}), "
          f"threads {torch.get_num_threads()}")
    o = SamplerOptions(length=args.length, mask_id=mask, bos_id=bos, eod_id=-1, vocab_size=vocab,
                       block_size=args.block, window=args.length, top_p=0.9,
                       entropy_threshold=0.0,  # no low-entropy retries: a retry would time a different amount of work
                       cuda_graphs="off")  # the fixed-shape/graph cache has its own row
    oa = dataclasses.replace(o, length=args.ar_length, block_size=1, window=args.ar_length)
    # warm-up (one-time costs: lazy imports, rope tables, allocator) charged to no path
    for opts, cls in ((dataclasses.replace(o, length=4 * args.block), BD3Sampler), (dataclasses.replace(oa, length=8), ARSampler)):
        for kv, fast in ((True, True), (True, False), (False, True)):
            timed(cls, model, dataclasses.replace(opts, kv_cache=kv), fast=fast)
        timed(cls, model, opts, static=True)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
    print("| sampler | tokens | NFE | cache fills | wall s | tokens/s | ms/NFE |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)

    def row(name, r, dt):  # printed as soon as measured: the uncached runs are the slow ones
        print(f"| {name} | {r.length - 1} | {r.nfe} | {r.cache_forwards} | {dt:.2f} | {(r.length - 1) / dt:.1f} "
              f"| {1e3 * dt / max(r.nfe, 1):.2f} |", flush=True)

    # today's cached run and the baseline alternate, fastest of --repeats each: this VM's speed drifts by
    # +-20 % over minutes, so two runs minutes apart compare the machine, not the code
    use_base = bool(args.baseline_rev) and args.device == "cpu"
    t_f, t_st, base = float("inf"), float("inf"), None
    for _ in range(max(args.repeats, 1)):
        fast, t = timed(BD3Sampler, model, o, fast=True)
        t_f = min(t_f, t)
        stat, t = timed(BD3Sampler, model, o, static=True)
        t_st = min(t_st, t)
        if use_base:
            b = baseline(args.baseline_rev, args, o)
            if b is not None and (base is None or b["wall"] < base["wall"]):
                base = b
    row(f"bd3 cached, fast decode (fastest of {max(args.repeats, 1)})", fast, t_f)
    row("bd3 cached, fixed-shape cache" + (" + CUDA graphs (captured by the first repeat)" if args.device.startswith("cuda")
                                           else " (eager on CPU)") + f" (fastest of {max(args.repeats, 1)})", stat, t_st)
    slow, t_s = timed(BD3Sampler, model, o, fast=False)
    row("bd3 cached, megatron path", slow, t_s)
    unc, t_u = timed(BD3Sampler, model, dataclasses.replace(o, kv_cache=False))
    row("bd3 uncached", unc, t_u)
    ar_c, t_ac = timed(ARSampler, model, oa)
    row("ar cached, fast decode", ar_c, t_ac)
    ar_u, t_au = timed(ARSampler, model, dataclasses.replace(oa, kv_cache=False))
    row("ar uncached", ar_u, t_au)
    if base is not None:
        print(f"| bd3 cached, revision {args.baseline_rev} (fastest of {max(args.repeats, 1)}) | {args.length - 1} "
              f"| {base['nfe']} | - | {base['wall']:.2f} "
              f"| {(args.length - 1) / base['wall']:.1f} | {1e3 * base['wall'] / max(base['nfe'], 1):.2f} |")
        print(f"bd3 cached: today / revision {args.baseline_rev}: {base['wall'] / t_f:.2f}x (target >= 2x); "
              f"same tokens: {base['tokens'] == fast.tokens}")
    print(f"bd3 cached: fast decode / megatron path (both with today's other speed-ups): {t_s / t_f:.2f}x; "
          f"same tokens: {fast.tokens == slow.tokens}")
    print(f"bd3 cached: fixed-shape cache / plain cache: {t_f / t_st:.2f}x; same tokens: {stat.tokens == fast.tokens}")
    print(f"bd3 cached / uncached at {args.length} tokens: {t_u / t_f:.2f}x (target >= 6x); same tokens: {fast.tokens == unc.tokens}")
    print(f"ar cached / uncached at {args.ar_length} tokens: {t_au / t_ac:.2f}x (target >= 3x); same tokens: {ar_c.tokens == ar_u.tokens}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min; timings are only comparable on an idle machine)")


if __name__ == "__main__":
    main()
