#!/usr/bin/env python
"""Evaluate a checkpoint: test perplexity, Var. NELBO, zero-shot perplexity, generative perplexity.

    # test PPL (EMA weights; NELBO bound for diffusion, exact NLL for AR) + Var. NELBO + zero-shot
    python launchers/evaluate.py --checkpoint runs/owt_bd3_l16 --zero-shot data/ptb/ptb_test
    # generative perplexity of a samples file under a judge causal LM (local dir or Hub name)
    python launchers/evaluate.py --samples samples/bd3.jsonl --judge ~/.cache/megabd3/judge/smollm2-135m

Results go to ``--out`` as JSON plus a markdown table beside it (``.md``), and are printed.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.errors import UserError, cli_main  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="run dir, checkpoints/ or a step_* dir (needed for perplexities)")
    p.add_argument("--split", default="test", choices=["test", "valid"], help="split of the run's data for test PPL")
    p.add_argument("--prefix", default="", help="evaluate this preprocessed dataset prefix instead of --split")
    p.add_argument("--zero-shot", nargs="*", default=None, help="extra dataset prefixes (default eval.zero_shot_prefixes)")
    p.add_argument("--no-ppl", action="store_true", help="skip the test-split perplexity")
    p.add_argument("--samples", default="", help="samples jsonl from launchers/sample.py: compute Gen PPL")
    p.add_argument("--judge", default="", help="judge causal LM, local dir or Hub name (default eval.judge_model)")
    p.add_argument("--tokenizer", default=None, help="training tokenizer to decode samples (default: checkpoint's or the samples')")
    p.add_argument("--out", default="", help="results JSON (default <run_dir>/eval/results.json or results.json)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=None, help="seed of the NELBO's t draws (default training.seed)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def perplexities(args, cfg, model, tok) -> dict:
    from megabd3.eval.zeroshot import dataset_name, evaluate_prefix

    seed = cfg.training.seed if args.seed is None else args.seed
    fn = model  # BD3Transformer.forward is the model_fn
    out = {}
    if not args.no_ppl:
        prefix = args.prefix or getattr(cfg.data, f"{args.split}_prefix")
        if not prefix:
            raise UserError(f"data.{args.split}_prefix is empty in the checkpoint config: pass --prefix or --set data.{args.split}_prefix=...")
        name = dataset_name(prefix) if args.prefix else args.split
        out[name] = evaluate_prefix(cfg, fn, prefix, tok, seed=seed, progress=not args.no_progress,
                                    var_nelbo=cfg.eval.var_nelbo)
    zs = cfg.eval.zero_shot_prefixes if args.zero_shot is None else args.zero_shot
    for prefix in zs:
        out[f"zero-shot:{dataset_name(prefix)}"] = evaluate_prefix(cfg, fn, prefix, tok, seed=seed,
                                                                  progress=not args.no_progress)
    return out


def generative(args, cfg, tok) -> dict:
    from megabd3.data.tokenizers import get_tokenizer
    from megabd3.eval.genppl import gen_ppl, load_judge
    from megabd3.sampling.run import read_samples

    rows = read_samples(args.samples)
    judge = args.judge or (cfg.eval.judge_model if cfg is not None else "gpt2-large")
    model, jtok = load_judge(judge, device=args.device)  # first: a bad judge path fails before any other work
    if tok is None:
        name = args.tokenizer or rows[0].get("tokenizer")
        if not name:
            raise UserError(f"{args.samples} does not name its tokenizer: pass --tokenizer or --checkpoint")
        tok = get_tokenizer(name)
    context = cfg.eval.judge_context if cfg is not None else 1024
    stride = cfg.eval.judge_stride if cfg is not None else 512
    res = gen_ppl([r["tokens"] for r in rows], tok, model, jtok, context=context, stride=stride, judge_name=judge,
                  progress=not args.no_progress).to_dict()
    res["mean_nfe"] = sum(r.get("nfe", float("nan")) for r in rows) / len(rows)
    res["samples"] = args.samples
    return res


@cli_main
def main(argv=None) -> None:
    args = parse(argv)
    from pathlib import Path

    from megabd3.eval.report import results_markdown, write_results

    if not args.checkpoint and not args.samples:
        raise UserError("nothing to evaluate: pass --checkpoint (perplexities) and/or --samples (Gen PPL)")
    results: dict = {"checkpoint": args.checkpoint or None}
    cfg = tok = None
    if args.checkpoint:
        from megabd3.eval.inference import inference_config, load_model

        cfg, model, tok = load_model(args.checkpoint, args.overrides, args.tokenizer, device=args.device)
        results["objective"] = cfg.diffusion.objective
        results["block_size"] = cfg.diffusion.block_size
        results["weights"] = "ema" if cfg.eval.use_ema else "raw"
        results["perplexity"] = perplexities(args, cfg, model, tok)
    elif args.overrides:
        raise UserError("--set needs --checkpoint (the config comes from the checkpoint)")
    if args.samples:
        results["gen_ppl"] = generative(args, cfg, tok)
    out = args.out
    if not out:
        if args.checkpoint:
            _, model_file = inference_config(args.checkpoint, args.overrides)
            out = str(model_file.parent.parent.parent / "eval" / f"results_{model_file.parent.name}.json")
        else:
            out = str(Path(args.samples).with_suffix(".genppl.json"))
    path = write_results(results, out)
    print(results_markdown(results))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
