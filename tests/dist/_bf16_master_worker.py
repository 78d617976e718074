"""Worker for tests/dist/test_zero3_ema.py::test_bf16_*: DeepSpeed bf16 on CPU/gloo with the real BD3
model; checks that model.pt export and the EMA follow the fp32 master weights, not the bf16 copies.
Usage: torchrun ... _bf16_master_worker.py <zero stages, e.g. 0,1,3> <out_dir>  (rank 0 writes result.json:
one entry per stage; the stages run one after another in one launch, each with its own engine)
"""
from __future__ import annotations

from megabd3.training.launch import prepare_environment

prepare_environment()

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
from megabd3.training.ema import EMA, MASTER_ATTR, link_fp32_masters  # noqa: E402
from megabd3.training.engine import build_engine  # noqa: E402
from megabd3.training.zero_init import partitioned_init  # noqa: E402


def run(zero: int, layout) -> dict:  # noqa: ANN001
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = tiny_cfg(zero)
    cfg.parallel.precision = "bf16"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 1
    ds = derive_deepspeed_config(cfg, layout.dp)
    with partitioned_init(cfg, ds):
        model = build_model(cfg, V)
    engine = build_engine(model, cfg, ds, layout.device)
    link_fp32_masters(engine)  # as run_training does
    module = engine.module
    ema = EMA(list(module.parameters()), 0.5)
    res: dict = {"dtype": str(next(module.parameters()).dtype), "kinds": sorted(set(ema.kinds))}
    for _ in range(3):
        b = batch()
        logits = engine(**b).float()
        loss = logits.square().mean() + logits[..., 0].mean()  # any loss that moves every weight
        engine.backward(loss)
        engine.step()
        ema.update()
    ema.decay = 0.0  # the next update sets the shadow to exactly what it tracks
    ema.update()
    master = {n: (getattr(p, MASTER_ATTR, None) if zero == 0 else safe_get_full_fp32_param(p)).detach().cpu().clone()
              for n, p in module.named_parameters()}
    lowp = ckpt.gather_full_state_dict(module, zero == 3, materialize=lambda _n, p: ckpt._zero3_full(p, zero == 3))
    sd = ckpt.gather_full_state_dict(module, zero == 3)
    ema_sd = ckpt.gather_full_state_dict(module, zero == 3, materialize=lambda _n, p: ema.full_shadow(p))
    with torch.no_grad():
        live = module(**batch()).float()
        with ema.applied():
            applied = module(**batch()).float()
        back = module(**batch()).float()
    res["ema_applied_vs_live"], res["restored"] = diff(applied, live), diff(back, live)
    if layout.rank == 0:
        res["model_dtype"] = sorted({str(t.dtype) for t in sd.values()})
        res["model_vs_master"] = max(diff(sd[k], master[k]) for k in master)
        res["ema_vs_master"] = max(diff(ema_sd[k], master[k]) for k in master)
        res["bf16_vs_master"] = max(diff(lowp[k].float(), master[k]) for k in master)  # > 0: rounding
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
