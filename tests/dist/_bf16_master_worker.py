"""Worker for tests/dist/test_zero3_ema.py::test_bf16_*: DeepSpeed bf16 on CPU/gloo with the real BD3
model; checks that model.pt export and the EMA follow the fp32 master weights, not the bf16 copies.
Usage: torchrun ... _bf16_master_worker.py <zero stages, e.g. 0,1,3> <out_dir>  (rank 0 writes result.json:
one entry per stage; the stages run one after another in one launch, each with its own engine)
"""
from __future__ import annotations

from megabd3.training.launch import prepare_environment

prepare_environment()

import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _zero3_worker import V, batch, diff, tiny_cfg  # noqa: E402

from megabd3.config.deepspeed import derive_deepspeed_config  # noqa: E402
from megabd3.model.transformer import build_model  # noqa: E402
from megabd3.parallel.init import init_distributed  # noqa: E402
from megabd3.training import checkpoint as ckpt  # noqa: E402
from megabd3.training.ema import EMA, link_fp32_masters  # noqa: E402
from megabd3.model.export import load_full_state_dict  # noqa: E402
from megabd3.training.engine import build_engine, inner_optimizer, skip_optimizer_step  # noqa: E402
from megabd3.training.zero_init import partitioned_init  # noqa: E402


def set_master_directly(engine, zero: int, p: torch.nn.Parameter, value: torch.Tensor) -> None:  # noqa: ANN001
    """Write `value` into the fp32 master the optimizer steps -- not through the code under test:
    ZeRO-0 via the optimizer's own per-parameter master list, ZeRO-1/2/3 via DeepSpeed's setter
    (its own fragment/partition addressing, communication-free)."""
    from deepspeed.utils import safe_set_full_fp32_param

    if zero > 0:
        safe_set_full_fp32_param(p, value)
        return
    opt = engine.optimizer
    for params, masters in zip(opt.fp16_groups, opt.fp32_groups):  # FP16_UnfusedOptimizer (torch AdamW)
        for q, m in zip(params, masters):
            if q is p:
                m.data.copy_(value.reshape(m.shape))
                return
    raise AssertionError("parameter not in the optimizer's groups")


def run(zero: int, layout) -> dict:  # noqa: ANN001
    cfg = tiny_cfg(zero)
    cfg.parallel.precision = "bf16"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 1
    ds = derive_deepspeed_config(cfg, layout.dp)
    with partitioned_init(cfg, ds):
        model = build_model(cfg, V)
    frozen = [n for n, _ in model.named_parameters() if "final_norm" in n]  # no optimizer state, no master
    assert frozen
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    engine = build_engine(model, cfg, ds, layout.device)
    link_fp32_masters(engine)  # as run_training does
    module = engine.module
    ema = EMA(list(module.parameters()), 0.5)
    res: dict = {"dtype": str(next(module.parameters()).dtype), "kinds": sorted(set(ema.kinds)), "frozen": len(frozen)}

    def step(skip: bool = False) -> None:
        logits = engine(**batch()).float()
        engine.backward(logits.square().mean() + logits[..., 0].mean())  # any loss that moves every weight
        with skip_optimizer_step(inner_optimizer(engine)) if skip else contextlib.nullcontext():
            engine.step()
        ema.update()

    for _ in range(3):  # real AdamW steps: the EMA and every code path see a trained state
        step()
    # the reference: fp32 values that bf16 cannot represent, written into the optimizer's master
    ref = {n: torch.randn(p.ds_shape if hasattr(p, "ds_shape") else p.shape,
                          generator=torch.Generator().manual_seed(50 + i)) * 0.1
           for i, (n, p) in enumerate(module.named_parameters())}
    for n, p in module.named_parameters():
        if n not in frozen:
            set_master_directly(engine, zero, p, ref[n].to(layout.device))
    ema.decay = 0.0  # the next update sets the shadow to exactly what it tracks
    step(skip=True)  # no update; DeepSpeed copies the master into the bf16 module weights
    lowp = ckpt.gather_full_state_dict(module, zero == 3, all_ranks=True,
                                       materialize=lambda _n, p: ckpt._zero3_full(p, zero == 3))
    for n in frozen:  # model.pt and the EMA export carry a frozen parameter's module weights
        ref[n] = lowp[n].float()
    sd = ckpt.gather_full_state_dict(module, zero == 3)
    ema_sd = ckpt.gather_full_state_dict(module, zero == 3, materialize=lambda _n, p: ema.full_shadow(p) if ema.tracks(p)
                                           else ckpt._master_full(p, zero == 3))  # as save_checkpoint
    # EMA evaluation: a shadow different from the live weights, against a plain bf16 model carrying it
    half = {n: t if n in frozen else 0.5 * t for n, t in ref.items()}  # the EMA tracks trainable ones
    ema.load_full(module, half, ema.num_updates)
    plain = build_model(tiny_cfg(0), V)
    load_full_state_dict(plain, half)
    with torch.no_grad():
        expect = plain.to(torch.bfloat16).eval()(**batch()).float()
        live = module(**batch()).float()
        with ema.applied():
            applied = module(**batch()).float()
        back = module(**batch()).float()
    res["ema_applied_vs_plain"], res["ema_applied_vs_live"] = diff(applied, expect), diff(applied, live)
    res["restored"] = diff(back, live)
    # fine-tune start (run.restore_fp32_masters): model.pt's fp32 values go into the master exactly
    from megabd3.training.run import restore_fp32_masters

    quarter = {n: t if n in frozen else 0.25 * t for n, t in ref.items()}
    res["masters_set"] = restore_fp32_masters(engine, quarter) == len(ref) - len(frozen)
    sd_q = ckpt.gather_full_state_dict(module, zero == 3)
    if layout.rank == 0:
        res["restored_master"] = max(diff(sd_q[k], quarter[k]) for k in ref)
        res["model_dtype"] = sorted({str(t.dtype) for k, t in sd.items() if k not in frozen})
        res["frozen_dtype"] = sorted({str(sd[k].dtype) for k in frozen})  # no master: the module's bf16
        res["model_vs_master"] = max(diff(sd[k], ref[k]) for k in ref)
        res["ema_vs_master"] = max(diff(ema_sd[k], ref[k]) for k in ref)
        # the optimizer really steps what we wrote: its copy into the module is the bf16 rounding of ref
        res["module_vs_bf16_master"] = max(diff(lowp[k].float(), ref[k].bfloat16().float()) for k in ref)
        res["bf16_vs_master"] = max(diff(lowp[k].float(), ref[k]) for k in ref)  # > 0: rounding
    return res


def main() -> None:
    stages, out = [int(z) for z in sys.argv[1].split(",")], Path(sys.argv[2])
    cfg = tiny_cfg(0)
    cfg.parallel.precision = "bf16"
    layout = init_distributed(cfg)
    results = {str(z): run(z, layout) for z in stages}
    if layout.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
