#!/usr/bin/env python
"""Evaluate a checkpoint: test perplexity, Var. NELBO, zero-shot perplexity, generative perplexity.

    # test PPL (EMA weights; NELBO bound for diffusion, exact NLL for AR) + Var. NELBO + zero-shot
    python launchers/evaluate.py --checkpoint runs/owt_bd3_l16 --zero-shot data/ptb/ptb_test
    # generative perplexity of a samples file under a judge causal LM (local dir or Hub name)
    python launchers/evaluate.py --samples samples/bd3.jsonl --judge ~/.cache/megabd3/judge/smollm2-135m
    # zero-variance test PPL of a BD3-LM with blocks of <= 8 tokens (2^B - 1 forwards per batch)
    python launchers/evaluate.py --checkpoint runs/demo --split valid --likelihood exact

--likelihood (megabd3.eval.exact_nelbo): ``mc`` (default) is the Monte Carlo NELBO as before (one t per
(sequence, block)); ``exact`` enumerates the 2^B - 1 masks of a block (B <= 8, time-agnostic models);
``stratified`` draws masks stratified over the masked count k with antithetic pairs (any B). Each result
reports ``nelbo_se`` / ``ppl_se`` (0 for exact; for mc a conservative between-block approximation) and
``forward_passes``. AR's NLL is exact whatever the choice.

Perplexities run in one process (data-parallel rank 0, so the t draws use ``--seed`` as is). The test
split reports ``var_nelbo`` (honest loglinear U[eps, 1]) and ``var_nelbo_train`` (the run's training
schedule on the clip interval saved in the checkpoint: the paper's Var. NELBO). Zero-shot sets are
always framed ``[BOS] + L-2 tokens + [EOS]`` (the reference's), stated per dataset in ``framing``.
``weights`` names the weights actually loaded (``raw`` when model.pt holds no EMA).

Results go to ``--out`` as JSON plus a markdown table beside it (``.md``), and are printed.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__import__("megabd3.quiet").quiet.install()  # known third-party noise off before megatron/deepspeed import

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
    p.add_argument("--likelihood", default="mc", choices=["exact", "stratified", "mc"],
                   help="NELBO estimator: mc (today's, one t per block), exact (enumerate masks, B <= 8), stratified")
    p.add_argument("--likelihood-units", type=int, default=2,
                   help="stratified: independent antithetic units per (sequence, block); forwards/batch = 2*units*(B-1)+1")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--unigram-baseline", action="store_true",
                   help="also report the unigram PPL of the evaluated split under the training split's token frequencies")
    return p.parse_args(argv)


def perplexities(args, loaded) -> dict:
    """Test-split PPL with both Var. NELBOs, and zero-shot PPL framed as the reference frames it."""
    from megabd3.eval.exact_nelbo import check_supported, evaluate_prefix_likelihood
    from megabd3.eval.nelbo import training_objective
    from megabd3.eval.zeroshot import dataset_name

    cfg, tok = loaded.cfg, loaded.tokenizer
    seed = cfg.training.seed if args.seed is None else args.seed
    fn = loaded.model  # BD3Transformer.forward is the model_fn
    check_supported(cfg, args.likelihood, units=args.likelihood_units)  # before any data is read: fail fast
    lik = {"likelihood": args.likelihood, "units": args.likelihood_units}
    out = {}
    if not args.no_ppl:
        prefix = args.prefix or getattr(cfg.data, f"{args.split}_prefix")
        if not prefix:
            raise UserError(f"data.{args.split}_prefix is empty in the checkpoint config: pass --prefix or --set data.{args.split}_prefix=...")
        name = dataset_name(prefix) if args.prefix else args.split
        # Var. NELBO under the run's own schedule on the interval it was training with at this step
        train_obj = training_objective(cfg, tok.mask_id, tok.model_vocab_size, interval=loaded.clip_interval,
                                       progress=loaded.step / max(cfg.training.steps, 1))
        mc = {"var_nelbo": cfg.eval.var_nelbo, "train_objective": train_obj} if args.likelihood == "mc" else {}
        out[name] = evaluate_prefix_likelihood(cfg, fn, prefix, tok, seed=seed, progress=not args.no_progress,
                                               **lik, **mc)
        if cfg.eval.var_nelbo and args.likelihood == "mc":
            out[name]["var_nelbo_train_interval_source"] = ("checkpoint train state" if loaded.clip_interval is not None
                                                            else "config (no train state in the checkpoint)")
    zs = cfg.eval.zero_shot_prefixes if args.zero_shot is None else args.zero_shot
    for prefix in zs:
        out[f"zero-shot:{dataset_name(prefix)}"] = evaluate_prefix_likelihood(cfg, fn, prefix, tok, seed=seed, zero_shot=True,
                                                                             progress=not args.no_progress, **lik)
    return out


def unigram(args, cfg, tok) -> dict:
    """The unigram PPL of the evaluated split, side by side with the model's (a model must beat it)."""
    from megabd3.eval.baselines import unigram_baseline

    prefix = args.prefix or getattr(cfg.data, f"{args.split}_prefix")
    if not cfg.data.train_prefix or not prefix:
        raise UserError("--unigram-baseline needs data.train_prefix and the evaluated split's prefix in the config")
    return unigram_baseline(cfg.data.train_prefix, prefix, tok.model_vocab_size)


def weights_record(loaded) -> dict:
    """What was evaluated: the weights actually loaded, not the ones asked for."""
    rec = {"weights": loaded.weights}
    if loaded.weights == "hf":
        rec["weights_note"] = "a Hugging Face export: the weights chosen at export (--weights ema|live, see its README.md)"
    if loaded.ema_requested and loaded.weights != "ema":
        rec["weights_note"] = "eval.use_ema is true but model.pt holds no EMA weights (training.ema = 0): raw weights evaluated"
    return rec


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


def likelihood_line(name: str, m: dict) -> str:
    """One console line: estimator, PPL +- standard error, forward passes."""
    se = m.get("ppl_se", float("nan"))
    extra = f", PPL at t >= {m['sampling_eps']:g} (the mc target) {m['ppl_at_sampling_eps']:.4f}" if "ppl_at_sampling_eps" in m else ""
    return (f"{name}: likelihood={m.get('likelihood', 'mc')} PPL {m['ppl']:.4f} +- {se:.4f} (SE; NELBO/token "
            f"{m['nelbo']:.5f} +- {m.get('nelbo_se', float('nan')):.5f}), {m.get('forward_passes', '?')} forward passes "
            f"({m.get('forward_passes_per_batch', '?')} per batch x {m.get('batches', '?')} batches){extra}")


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
        from megabd3.eval.inference import load_checkpoint_model, output_location

        loaded = load_checkpoint_model(args.checkpoint, args.overrides, args.tokenizer, device=args.device)
        cfg, tok = loaded.cfg, loaded.tokenizer
        results["objective"] = cfg.diffusion.objective
        results["block_size"] = cfg.diffusion.block_size
        results.update(weights_record(loaded))
        results["step"] = loaded.step
        results["perplexity"] = perplexities(args, loaded)
        if args.unigram_baseline:
            results["baseline"] = unigram(args, cfg, tok)
    elif args.overrides:
        raise UserError("--set needs --checkpoint (the config comes from the checkpoint)")
    if args.samples:
        results["gen_ppl"] = generative(args, cfg, tok)
    out = args.out
    if not out:
        if args.checkpoint:
            run_dir, tag = output_location(args.checkpoint, args.overrides)
            out = str(run_dir / "eval" / f"results_{tag}.json")
        else:
            out = str(Path(args.samples).with_suffix(".genppl.json"))
    path = write_results(results, out)
    print(results_markdown(results))
    for name, m in results.get("perplexity", {}).items():  # the estimator, its error and its cost
        print(likelihood_line(name, m))
    if "baseline" in results:
        model_ppl = next(iter(results["perplexity"].values()))["ppl"]
        base = results["baseline"]["unigram_ppl"]
        verdict = "below" if model_ppl < base else "NOT below"
        print(f"{args.split} PPL {model_ppl:.1f} vs unigram baseline {base:.1f}: the model is {verdict} the unigram baseline")
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
