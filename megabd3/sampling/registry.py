"""Registry of samplers (objective name -> sampler class) and the one way to build them from a config."""
from __future__ import annotations

from typing import Any, Dict, Type

from megabd3.errors import UserError
from megabd3.sampling.ar import ARSampler
from megabd3.sampling.backend import ModelBackend
from megabd3.sampling.block import BD3Sampler, MDLMSampler
from megabd3.sampling.common import SamplerOptions
from megabd3.sampling.nucleus import NUCLEUS
from megabd3.sampling.sedd import SEDDSampler

SAMPLERS: Dict[str, Type] = {
    "bd3lm": BD3Sampler,
    "mdlm": MDLMSampler,
    "ar": ARSampler,
    "sedd": SEDDSampler,
}


def options_from_config(cfg: Any, tokenizer: Any) -> SamplerOptions:
    """SamplerOptions from ``cfg.sampling`` / ``cfg.diffusion`` and the tokenizer's special ids."""
    s, d = cfg.sampling, cfg.diffusion
    if s.nucleus not in NUCLEUS:
        raise UserError(f"sampling.nucleus must be one of {sorted(NUCLEUS)}, found {s.nucleus!r}")
    if not 0.0 < s.top_p <= 1.0:
        raise UserError(f"sampling.top_p must be in (0, 1], found {s.top_p}")
    block = {"ar": 1, "mdlm": cfg.data.seq_len, "sedd": cfg.data.seq_len}.get(d.objective, d.block_size)
    return SamplerOptions(
        length=s.length,
        mask_id=tokenizer.mask_id,
        bos_id=tokenizer.bos_id,
        eod_id=tokenizer.eod_id,
        vocab_size=tokenizer.model_vocab_size,
        block_size=block,
        first_hitting=s.first_hitting,
        steps=s.steps,
        strategy=s.strategy,
        threshold=s.threshold,
        tokens_per_step=s.tokens_per_step,
        top_p=s.top_p,
        nucleus=s.nucleus,
        kv_cache=s.kv_cache,
        var_length=s.var_length,
        entropy_threshold=s.entropy_threshold,
        max_tries=s.max_tries,
        window=s.cache_window,
        cuda_graphs=s.cuda_graphs,
        train_length=cfg.data.seq_len,
        sigma_max=d.sigma_max,
        time_conditioning=bool(cfg.model.time_conditioning),
    )


def build_sampler(cfg: Any, model: Any, tokenizer: Any, opts: SamplerOptions | None = None):
    """The sampler of ``cfg.diffusion.objective`` around ``model`` (eval mode, on its device)."""
    name = cfg.diffusion.objective
    if name not in SAMPLERS:
        raise UserError(f"diffusion.objective must be one of {sorted(SAMPLERS)} to sample, found {name!r}")
    opts = opts or options_from_config(cfg, tokenizer)
    backend = ModelBackend(model, opts.vocab_size, opts.window)
    return SAMPLERS[name](backend, opts)
