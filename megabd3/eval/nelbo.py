"""Honest test NELBO / perplexity over a whole split (DESIGN.md invariant 4).

Whatever the training config says (schedule, clip interval, resampling, weighting, tuned mode), the
evaluation objective is rebuilt with t ~ U[eps, 1], the loglinear schedule, no weighting, no clipping
(:func:`megabd3.diffusion.objectives.build_objective` with ``evaluation=True``) and called with
``train=False``. Sums of NELBO terms and token counts are accumulated in float64 and all-reduced over
the data-parallel group; PPL = exp(sum / count), BPD = (sum / count) / ln 2. AR reports its exact NLL.

Var. NELBO (spec 1.4): for each batch, the unbiased variance across sequences x blocks of the
per-block mean loss (all-gathered over data parallel), averaged over batches.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch

from megabd3.diffusion.clip_search import _dp_group, block_variance
from megabd3.diffusion.objectives import ModelFn, build_objective
from megabd3.errors import UserError


@torch.no_grad()
def evaluate_nelbo(
    cfg: object,
    model_fn: ModelFn,
    batches: Iterable[dict],
    *,
    mask_id: int,
    vocab_size: int,
    generator: Optional[torch.Generator] = None,
    var_nelbo: bool = True,
    max_batches: int = 0,
    progress: bool = False,
) -> Dict[str, float]:
    """-> dict(nelbo, ppl, bpd, var_nelbo, tokens, batches). ``batches`` yields loader dicts."""
    objective = build_objective(cfg, mask_id, vocab_size, evaluation=True)
    total: Optional[torch.Tensor] = None  # [nelbo_sum, token_count], float64, on the model's device
    var_sum, n = 0.0, 0
    iterator = batches
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(batches, desc="eval nelbo", unit="batch", total=max_batches or None)
        iterator = bar
    for batch in iterator:
        if max_batches and n >= max_batches:
            break
        out = objective(model_fn, batch["input_ids"], generator, train=False, attention_mask=batch.get("attention_mask"))
        step = torch.stack([out.nelbo_sum.double(), out.token_count.double()])
        total = step if total is None else total + step
        if var_nelbo:
            var_sum += block_variance(out.per_block_mean)
        n += 1
        if bar is not None:
            bar.set_postfix(tokens=int(total[1]), nelbo=float(total[0] / total[1].clamp(min=1)))
    if total is None:  # this rank saw nothing; still join the all-reduce below
        total = torch.zeros(2, dtype=torch.float64)
    if bar is not None:
        bar.close()
    group = _dp_group()
    if group is not None:
        torch.distributed.all_reduce(total, group=group)
    if total[1] <= 0:
        raise UserError("evaluation saw no tokens; check data.test_prefix / valid_prefix and eval.max_batches")
    nelbo = float(total[0] / total[1])
    return {
        "nelbo": nelbo,
        "ppl": math.exp(nelbo) if nelbo < 700 else float("inf"),  # exp overflows a float beyond ~709
        "bpd": nelbo / math.log(2.0),
        "var_nelbo": var_sum / n if (var_nelbo and n) else float("nan"),
        "tokens": int(total[1]),
        "batches": n,
    }
