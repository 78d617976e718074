"""Worker for tests/dist/test_zero3_ema.py: ZeRO-3 EMA evaluation, streaming model.pt, zero.Init and
carry_ema on the real BD3 model (2 gloo ranks, fp32). Usage: torchrun ... _zero3_worker.py <out_dir>

Writes <out_dir>/result.json (rank 0) with the max abs differences the test asserts on. A small
`stage3_param_persistence_threshold` makes biases/norms persistent (kept gathered between forwards,
like the real model's) while the matrices are released after each forward.
"""
from __future__ import annotations

from megabd3.training.launch import prepare_environment

prepare_environment()

import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megabd3.config.deepspeed import derive_deepspeed_config  # noqa: E402
from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.masks import AttentionSpec  # noqa: E402
from megabd3.model.export import load_full_state_dict  # noqa: E402
from megabd3.model.transformer import build_model  # noqa: E402
from megabd3.parallel.init import init_distributed  # noqa: E402
from megabd3.training import checkpoint as ckpt  # noqa: E402
from megabd3.training.ema import EMA  # noqa: E402
from megabd3.training.engine import build_engine  # noqa: E402

V, L, B, MB = 50, 16, 4, 2


def tiny_cfg(zero: int) -> Config:
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_heads, m.num_layers, m.cond_dim, m.dropout, m.attention_backend = 32, 2, 2, 16, 0.0, "dense"
    cfg.parallel.precision, cfg.parallel.zero_stage = "fp32", zero
    cfg.training.micro_batch_size, cfg.training.gradient_accumulation = MB, 1
    cfg.data.seq_len, cfg.diffusion.block_size = L, B
    cfg.deepspeed = {"zero_optimization": {"stage3_param_persistence_threshold": 100}}
    return cfg


def random_full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same random full weights on every rank (the real init zeroes the head and adaLN)."""
    full = ckpt.gather_full_state_dict(model, zero3=False, all_ranks=True)
    for i, name in enumerate(sorted(full)):
        g = torch.Generator().manual_seed(1000 + i)
        full[name] = torch.randn(full[name].shape, generator=g) * 0.3
    return full


def batch() -> dict:
    g = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, V, (MB, L), generator=g)
    xt = torch.where(torch.rand(MB, L, generator=g) < 0.5, V - 1, x0)
    return {"input_ids": torch.cat([xt, x0], 1), "position_ids": torch.arange(L).repeat(2)[None].expand(MB, -1),
            "attn": AttentionSpec("bd3", L, B), "sigma": torch.rand(MB, generator=g), "logits_range": (0, L)}


@torch.no_grad()
def forward(module: torch.nn.Module) -> torch.Tensor:
    return module(**batch()).float()


def plain_forward(cfg: Config, full: dict[str, torch.Tensor]) -> torch.Tensor:
    model = build_model(cfg, V)
    load_full_state_dict(model, full)
    return forward(model.eval())


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def old_model_bytes(module: torch.nn.Module) -> bytes:
    """What save_checkpoint wrote before streaming: everything gathered at once (ZeRO-3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        sd = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items() if torch.is_tensor(v)}
    buf = io.BytesIO()
    torch.save({"model": sd}, buf)
    return buf.getvalue()


def main() -> None:
    out = Path(sys.argv[1])
    cfg = tiny_cfg(3)
    layout = init_distributed(cfg)
    res: dict = {}

    plain = build_model(cfg, V)
    full = random_full(plain)
    load_full_state_dict(plain, full)
    live_ref = forward(plain.eval())
    half_ref = plain_forward(cfg, {k: 0.5 * v for k, v in full.items()})
    zero_ref = plain_forward(cfg, {k: torch.zeros_like(v) for k, v in full.items()})

    model = build_model(cfg, V)
    load_full_state_dict(model, full)
    # ZeRO++ hpZ: forwards gather from a secondary partition copy the EMA swap must not leave stale
    # (2 ranks, hpZ group of 2: a degenerate but real secondary tensor)
    ds = derive_deepspeed_config(cfg, layout.dp)
    ds["zero_optimization"]["zero_hpz_partition_size"] = 2
    engine = build_engine(model, cfg, ds, layout.device)
    module = engine.module.eval()
    res["hpz"] = all(getattr(p, "ds_secondary_tensor", None) is not None for p in module.parameters())
    res["live"] = diff(forward(module), live_ref)  # also gathers the persistent parameters
    ema = EMA(list(module.parameters()), 0.9)
    n_persist = sum(bool(getattr(p, "ds_persist", False)) for p in ema.params)
    res["persistent"], res["released"] = n_persist, len(ema.params) - n_persist
    for s in ema.shadow:
        s.mul_(0.5)
    with ema.applied():
        res["ema_half"] = diff(forward(module), half_ref)
    res["restored"] = diff(forward(module), live_ref)
    for s in ema.shadow:
        s.zero_()
    with ema.applied():
        res["ema_zero"] = diff(forward(module), zero_ref)
    res["restored2"] = diff(forward(module), live_ref)

    # streaming model.pt == the old all-at-once gather, byte for byte
    sd = ckpt.gather_full_state_dict(module, zero3=True)
    old = old_model_bytes(module)
    if layout.rank == 0:
        buf = io.BytesIO()
        torch.save({"model": sd}, buf)
        res["model_bytes_equal"] = buf.getvalue() == old
        res["model_vs_full"] = max(diff(sd[k], full[k]) for k in full)
    res["after_save"] = diff(forward(module), live_ref)

    # the EMA exported straight from its shadow partitions; set from a full dict without gathering
    ema.load_full(module, {k: 0.25 * v for k, v in full.items()}, 3)
    ema_sd = ckpt.gather_full_state_dict(module, zero3=True, materialize=lambda _n, p: ema.full_shadow(p))
    if layout.rank == 0:
        res["ema_export"] = max(diff(ema_sd[k], 0.25 * full[k]) for k in full)
    with ema.applied():
        res["ema_quarter"] = diff(forward(module), plain_forward(cfg, {k: 0.25 * v for k, v in full.items()}))
    res["restored3"] = diff(forward(module), live_ref)

    # deepspeed.zero.Init: the partitioned build has the unpartitioned build's weights
    from megabd3.training.zero_init import partitioned_init

    reference = ckpt.gather_full_state_dict(build_model(cfg, V), zero3=False, all_ranks=True)
    with partitioned_init(cfg, derive_deepspeed_config(cfg, layout.dp)):
        zmodel = build_model(cfg, V)
    res["zero_init_partitioned"] = all(p.data.numel() == 0 for p in zmodel.parameters())
    zsd = ckpt.gather_full_state_dict(zmodel, zero3=True)
    if layout.rank == 0:
        res["zero_init_keys"] = list(zsd) == list(reference)
        res["zero_init"] = max(diff(zsd[k], reference[k]) for k in reference)

    if layout.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
