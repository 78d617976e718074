"""Honest test NELBO / perplexity over a whole split (DESIGN.md invariant 4), and Var. NELBO.

Whatever the training config says (schedule, clip interval, resampling, weighting, tuned mode), the
evaluation objective is rebuilt with t ~ U[eps, 1], the loglinear schedule, no weighting, no clipping
(:func:`megabd3.diffusion.objectives.build_objective` with ``evaluation=True``) and called with
``train=False``. Sums of NELBO terms and token counts are accumulated in float64 and all-reduced over
the data-parallel group; PPL = exp(sum / count), BPD = (sum / count) / ln 2. AR reports its exact NLL.

All-padding rows of the loader's last batch are dropped before the objective (:mod:`.padding`), so
they take no antithetic strata and add no zero block means to the variances.

Two variances, each the per-batch unbiased variance across sequences x blocks of the per-block mean
loss (all-gathered over data parallel), averaged over batches:

- ``var_nelbo``: under the honest objective above (loglinear, U[eps, 1]) — comparable across runs;
- ``var_nelbo_train``: spec 1.4 / the paper's "Var. NELBO" (Tables 2, 8): the loss of the run's own
  *training* schedule on its current training interval, unweighted, resampling as configured. Only
  computed when a training objective is given. It draws from a copy of the evaluation generator, so
  the NELBO is unchanged by asking for it and, for an unclipped loglinear run without resampling, the
  two variances are equal.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from megabd3.diffusion.clip_search import _dp_group, from_last_stage, gather_dp
from megabd3.diffusion.objectives import Interval, ModelFn, Objective, build_objective
from megabd3.errors import UserError
from megabd3.eval.padding import block_means


def eval_seed(seed: int, dp_rank: int) -> int:
    """Seed of the evaluation generator on data-parallel rank ``dp_rank``.

    Ranks hold different sequences; with one seed they would draw identical t for them (strata are per
    rank). Rank 0 keeps ``seed`` so single-process results do not change; tensor/pipeline ranks of one
    data-parallel rank share its seed (they must draw the same noise for the same rows).
    """
    return int(seed) + int(dp_rank)


def training_objective(cfg: Any, mask_id: int, vocab_size: int, *, interval: Optional[Interval] = None,
                       progress: Optional[float] = None) -> Objective:
    """The run's training objective (schedule, resampling) on ``interval`` (default: the config's)."""
    objective = build_objective(cfg, mask_id, vocab_size, evaluation=False)
    if interval is not None:
        objective.set_train_interval(tuple(interval))
    if progress is not None:
        objective.set_progress(min(max(float(progress), 0.0), 1.0))
    return objective


def copy_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """An independent generator in the same state (None stays None: both then use the global RNG)."""
    if generator is None:
        return None
    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    return twin


class VarianceMeter:
    """Mean over batches of the unbiased variance of the (gathered) per-block means of each batch."""

    def __init__(self) -> None:
        self.total, self.batches = 0.0, 0

    def add(self, means: torch.Tensor) -> None:
        # a collective: every data-parallel rank calls it once per batch, even with no real row
        flat = gather_dp(means.detach().double().flatten(1)).flatten()
        if flat.numel() == 0:  # the whole global batch was padding: no variance to average
            return
        self.total += float(flat.var(unbiased=True)) if flat.numel() > 1 else 0.0
        self.batches += 1

    @property
    def value(self) -> float:
        return self.total / self.batches if self.batches else float("nan")


def _progress_bar(batches: Iterable[dict], enabled: bool, max_batches: int):  # type: ignore[no-untyped-def]
    if not enabled:
        return batches, None
    from tqdm import tqdm

    bar = tqdm(batches, desc="eval nelbo", unit="batch", total=max_batches or None)
    return bar, bar


def _reduce_totals(total: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    if total is None:  # this rank saw nothing; still join the all-reduce below (on the data's device: NCCL)
        total = torch.zeros(2, dtype=torch.float64, device=device)
    group = _dp_group()
    if group is not None:
        torch.distributed.all_reduce(total, group=group)
    return total


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
    train_objective: Optional[Objective] = None,
    train_interval: Optional[Interval] = None,
    max_batches: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """-> dict(nelbo, ppl, bpd, var_nelbo, tokens, batches) (+ var_nelbo_train, var_nelbo_train_interval
    when ``var_nelbo`` and ``train_objective`` are given). ``batches`` yields loader dicts.

    train_interval: interval of ``var_nelbo_train`` (default ``train_objective.train_interval``).
    """
    objective = build_objective(cfg, mask_id, vocab_size, evaluation=True)
    with_train = var_nelbo and train_objective is not None
    interval: Optional[Tuple[float, float]] = None
    if with_train:
        interval = tuple(train_interval if train_interval is not None else train_objective.train_interval)  # type: ignore[union-attr]
    train_gen = copy_generator(generator) if with_train else None
    var, var_train = VarianceMeter(), VarianceMeter()
    total: Optional[torch.Tensor] = None  # [nelbo_sum, token_count], float64, on the model's device
    # a rank that sees no batch still joins the all-reduce: on the device NCCL needs when CUDA is present
    n, device = 0, torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    iterator, bar = _progress_bar(batches, progress, max_batches)
    for batch in iterator:
        if max_batches and n >= max_batches:
            break
        device = batch["input_ids"].device
        out, means = block_means(objective, model_fn, batch, generator, train=False)
        if out is not None:
            step = torch.stack([out.nelbo_sum.double(), out.token_count.double()])
            total = step if total is None else total + step
        if var_nelbo:
            var.add(means)
        if with_train:
            _, train_means = block_means(train_objective, model_fn, batch, train_gen, train=False, interval=interval)
            var_train.add(train_means)
        n += 1
        if bar is not None and total is not None:
            bar.set_postfix(tokens=int(total[1]), nelbo=float(total[0] / total[1].clamp(min=1)))
    if bar is not None:
        bar.close()
    total = _reduce_totals(total, device)
    if total[1] <= 0:
        raise UserError("evaluation saw no tokens; check data.test_prefix / valid_prefix and eval.max_batches")
    nelbo = float(total[0] / total[1])
    result: Dict[str, Any] = {
        "nelbo": nelbo,
        "ppl": math.exp(nelbo) if nelbo < 700 else float("inf"),  # exp overflows a float beyond ~709
        "bpd": nelbo / math.log(2.0),
        "var_nelbo": var.value if var_nelbo else float("nan"),
        "tokens": int(total[1]),
        "batches": n,
    }
    if with_train:
        result["var_nelbo_train"] = var_train.value
        result["var_nelbo_train_interval"] = interval
    return from_last_stage(result)  # with PP only the last stage's numbers are real
