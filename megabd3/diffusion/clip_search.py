"""Data-driven search of the clipped training interval [beta, omega] (spec section 2.3).

For each candidate interval and each of the first N validation batches, the objective is evaluated
with the training schedule restricted to that interval (unweighted, resampling as configured); the
per-block mean losses (K x B numbers) are all-gathered over the data-parallel group and their unbiased
variance is taken. The score of a candidate is the mean of those variances over the batches
("Var. NELBO" of spec section 1.4); the smallest wins and is written into the training interval
unless ``fix`` is set.

Candidates are generated in float32 like the reference (``torch.arange`` in float32), so a start of
0.3 is the float 0.30000001192092896; intervals are reported with those exact values. For block size 1
the candidates are only the full interval and the tuned (1, 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from megabd3.diffusion.objectives import TUNED, Interval, ModelFn, Objective
from megabd3.errors import UserError
from megabd3.eval.padding import block_means


@dataclass
class ClipSearchResult:
    interval: Interval
    #: candidate -> mean over batches of the variance of per-block mean losses.
    table: Dict[Interval, float] = field(default_factory=dict)
    batches: int = 0

    def as_log(self) -> Dict[str, float]:
        """Flat dict for loggers: ``clip_var/0.30-0.80`` -> variance."""
        return {f"clip_var/{lo:.2f}-{hi:.2f}": v for (lo, hi), v in self.table.items()}


def candidate_intervals(widths: Sequence[float], delta: float, eps: float, block_size: int) -> List[Interval]:
    """Spec 2.3 candidates: (max(i, eps), i + w) for i in arange(0, 1 - w + delta, delta) (float32), plus (eps, 1)."""
    if block_size == 1:
        return [(eps, 1.0), TUNED]
    if delta <= 0:
        raise UserError(f"diffusion.clip_search.delta must be > 0, found {delta}")
    out: List[Interval] = []
    for w in widths:
        if not 0.0 < w <= 1.0:
            raise UserError(f"diffusion.clip_search.widths: each width must be in (0, 1], found {w}")
        starts = torch.arange(0.0, 1.0 - w + delta, delta, dtype=torch.float32)
        for i in starts:
            lo = torch.maximum(i, torch.tensor(eps, dtype=torch.float32)).item()
            hi = (i + torch.tensor(w, dtype=torch.float32)).item()
            out.append((lo, hi))
    out.append((eps, 1.0))
    return list(dict.fromkeys(out))


def _dp_group():  # type: ignore[no-untyped-def]
    """The data-parallel group (megatron's when initialised, else WORLD), or None single-process."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return ps.get_data_parallel_group()
    return torch.distributed.group.WORLD


def from_last_stage(obj: Any) -> Any:
    """``obj`` as computed on the last pipeline stage, on every stage of this rank's pipeline.

    With PP > 1 only the last stage has the logits, so only its metrics are real (see
    megabd3.training.pipeline_step.PipelineModelFn); every rank needs them (logging, the new clip
    interval). Identity without a pipeline. ``obj`` must be picklable.
    """
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if (ps is None or not torch.distributed.is_initialized() or not ps.model_parallel_is_initialized()
            or ps.get_pipeline_model_parallel_world_size() == 1):
        return obj
    box = [obj]
    # torch picks the object's device from the group's backend (CPU for gloo, the current GPU for NCCL)
    torch.distributed.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                            group=ps.get_pipeline_model_parallel_group())
    return box[0]


def gather_dp(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n, ...] tensor from every data-parallel rank (ranks may hold different n)."""
    group = _dp_group()
    if group is None:
        return values
    world = torch.distributed.get_world_size(group)
    n = torch.tensor([values.shape[0]], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n, group=group)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top, *values.shape[1:]), dtype=values.dtype, device=values.device)
    padded[: values.shape[0]] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def block_variance(per_block_mean: torch.Tensor) -> float:
    """Unbiased variance of all (sequence, block) means of one batch, gathered over data parallel."""
    flat = gather_dp(per_block_mean.detach().double().flatten(1)).flatten()
    return float(flat.var(unbiased=True)) if flat.numel() > 1 else 0.0


@torch.no_grad()
def search_clip_interval(
    objective: Objective,
    model_fn: ModelFn,
    batches: Iterable[dict],
    generator: Optional[torch.Generator],
    *,
    candidates: Sequence[Interval],
    num_batches: int = 100,
    fix: bool = False,
) -> ClipSearchResult:
    """Score every candidate on the first ``num_batches`` batches; apply the best unless ``fix``.

    batches: dicts with ``input_ids`` [b, L] and optionally ``attention_mask`` [b, L] (the loader's).
    """
    if not candidates:
        raise UserError("diffusion.clip_search: no candidate intervals (set clip_search.widths)")
    sums = {c: 0.0 for c in candidates}
    n = 0
    for batch in batches:
        if n >= num_batches:
            break
        for c in candidates:  # all-padding rows dropped: they would take strata (megabd3/eval/padding.py)
            _, means = block_means(objective, model_fn, batch, generator, train=False, interval=c)
            sums[c] += block_variance(means)
        n += 1
    if n == 0:
        raise UserError("diffusion.clip_search: the validation loader yielded no batches; check data.valid_prefix")
    table = from_last_stage({c: s / n for c, s in sums.items()})  # with PP only the last stage's are real
    best = min(candidates, key=lambda c: table[c])
    if not fix:
        objective.set_train_interval(best)
    return ClipSearchResult(interval=best, table=table, batches=n)
