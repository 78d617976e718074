#!/usr/bin/env python
"""The quality-speed curve of parallel decoding inside BD3 blocks, on a trained checkpoint.

    python benchmarks/bench_decoding.py                                  # runs/demo, 8 samples each
    python benchmarks/bench_decoding.py --checkpoint runs/owt_bd3_l16 --num-samples 64 --length 1024 \
        --judge ~/.cache/megabd3/judge/gpt2-large --taus 0.5 0.7 0.8 0.9 0.95 0.99 --topk 2 4

For first hitting (one token per denoising call), threshold decoding at each tau (reveal every masked
position whose top probability -- of the untruncated SUBS distribution, before top-p -- exceeds tau, at
least the most confident one; the tokens are nucleus draws at sampling.top_p) and optionally
top-k-per-step, it samples the same number of sequences with the same seed and reports: NFE per sample
(denoising forwards; cache fills are separate and listed), NFE per generated token, tokens/s (wall
clock of the sampling batches only), Gen PPL under the judge (the samples are decoded
with the run's tokenizer and re-tokenised by the judge, exactly as ``launchers/evaluate.py --samples``
does; pooled = exp(total NLL / scored tokens)) and the mean unigram entropy (nats) of the generated
token ids. Every row records top_p and the nucleus rule next to tau. It prints a markdown table and
writes the rows as JSON plus a plot (Gen PPL and tokens/s against NFE per token). One short warm-up
batch runs first so no strategy pays one-time costs.

Timing: the strategies run ``--repeats`` times (default 2), interleaved (all strategies, then all
again), and each reports its fastest repeat, so slow drift of the machine's load hits every strategy
alike. The repeats draw identical samples (same seed; checked), so quality is judged once.

A block costs at least one denoising call, so NFE per token cannot go below 1/B (B = the block size;
0.25 for the demo's block of 4); the table says so next to the threshold rows. The defaults (demo
model, block 4, 8 x 128 tokens, 2 repeats, judge) took about 1 minute on two shared CPU cores, well
within 5. Tokens/s depends on the machine's load: compare strategies from one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__import__("megabd3.quiet").quiet.install()  # known third-party noise off before megatron/deepspeed import

from megabd3.errors import UserError, cli_main  # noqa: E402

DEFAULT_JUDGE = "~/.cache/megabd3/judge/smollm2-135m"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo", help="run dir, checkpoints/ or a step_* dir (BD3-LM or MDLM)")
    p.add_argument("--num-samples", type=int, default=8, help="samples per strategy")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=0, help="tokens per sample incl. BOS (default: the run's sampling.length)")
    p.add_argument("--taus", type=float, nargs="*", default=[0.5, 0.7, 0.9, 0.95], help="thresholds to run")
    p.add_argument("--topk", type=int, nargs="*", default=[2], help="tokens_per_step values to run (none: skip)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed passes over all strategies, interleaved; "
                   "each strategy reports its fastest")
    p.add_argument("--judge", default=DEFAULT_JUDGE, help="judge causal LM (local dir or Hub name)")
    p.add_argument("--no-judge", action="store_true", help="skip Gen PPL (speed and entropy only)")
    p.add_argument("--out", default="", help="results json (default <run_dir>/eval/decoding_bench.json); the plot goes next to it")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config override (e.g. sampling.top_p=1.0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.repeats < 1:
        raise UserError(f"--num-samples={args.num_samples}, --batch-size={args.batch_size} and "
                        f"--repeats={args.repeats} must be >= 1")
    return args


def strategies(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The runs: first hitting, then threshold per tau, then top-k per k (config fields to set)."""
    runs: List[Dict[str, Any]] = [{"name": "first_hitting", "strategy": "first_hitting"}]
    runs += [{"name": f"threshold tau={t:g}", "strategy": "threshold", "threshold": t} for t in args.taus]
    runs += [{"name": f"topk k={k}", "strategy": "topk_per_step", "tokens_per_step": k} for k in args.topk]
    return runs


def with_sampling(cfg: Any, **fields: Any) -> Any:
    return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, **fields))


def sample(cfg: Any, model: Any, tok: Any, run: Dict[str, Any]) -> List[Dict[str, Any]]:
    from megabd3.sampling.run import generate_samples

    fields = {k: v for k, v in run.items() if k != "name"}
    return generate_samples(with_sampling(cfg, **fields), model, tok, progress=False, decode=False)


def measure(cfg: Any, rows: List[Dict[str, Any]], tok: Any, run: Dict[str, Any], judge: Any) -> Dict[str, Any]:
    """One strategy's record from its samples (tokens/s from these rows' batch wall times)."""
    from megabd3.eval.genppl import gen_ppl
    from megabd3.sampling.run import summarize

    fields = {k: v for k, v in run.items() if k != "name"}
    s = summarize(rows)
    tokens = sum(r["length"] - 1 for r in rows)
    rec: Dict[str, Any] = {
        "name": run["name"], **fields,
        "top_p": cfg.sampling.top_p, "nucleus": cfg.sampling.nucleus,
        "num_samples": len(rows),
        "mean_length": s["mean_length"],
        "mean_nfe": s["mean_nfe"],
        "nfe_per_token": sum(r["nfe"] for r in rows) / max(tokens, 1),
        "mean_cache_forwards": s["mean_cache_forwards"],
        "tokens_per_s": s["tokens_per_s"],
        "tokens_per_s_repeats": [s["tokens_per_s"]],
        "unigram_entropy": s["mean_entropy"],
    }
    if judge is not None:
        jmodel, jtok, name, context, stride = judge
        g = gen_ppl([r["tokens"] for r in rows], tok, jmodel, jtok, context=context, stride=stride, judge_name=name,
                    progress=False)
        rec.update(gen_ppl=g.pooled_ppl, gen_ppl_mean=g.mean_ppl, judge_entropy=g.mean_entropy)
    return rec


def decode_block(cfg: Any) -> int:
    """Tokens one denoising loop covers: the BD3 block, or MDLM's window (its semi-AR stride past seq_len)."""
    if cfg.diffusion.objective == "bd3lm":
        return cfg.diffusion.block_size
    L = cfg.data.seq_len
    return cfg.sampling.length if cfg.sampling.length <= L else L // 2


def table(records: List[Dict[str, Any]], block_size: int) -> str:
    fh = records[0]["mean_nfe"]
    lines = ["| strategy | top_p | NFE/sample | NFE/token | NFE vs first hitting | tokens/s | Gen PPL | entropy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        ppl = f"{r['gen_ppl']:.1f}" if "gen_ppl" in r else "-"
        lines.append(f"| {r['name']} | {r['top_p']:g} ({r['nucleus']}) | {r['mean_nfe']:.1f} | "
                     f"{r['nfe_per_token']:.3f} | {r['mean_nfe'] / fh:.2f}x | "
                     f"{r['tokens_per_s']:.1f} | {ppl} | {r['unigram_entropy']:.3f} |")
    if any(r["strategy"] != "first_hitting" for r in records):
        lines.append(f"\nNFE/token of the threshold and top-k rows cannot go below 1/B = {1 / block_size:.3f} "
                     f"(block size B = {block_size}: every block costs at least one denoising call). "
                     f"tokens/s: the fastest of the interleaved repeats.")
    return "\n".join(lines)


def plot(records: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """Gen PPL (if judged) and tokens/s against NFE per token, one labelled point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokens_per_s", "tokens / s")]
    if "gen_ppl" in records[0]:
        panels.insert(0, ("gen_ppl", "Gen PPL (judge)"))
    panels.append(("unigram_entropy", "unigram entropy (nats)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=120)
    for ax, (key, label) in zip(axes, panels):
        thr = [r for r in records if r["strategy"] == "threshold"]
        if thr:
            ax.plot([r["nfe_per_token"] for r in thr], [r[key] for r in thr], "o-", label="threshold", markersize=4)
        for r in records:
            if r["strategy"] != "threshold":
                ax.plot(r["nfe_per_token"], r[key], "s" if r["strategy"] == "first_hitting" else "^", markersize=6,
                        label=r["name"])
            short = r["name"].replace("threshold ", "").replace("first_hitting", "FH")
            ax.annotate(short, (r["nfe_per_token"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("NFE per token")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


@cli_main
def main(argv=None) -> None:
    args = parse(argv)
    import torch

    from megabd3.eval.inference import load_model, output_location
    from megabd3.io import atomic_open

    torch.set_grad_enabled(False)
    overrides = list(args.overrides) + [f"sampling.num_samples={args.num_samples}",
                                        f"sampling.batch_size={args.batch_size}", f"sampling.seed={args.seed}",
                                        "sampling.var_length=false"]
    if args.length:
        overrides.append(f"sampling.length={args.length}")
    cfg, model, tok = load_model(args.checkpoint, overrides, use_ema=not args.no_ema, device=args.device)
    if cfg.diffusion.objective not in ("bd3lm", "mdlm"):
        raise UserError(f"{args.checkpoint} is a diffusion.objective={cfg.diffusion.objective} run: parallel "
                        f"decoding needs a bd3lm or mdlm checkpoint")
    judge = None
    if not args.no_judge:
        from megabd3.eval.genppl import load_judge

        jmodel, jtok = load_judge(args.judge, device=args.device)
        max_pos = getattr(jmodel.config, "max_position_embeddings", None) or cfg.eval.judge_context
        context = min(cfg.eval.judge_context, max_pos)
        judge = (jmodel, jtok, args.judge, context, min(cfg.eval.judge_stride, context - 1))
    s = cfg.sampling
    print(f"checkpoint {args.checkpoint}: {cfg.diffusion.objective} block {cfg.diffusion.block_size}, "
          f"{args.num_samples} samples x {s.length} tokens, batch {args.batch_size}, top_p {s.top_p} ({s.nucleus}), "
          f"seed {args.seed}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    # warm-up: one short batch (lazy imports, allocator, caches) charged to no strategy
    from megabd3.sampling.run import generate_samples

    warm_len = 2 * (cfg.diffusion.block_size if cfg.diffusion.objective == "bd3lm" else s.length // 2 or 1)
    generate_samples(with_sampling(cfg, num_samples=1, batch_size=1, length=min(s.length, warm_len)), model, tok,
                     progress=False, decode=False)
    records: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    runs = strategies(args)
    for rep in range(args.repeats):  # interleaved: load drift hits every strategy alike
        for i, run in enumerate(runs):
            rows = sample(cfg, model, tok, run)
            if rep == 0:
                rec = measure(cfg, rows, tok, run, judge)
                records.append(rec)
                rec["_tokens"] = [r["tokens"] for r in rows]
            else:
                rec = records[i]
                if [r["tokens"] for r in rows] != rec["_tokens"]:
                    raise RuntimeError(f"{run['name']}: repeat {rep} drew other samples than repeat 0 for the "
                                       f"same seed; sampling is not deterministic here, timings are not comparable")
                from megabd3.sampling.run import summarize

                tps = summarize(rows)["tokens_per_s"]
                rec["tokens_per_s_repeats"].append(tps)
                rec["tokens_per_s"] = max(rec["tokens_per_s"], tps)
            ppl = f", Gen PPL {rec['gen_ppl']:.1f}" if "gen_ppl" in rec else ""
            print(f"  [{rep + 1}/{args.repeats}] {rec['name']}: NFE {rec['mean_nfe']:.1f}, "
                  f"{rec['tokens_per_s_repeats'][-1]:.1f} tokens/s{ppl}", flush=True)
    for rec in records:
        del rec["_tokens"]
    print(table(records, decode_block(cfg)))
    fh = records[0]
    for r in records[1:]:
        if r.get("threshold") == 0.9:
            print(f"threshold tau=0.9: NFE {r['mean_nfe']:.1f} vs first hitting {fh['mean_nfe']:.1f} "
                  f"({fh['mean_nfe'] / max(r['mean_nfe'], 1e-9):.2f}x fewer)")
    out = Path(args.out) if args.out else output_location(args.checkpoint, args.overrides)[0] / "eval" / "decoding_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": args.checkpoint, "objective": cfg.diffusion.objective, "block_size": cfg.diffusion.block_size,
        "length": s.length, "num_samples": args.num_samples, "batch_size": args.batch_size, "seed": args.seed,
        "top_p": s.top_p, "nucleus": s.nucleus, "judge": None if args.no_judge else args.judge,
        "repeats": args.repeats, "nfe_per_token_floor": 1 / decode_block(cfg),
        "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0, "results": records,
    }
    with atomic_open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    png = plot(records, out.with_suffix(".png"), f"{args.checkpoint}: {cfg.diffusion.objective} block "
               f"{cfg.diffusion.block_size}, {args.num_samples} x {s.length} tokens, top-p {s.top_p}")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
