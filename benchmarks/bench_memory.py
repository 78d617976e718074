"""Per-rank training-state memory of ZeRO-0 vs ZeRO-3 on 2 ranks, measured from the real engine, and
tokens/s of the demo model per rank.

    python benchmarks/bench_memory.py [--config configs/demo.json] [--steps 4] [--nproc 2] [--set data.tokenizer=gpt2]
    (the demo config now uses the quickstart's 2048-entry BPE, data/demo/tok_ptb; --set data.tokenizer=gpt2 gives the
    50k-vocabulary figure of earlier notes)

Re-launches itself under torchrun (gloo on CPU). For each ZeRO stage every rank builds the real BD3
model + DeepSpeed engine of the config, takes one optimizer step (so AdamW states exist), runs one more
backward (so gradients exist) and counts the bytes of the tensors *this rank holds*:

* parameters: ZeRO-3 -> `param.ds_tensor` (the rank's partition) plus the full tensor of parameters
  ZeRO-3 keeps persistent (below `stage3_param_persistence_threshold`); otherwise `param.data`;
* gradients: ZeRO-3 -> the optimizer's flat gradient-partition buffer; otherwise `param.grad`;
* optimizer: every tensor in the torch AdamW state (exp_avg, exp_avg_sq, step) plus fp32 master
  copies the ZeRO optimizer keeps (its param_groups' tensors that are not the model's storage).

Target: ZeRO-3 total <= 0.55 x ZeRO-0 total on 2 ranks. Then it times `--steps` optimizer steps per
stage (synthetic token ids: throughput does not depend on the text) and prints tokens/s per rank.

Before launching, the parent process runs the `--dry-run` planner (megabd3.training.dryrun: the real model
built on a fake process group of `--nproc` ranks, DeepSpeed's ZeRO accounting) for the same config and
stages; rank 0 prints its estimate next to the measurement. Target: params+grads+optimizer within 15%.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 0.55
ESTIMATE_TOLERANCE = 0.15
ESTIMATE_ENV = "MEGABD3_BENCH_ESTIMATE"
STAGES = (0, 3)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.json")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per ZeRO stage")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args()


def tensor_bytes(t) -> int:  # type: ignore[no-untyped-def]
    return t.numel() * t.element_size()


def measure(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Bytes of parameters, gradients and optimizer state held by this rank (after a backward)."""
    from megabd3.training.engine import inner_optimizer

    params = list(engine.module.parameters())
    zero3 = engine.zero_optimization_stage() == 3
    p_bytes, owned = 0, set()
    for p in params:
        if zero3:
            p_bytes += tensor_bytes(p.ds_tensor)
            owned.add(p.ds_tensor.untyped_storage().data_ptr())
            if getattr(p, "ds_persist", False):  # small params ZeRO-3 keeps whole on every rank
                p_bytes += tensor_bytes(p.data)
        else:
            p_bytes += tensor_bytes(p.data)
            owned.add(p.data.untyped_storage().data_ptr())
    if zero3:
        buf = engine.optimizer.grad_partitions_flat_buffer
        g_bytes = tensor_bytes(buf) if buf is not None else 0
    else:
        g_bytes = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
    opt = inner_optimizer(engine)
    o_bytes, seen = 0, set()
    for state in opt.state.values():
        for v in state.values():
            if hasattr(v, "numel") and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                o_bytes += tensor_bytes(v)
    for group in opt.param_groups:  # fp32 master partitions (not the model's own storage)
        for t in group["params"]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in owned and ptr not in seen:
                seen.add(ptr)
                o_bytes += tensor_bytes(t)
    return {"params": p_bytes, "grads": g_bytes, "optimizer": o_bytes, "total": p_bytes + g_bytes + o_bytes}


def synthetic_ids(tok, shape: tuple[int, int]):  # type: ignore[no-untyped-def]
    """Random token ids that never hit the mask id: with a tokenizer whose mask is an ordinary id (the
    demo BPE's is 3) a masked-looking data token has -inf SUBS logit, the loss is inf and every step is
    skipped -- the optimizer state never materialises."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if tok.mask_id >= tok.vocab_size:  # an appended mask id (GPT-2): every text id is fine
        return torch.randint(0, tok.vocab_size, shape, generator=gen)
    ids = torch.randint(0, tok.vocab_size - 1, shape, generator=gen)
    return ids + (ids >= tok.mask_id).long()  # skip the mask id


def worker(args: argparse.Namespace) -> None:
    from megabd3.training.launch import prepare_environment

    prepare_environment()
    import torch
    import torch.distributed as dist

    from megabd3.config.deepspeed import derive_deepspeed_config
    from megabd3.config.load import load_config
    from megabd3.data.tokenizers import get_tokenizer
    from megabd3.diffusion.objectives import build_objective
    from megabd3.model.transformer import build_model
    from megabd3.parallel.init import init_distributed
    from megabd3.training.engine import Stepper, build_engine
    from megabd3.training.rng import seed_everything

    base = load_config(args.config, args.set)
    layout = init_distributed(base)
    tok = get_tokenizer(base.data.tokenizer)
    vocab = tok.model_vocab_size
    mb, L = base.training.micro_batch_size, base.data.seq_len
    results = {}
    for zero in STAGES:
        cfg = load_config(args.config, stage_overrides(args, zero))
        seed_everything(cfg.training.seed)
        model = build_model(cfg, vocab)
        engine = build_engine(model, cfg, derive_deepspeed_config(cfg, layout.dp), layout.device)
        objective = build_objective(cfg, tok.mask_id, vocab)
        stepper = Stepper(engine, objective, seed=cfg.training.seed, micro_batch_size=mb, grad_accum=1,
                          dp_rank=layout.dp_rank, dp_size=layout.dp, device=layout.device)
        data = synthetic_ids(tok, (mb * layout.dp * (args.steps + 3), L))

        def batches(consumed: int):  # type: ignore[no-untyped-def]
            s = consumed + layout.dp_rank * mb
            yield {"input_ids": data[s:s + mb]}

        gb = mb * layout.dp
        first = stepper.step(batches(0), 0, 0)  # materialise the AdamW states
        if not first.finite:  # a skipped step leaves no optimizer state: the measurement would be wrong
            raise RuntimeError(f"ZeRO-{zero}: the first step's loss is not finite ({first.loss}); nothing to measure")
        engine.train()
        out = objective(stepper.model_fn, data[:mb], stepper.generator(0), train=True)
        engine.backward(out.loss)  # gradients exist (reduced/partitioned) until the next step
        mem = measure(engine)
        engine.step()
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(args.steps):
            stepper.step(batches((i + 2) * gb), (i + 2) * gb, i + 2)
        dist.barrier()
        dt = time.perf_counter() - t0
        results[zero] = dict(mem, tokens_per_s_per_rank=args.steps * mb * L / dt, step_s=dt / args.steps)
        del engine, stepper, model
    if layout.rank == 0:
        mib = 2 ** 20
        print(f"config {args.config}: vocab {vocab}, L {L}, micro batch {mb}/rank, "
              f"{layout.world_size} ranks ({layout.backend}), fp32")
        print(f"{'per rank':<12}{'params':>12}{'grads':>12}{'optimizer':>12}{'total':>12}{'tok/s/rank':>13}{'s/step':>9}")
        for zero, r in results.items():
            print(f"ZeRO-{zero:<7}" + "".join(f"{r[k] / mib:>10.2f}Mi" for k in ("params", "grads", "optimizer", "total"))
                  + f"{r['tokens_per_s_per_rank']:>13.1f}{r['step_s']:>9.2f}")
        ratio = results[3]["total"] / results[0]["total"]
        verdict = "OK" if ratio <= TARGET else "ABOVE TARGET"
        print(f"ZeRO-3 / ZeRO-0 per-rank bytes: {ratio:.3f} (target <= {TARGET}): {verdict}")
        estimate = json.loads(os.environ.get(ESTIMATE_ENV, "{}"))
        if estimate:
            print_estimate_vs_measured(estimate, results)
        print("RESULT " + json.dumps({"ratio": ratio, "estimate": estimate,
                                      **{f"zero{z}": r for z, r in results.items()}}))


def stage_overrides(args: argparse.Namespace, zero: int) -> list[str]:
    """The --set list of one ZeRO stage's run (measured and estimated alike)."""
    return [*args.set, f"parallel.zero_stage={zero}", "training.gradient_accumulation=1"]


def estimate(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """The dry-run planner's per-rank bytes for each stage (no process group: runs before torchrun)."""
    import torch

    from megabd3.config.load import load_config
    from megabd3.training.dryrun import plan

    out = {}
    for zero in STAGES:
        rep = plan(load_config(args.config, stage_overrides(args, zero)), args.nproc,
                   target_cuda=torch.cuda.is_available(), trace=False)
        s = rep.roles[0].state  # pp 1 x tp 1: one role
        out[str(zero)] = {"params": s.params, "grads": s.grads, "optimizer": s.optimizer, "total": s.model_states}
    return out


def print_estimate_vs_measured(estimate: dict, results: dict) -> None:
    mib = 2 ** 20
    print(f"dry-run estimate vs measured, per rank (params+grads+optimizer; target within {ESTIMATE_TOLERANCE:.0%}):")
    print(f"{'':<12}{'':<10}{'params':>12}{'grads':>12}{'optimizer':>12}{'total':>12}")
    worst = 0.0
    for zero, r in results.items():
        e = estimate[str(zero)]
        print(f"ZeRO-{zero:<7}{'estimate':<10}" + "".join(f"{e[k] / mib:>10.2f}Mi" for k in ("params", "grads", "optimizer", "total")))
        print(f"{'':<12}{'measured':<10}" + "".join(f"{r[k] / mib:>10.2f}Mi" for k in ("params", "grads", "optimizer", "total")))
        err = abs(e["total"] - r["total"]) / r["total"]
        worst = max(worst, err)
        print(f"{'':<12}{'error':<10}{'':>36}{err:>11.1%}")
    print(f"largest estimate error: {worst:.1%} (target <= {ESTIMATE_TOLERANCE:.0%}): "
          f"{'OK' if worst <= ESTIMATE_TOLERANCE else 'ABOVE TARGET'}")


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    env[ESTIMATE_ENV] = json.dumps(estimate(args))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", "--master-addr=127.0.0.1",
           "--master-port=29533", __file__, *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
