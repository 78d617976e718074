"""Zero-variance (exact) and k-stratified NELBO for time-agnostic masked denoisers (BD3-LM, MDLM).

Derivation
----------
Take one block of B tokens x = (x_1..x_B) with clean earlier blocks c, the loglinear schedule
alpha_t = 1 - t (mask probability p(t) = t) and a denoiser that does not see t (BD3-LM and MDLM are
not time-conditioned, spec 1.1 / trap 4). The continuous-time NELBO of the block is

    NELBO = int_0^1  alpha'_t / (1 - alpha_t) * E_{x_t ~ q_t}[ sum_{i masked} log p(x_i | x_t, c) ] dt
          = int_0^1  (1/t) * E_{M ~ Bern(t)^B}[ f(M) ] dt,        f(M) = sum_{i in M} -log p(x_i | x_{not M}, c)

(SUBS: unmasked positions carry over and cost exactly 0; -alpha'/(1-alpha) = 1/t). Given t every token
is masked independently with probability t, so a set M with |M| = k has probability t^k (1-t)^(B-k),
and because f does not depend on t the integral factorises per set:

    NELBO = sum_{M != {}} f(M) * int_0^1 t^(k-1) (1-t)^(B-k) dt = sum_{M != {}} f(M) * Beta(k, B-k+1)
          = sum_{M != {}} f(M) * (k-1)! (B-k)! / B!  =  sum_{M != {}} f(M) / (k * C(B, k)).

Grouping the C(B, k) sets of each size k:

    NELBO_block = sum_{k=1..B} (1/k) * E_{|M|=k}[ f(M) ] = sum_{k=1..B} E_{|M|=k}[ mean_{i in M} CE_i ],

i.e. the mean over uniformly random unmasking orders of the summed CE (any-order AR), a bound on
-log p(x | c). (M = {} has probability (1-t)^B and f = 0: it costs nothing.) The sequence NELBO is the
sum over blocks; PPL = exp(NELBO / counted tokens) as for the Monte Carlo estimate.

Today's Monte Carlo evaluation (:mod:`megabd3.eval.nelbo`) draws t ~ U[eps, 1] (eps =
``diffusion.sampling_eps``), so it estimates ``1/(1-eps) int_eps^1 ...`` instead: the same sum with
per-set weight ``W_eps(k, B) = 1/(1-eps) int_eps^1 t^(k-1) (1-t)^(B-k) dt`` (an O(eps) relative
difference). The exact evaluator accumulates the per-(block size, k) sums once and reports both:
``nelbo`` (eps = 0, the bound above) and ``nelbo_at_sampling_eps`` (the same sum with the t ~ U[eps, 1]
weights, for comparing the two). The latter is what the Monte Carlo number estimates, but it equals
the MC expectation only on average over which cells get which t: MC stratifies its t draws over the
batch (antithetic slices), so the t-slice of a (sequence, block) cell is fixed by its place in the
loader's order, and for one fixed order the MC expectation weights each cell by its own slice.
Averaged over orders (or when cells are alike) the two agree. Results carry ``t_range``: "[0, 1]" for
exact and stratified ``nelbo`` / ``ppl``, "[eps, 1]" for mc.

Counted positions. With ``diffusion.ignore_bos`` position 0 is never masked and never counted; with
``data.mode=pad`` padded positions are invisible keys and uncounted. A block whose counted set S has
B' < B positions is a block of size B' for the formula; those tokens are the only ones whose masking
matters (masking an uncounted padded position changes nothing: no query sees it).

Estimators (``likelihood`` = exact | stratified | mc)
----------------------------------------------------
- ``exact`` (B <= 8): enumerate the 2^B - 1 non-empty patterns over the positions of a block; for each
  pattern, mask it in EVERY block of every sequence at once and run one forward of the [x_t ; x0] input
  (a block's x_t only attends to its own x_t block and to clean earlier x0 blocks, so blocks do not
  interact). Cell (sequence, block) with counted set S takes ``f(M & S) * W(|M & S|, |S|) / 2^(B-|S|)``
  (each subset of S occurs 2^(B-|S|) times among the patterns). 2^B - 1 forwards per batch, zero
  variance. B = 1 is the exact L'=1 NLL (the tuned U[1,1] objective; DESIGN invariant 5); MDLM is the
  case B = L.
- ``stratified`` (any B): NELBO_block = sum_k g_k with g_k = E_{|M|=k}[f(M)] / k. Equal allocation:
  every stratum k = 1..B-1 gets ``2 * units`` draws per (sequence, block), drawn as ``units``
  independent antithetic pairs: a fresh uniform random order pi of the block's counted positions, and
  the pair (first k of pi, last k of pi). Each set is uniform over the k-subsets (so the estimate is
  unbiased); the two are disjoint for k <= B'/2 and cover the block for k >= B'/2, so a hard token is
  in one and not the other. Stratum k = B has a single set (the whole block): one forward, exact. A
  block with B' < B counted positions uses strata k <= B' (its k = B' stratum is then deterministic).
  Per cell, unit u gives Y_u = sum_k mean(pair); the cell's estimate is mean_u Y_u with variance
  s^2(Y)/units (units are independent), so ``units >= 2``. Cells are independent, so the variance of
  the split total is the sum over cells. Forwards per batch: 2 * units * (B - 1) + 1.
- ``mc``: today's estimator, unchanged (one t per (sequence, block), stratified over the batch). Its
  standard error here is the between-cell approximation ``sqrt(cells * B^2 * var_nelbo) / tokens``
  (var_nelbo = the variance across (sequence, block) of the per-block mean loss). It also counts the
  spread of the true per-block NELBOs, so it overstates the Monte Carlo error (conservative).

Standard errors are those of NELBO per token; ``ppl_se`` is the delta-method ``ppl * nelbo_se``.
Data parallel: sums and variances are all-reduced over the data-parallel group (each rank draws from
its own generator, :func:`megabd3.eval.nelbo.eval_seed`); with pipeline parallelism the last stage's
numbers are broadcast, as :func:`megabd3.eval.nelbo.evaluate_nelbo` does.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from megabd3.diffusion.clip_search import _dp_group, from_last_stage
from megabd3.diffusion.objectives import ModelFn, Objective, build_objective, subs_cross_entropy
from megabd3.errors import UserError
from megabd3.eval.padding import real_rows

LIKELIHOODS = ("exact", "stratified", "mc")
#: ``t_range`` of a result: the interval of t its ``nelbo`` / ``ppl`` integrate over.
T_RANGE_FULL = "[0, 1]"


def t_range_eps(eps: float) -> str:
    """The t interval of the Monte Carlo estimate, t ~ U[eps, 1] (eps = diffusion.sampling_eps)."""
    return f"[{eps:g}, 1]"

#: 2^8 - 1 = 255 forwards per batch; 2^16 would be 65535.
MAX_EXACT_BLOCK = 8
DEFAULT_UNITS = 2


# ---- weights --------------------------------------------------------------------------------------
def set_weight(k: int, size: int, t_min: float = 0.0) -> float:
    """Weight of ONE masked set of k of ``size`` positions: 1/(1-t_min) int_{t_min}^1 t^(k-1) (1-t)^(size-k) dt.

    t_min = 0 gives Beta(k, size-k+1) = 1/(k C(size, k)). The integral from 0 to t_min is expanded
    binomially (small terms only, no cancellation for the sizes used here).
    """
    if not 1 <= k <= size:
        raise ValueError(f"need 1 <= k <= size, found k={k}, size={size}")
    full = 1.0 / (k * math.comb(size, k))
    if t_min <= 0.0:
        return full
    m = size - k
    head = sum(math.comb(m, j) * (-1) ** j * t_min ** (k + j) / (k + j) for j in range(m + 1))
    return (full - head) / (1.0 - t_min)


def stratum_weight(k: int, size: int, t_min: float = 0.0) -> float:
    """Weight of the stratum mean E_{|M|=k}[f(M)]: C(size, k) * set_weight (1/k at t_min = 0)."""
    return math.comb(size, k) * set_weight(k, size, t_min)


# ---- checks ---------------------------------------------------------------------------------------
def check_supported(cfg: Any, likelihood: str, seq_len: Optional[int] = None, units: int = DEFAULT_UNITS) -> None:
    """Refuse (one-line UserError) what the exact/stratified NELBO cannot evaluate; cheap, so callers run
    it before reading any data. ``units``: ``--likelihood-units`` (read by stratified only)."""
    if likelihood not in LIKELIHOODS:
        raise UserError(f"--likelihood: expected one of {', '.join(LIKELIHOODS)}, found {likelihood!r}")
    if likelihood == "stratified" and not (isinstance(units, int) and units >= 2):
        raise UserError(f"--likelihood-units={units!r}: the stratified estimator needs at least 2 independent units "
                        f"per block for its standard error; pass --likelihood-units 2 or more")
    if likelihood == "mc":
        return
    obj = cfg.diffusion.objective
    if obj == "sedd":
        raise UserError(f"--likelihood {likelihood} needs a time-agnostic masked denoiser; sedd is time-conditioned: use --likelihood mc")
    if obj not in ("bd3lm", "mdlm"):
        return  # ar: its NLL is already exact
    if cfg.model.time_conditioning:
        raise UserError(f"--likelihood {likelihood} needs a model without time conditioning (model.time_conditioning=true): use --likelihood mc")
    L = cfg.data.seq_len if seq_len is None else seq_len
    block = L if obj == "mdlm" else cfg.diffusion.block_size
    if likelihood == "exact" and block > MAX_EXACT_BLOCK:
        what = f"mdlm (one block of L={L})" if obj == "mdlm" else f"block_size {block}"
        raise UserError(f"--likelihood exact enumerates 2^B - 1 masks and allows B <= {MAX_EXACT_BLOCK}, found {what}: use --likelihood stratified")


# ---- shared per-batch pieces ----------------------------------------------------------------------
def _counted(objective: Objective, x0: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(counted [b, L] bool, keep-clean [b, L] bool or None) exactly as the objective counts tokens."""
    counted = torch.ones_like(x0, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool).clone()
    keep = None
    if objective.settings.ignore_bos:
        keep = torch.zeros_like(x0, dtype=torch.bool)
        keep[:, 0] = True
        counted[:, 0] = False
    return counted, keep


def _masked_ce(objective: Objective, model_fn: ModelFn, x0: torch.Tensor, masked: torch.Tensor,
               keep: Optional[torch.Tensor], key_padding: Optional[torch.Tensor], block: int) -> torch.Tensor:
    """CE [b, L] (float64) of x0 under SUBS with ``masked`` positions replaced by the mask token."""
    if keep is not None:
        masked = masked & ~keep
    x_t = torch.where(masked, torch.full_like(x0, objective.mask_id), x0)
    logits = objective._forward(model_fn, x_t, x0, key_padding, None, block)  # the objective's own input layout
    return subs_cross_entropy(logits, x0, objective.mask_id, objective.vocab_size).double()


class _Totals:
    """Float64 sums [nelbo(eps=0), nelbo(t_min), variance, tokens, forwards] + per-batch bookkeeping."""

    def __init__(self) -> None:
        self.values: Optional[torch.Tensor] = None
        self.batches = 0

    def add(self, nelbo: float | torch.Tensor, nelbo_eps: float | torch.Tensor, var: float | torch.Tensor,
            tokens: int | torch.Tensor, forwards: int, device: torch.device) -> None:
        step = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                            for v in (nelbo, nelbo_eps, var, tokens, forwards)])
        self.values = step if self.values is None else self.values + step

    def reduce(self, device: torch.device) -> torch.Tensor:
        total = self.values if self.values is not None else torch.zeros(5, dtype=torch.float64, device=device)
        group = _dp_group()
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        return total


# ---- exact ----------------------------------------------------------------------------------------
def _patterns(block: int, device: torch.device) -> torch.Tensor:
    """All 2^B - 1 non-empty masks over a block's positions, [P, B] bool."""
    codes = torch.arange(1, 2 ** block, device=device)
    return (codes[:, None] >> torch.arange(block, device=device)) & 1 == 1


@torch.no_grad()
def exact_batch(objective: Objective, model_fn: ModelFn, x0: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, t_min: float = 0.0) -> Dict[str, torch.Tensor]:
    """Exact block NELBOs of one batch: dict(cells [b, nblk] at eps=0, cells_eps [b, nblk] at t_min,
    tokens, forwards). One forward per non-empty mask pattern, every block masked at once."""
    b, L = x0.shape
    block = objective.block_size(L)
    if block > MAX_EXACT_BLOCK:
        raise UserError(f"--likelihood exact allows blocks of at most {MAX_EXACT_BLOCK} tokens, found {block}: use --likelihood stratified")
    nblk = L // block
    counted, keep = _counted(objective, x0, attention_mask)
    key_padding = None if attention_mask is None else attention_mask.to(torch.bool)
    cnt = counted.view(b, nblk, block)
    size = cnt.sum(-1)  # B' per cell
    # weight tables indexed [B', k'] (rows/cols 0 unused): set weight / 2^(B - B') (multiplicity)
    w0 = torch.zeros(block + 1, block + 1, dtype=torch.float64, device=x0.device)
    we = torch.zeros_like(w0)
    for s in range(1, block + 1):
        for k in range(1, s + 1):
            w0[s, k] = set_weight(k, s, 0.0) / 2 ** (block - s)
            we[s, k] = set_weight(k, s, t_min) / 2 ** (block - s)
    cells = torch.zeros(b, nblk, dtype=torch.float64, device=x0.device)
    cells_eps = torch.zeros_like(cells)
    patterns = _patterns(block, x0.device)
    for pattern in patterns:
        masked = pattern.repeat(nblk).expand(b, L)
        ce = _masked_ce(objective, model_fn, x0, masked, keep, key_padding, block).view(b, nblk, block)
        hit = pattern.view(1, 1, block) & cnt  # masked AND counted
        f = torch.where(hit, ce, torch.zeros_like(ce)).sum(-1)  # where(): no NaN leaks from unused rows
        k = hit.sum(-1)
        cells += f * w0[size, k]  # k = 0 -> weight 0
        cells_eps += f * we[size, k]
    return {"cells": cells, "cells_eps": cells_eps, "tokens": counted.sum(), "forwards": torch.tensor(len(patterns))}


# ---- stratified -----------------------------------------------------------------------------------
def stratified_forwards(block: int, units: int) -> int:
    """Forwards per batch of the stratified estimator."""
    return 2 * units * (block - 1) + 1


@torch.no_grad()
def stratified_batch(objective: Objective, model_fn: ModelFn, x0: torch.Tensor, generator: Optional[torch.Generator],
                     attention_mask: Optional[torch.Tensor] = None, units: int = DEFAULT_UNITS,
                     t_min: float = 0.0) -> Dict[str, torch.Tensor]:
    """Stratified NELBO estimate of one batch: dict(cells [b, nblk], var [b, nblk] (of each cell's
    estimate), tokens, forwards). See the module docstring for the design."""
    if units < 2:
        raise UserError(f"the stratified estimator needs at least 2 independent units per block for its standard error, found {units}")
    b, L = x0.shape
    block = objective.block_size(L)
    nblk = L // block
    counted, keep = _counted(objective, x0, attention_mask)
    key_padding = None if attention_mask is None else attention_mask.to(torch.bool)
    cnt = counted.view(b, nblk, block)
    size = cnt.sum(-1)
    dev = x0.device
    # stratum weights W(k, B') (1/k at t_min = 0), indexed [B', k]
    wt = torch.zeros(block + 1, block + 1, dtype=torch.float64, device=dev)
    for s in range(1, block + 1):
        for k in range(1, s + 1):
            wt[s, k] = stratum_weight(k, s, t_min)
    per_unit = torch.zeros(units, b, nblk, dtype=torch.float64, device=dev)
    big = torch.tensor(float(block + 1), dtype=torch.float64, device=dev)

    def f_of(masked_cells: torch.Tensor) -> torch.Tensor:  # [b, nblk, B] -> f [b, nblk]
        ce = _masked_ce(objective, model_fn, x0, masked_cells.reshape(b, L), keep, key_padding, block).view(b, nblk, block)
        return torch.where(masked_cells & cnt, ce, torch.zeros_like(ce)).sum(-1)

    forwards = 0
    for k in range(1, block):
        active = size >= k  # cells that have this stratum
        w = wt[size, k] / 2.0  # pair mean
        for u in range(units):
            r = torch.rand(b, nblk, block, generator=generator, dtype=torch.float64, device=dev)
            r = torch.where(cnt, r, big)  # uncounted positions sort last: ranks 0..B'-1 are the counted ones
            rank = r.argsort(-1).argsort(-1)
            first = rank < k
            last = (rank >= (size - k)[..., None]) & (rank < size[..., None])
            pair = f_of(first) + f_of(last)
            forwards += 2
            per_unit[u] += torch.where(active, w * pair, torch.zeros_like(pair))
    # stratum k = B: one set (the whole block), only for cells with every position counted
    full = (size == block)
    f_all = f_of(torch.ones(b, nblk, block, dtype=torch.bool, device=dev))
    forwards += 1
    det = torch.where(full, wt[block, block] * f_all, torch.zeros_like(f_all))
    cells = per_unit.mean(0) + det
    var = per_unit.var(0, unbiased=True) / units
    return {"cells": cells, "var": var, "tokens": counted.sum(), "forwards": torch.tensor(forwards)}


# ---- split-level drivers --------------------------------------------------------------------------
def _finish(total: torch.Tensor, likelihood: str, batches: int, extra: Dict[str, Any]) -> Dict[str, Any]:
    nelbo_sum, nelbo_eps_sum, var_sum, tokens, forwards = (float(v) for v in total)
    if tokens <= 0:
        raise UserError("evaluation saw no tokens; check data.test_prefix / valid_prefix and eval.max_batches")
    nelbo = nelbo_sum / tokens
    ppl = math.exp(nelbo) if nelbo < 700 else float("inf")
    se = math.sqrt(max(var_sum, 0.0)) / tokens
    out: Dict[str, Any] = {
        "likelihood": likelihood,
        "nelbo": nelbo,
        "ppl": ppl,
        "bpd": nelbo / math.log(2.0),
        "nelbo_se": se,
        "ppl_se": ppl * se,
        "tokens": int(tokens),
        "batches": batches,
        "forward_passes": int(forwards),
    }
    out.update(extra)
    return out


def _device(batch: dict) -> torch.device:
    return batch["input_ids"].device


@torch.no_grad()
def evaluate_exact_or_stratified(
    cfg: Any,
    model_fn: ModelFn,
    batches: Iterable[dict],
    *,
    likelihood: str,
    mask_id: int,
    vocab_size: int,
    generator: Optional[torch.Generator] = None,
    units: int = DEFAULT_UNITS,
    max_batches: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """Exact or stratified NELBO over a whole split (same reduction as the Monte Carlo evaluation)."""
    check_supported(cfg, likelihood, units=units)
    objective = build_objective(cfg, mask_id, vocab_size, evaluation=True)
    t_min = float(cfg.diffusion.sampling_eps)
    totals = _Totals()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    bar = None
    if progress:
        from tqdm import tqdm

        batches = bar = tqdm(batches, desc=f"eval nelbo ({likelihood})", unit="batch", total=max_batches or None)
    n = 0
    for batch in batches:
        if max_batches and n >= max_batches:
            break
        device = _device(batch)
        rows = real_rows(batch)
        x0 = rows["input_ids"]
        n += 1
        if x0.shape[0] == 0:
            continue
        mask = rows.get("attention_mask")
        if likelihood == "exact":
            r = exact_batch(objective, model_fn, x0, mask, t_min=t_min)
            totals.add(r["cells"].sum(), r["cells_eps"].sum(), 0.0, r["tokens"], int(r["forwards"]), device)
        else:
            r = stratified_batch(objective, model_fn, x0, generator, mask, units=units)
            totals.add(r["cells"].sum(), float("nan"), r["var"].sum(), r["tokens"], int(r["forwards"]), device)
        if bar is not None and totals.values is not None:
            v = totals.values
            bar.set_postfix(tokens=int(v[3]), nelbo=float(v[0] / v[3].clamp(min=1)))
    if bar is not None:
        bar.close()
    total = totals.reduce(device)
    block = objective.block_size(cfg.data.seq_len)
    extra: Dict[str, Any] = {"block_size": block, "t_range": T_RANGE_FULL}
    if likelihood == "exact":
        tokens = float(total[3])
        nelbo_eps = float(total[1]) / tokens if tokens > 0 else float("nan")
        extra.update(forward_passes_per_batch=2 ** block - 1, t_min=0.0, sampling_eps=t_min,
                     nelbo_at_sampling_eps=nelbo_eps, t_range_at_sampling_eps=t_range_eps(t_min),
                     ppl_at_sampling_eps=math.exp(nelbo_eps) if nelbo_eps < 700 else float("inf"))
    else:
        extra.update(forward_passes_per_batch=stratified_forwards(block, units), units=units, t_min=0.0,
                     allocation="equal: 2*units antithetic draws per k in 1..B-1, k=B exact")
    return from_last_stage(_finish(total, likelihood, n, extra))


def mc_standard_error(result: Dict[str, Any], block: int) -> float:
    """Between-cell approximate SE of the Monte Carlo NELBO per token from its ``var_nelbo``.

    Cells ~ tokens / B; each cell's NELBO sum has variance B^2 var(per-block mean), and cells are
    summed: Var(total) ~ cells * B^2 * var_nelbo. Includes the spread of the true per-block NELBOs,
    so it overstates the Monte Carlo error. NaN when var_nelbo was not computed.
    """
    var, tokens = result.get("var_nelbo", float("nan")), result.get("tokens", 0)
    if tokens <= 0 or var is None or math.isnan(var):
        return float("nan")
    cells = tokens / block
    return math.sqrt(cells * block * block * var) / tokens


def add_mc_fields(result: Dict[str, Any], cfg: Any) -> Dict[str, Any]:
    """Annotate a :func:`megabd3.eval.nelbo.evaluate_nelbo` result with SE, forward passes and t range."""
    obj = cfg.diffusion.objective
    block = {"ar": 1, "mdlm": cfg.data.seq_len, "sedd": cfg.data.seq_len}.get(obj, cfg.diffusion.block_size)
    # AR: the causal NLL is exact whatever the estimator asked for (no t is drawn)
    result["likelihood"] = "exact (ar)" if obj == "ar" else "mc"
    se = 0.0 if obj == "ar" else mc_standard_error(result, block)
    result["nelbo_se"] = se
    result["ppl_se"] = result["ppl"] * se
    result["forward_passes"] = result["batches"]
    result["forward_passes_per_batch"] = 1
    if obj != "ar":
        result["se_method"] = "between-(sequence, block) spread of one draw per cell (conservative)"
        result["t_range"] = t_range_eps(float(cfg.diffusion.sampling_eps))
    else:
        result["t_range"] = "none (exact causal NLL)"
    return result


def evaluate_likelihood(
    cfg: Any,
    model_fn: ModelFn,
    batches: Iterable[dict],
    *,
    likelihood: str,
    mask_id: int,
    vocab_size: int,
    generator: Optional[torch.Generator] = None,
    units: int = DEFAULT_UNITS,
    max_batches: int = 0,
    progress: bool = False,
    **mc_kwargs: Any,
) -> Dict[str, Any]:
    """Dispatch on ``likelihood``. mc (and ar, whose NLL is exact) run today's evaluate_nelbo unchanged."""
    from megabd3.eval.nelbo import evaluate_nelbo

    check_supported(cfg, likelihood, units=units)
    if likelihood == "mc" or cfg.diffusion.objective == "ar":
        out = evaluate_nelbo(cfg, model_fn, batches, mask_id=mask_id, vocab_size=vocab_size, generator=generator,
                             max_batches=max_batches, progress=progress, **mc_kwargs)
        out = add_mc_fields(out, cfg)
        if likelihood != "mc":
            out["likelihood"] = likelihood
            out["likelihood_note"] = "ar: the NLL is exact already; evaluated as today"
        return out
    return evaluate_exact_or_stratified(cfg, model_fn, batches, likelihood=likelihood, mask_id=mask_id,
                                        vocab_size=vocab_size, generator=generator, units=units,
                                        max_batches=max_batches, progress=progress)


def evaluate_prefix_likelihood(cfg: Any, model_fn: Any, prefix: str, tokenizer: Any, *, likelihood: str, seed: int,
                               units: int = DEFAULT_UNITS, progress: bool = True, zero_shot: bool = False,
                               **mc_kwargs: Any) -> Dict[str, Any]:
    """:func:`megabd3.eval.zeroshot.evaluate_prefix` with the estimator chosen by ``likelihood``."""
    import os

    from megabd3.data.loader import build_loader
    from megabd3.eval.nelbo import eval_seed
    from megabd3.eval.zeroshot import evaluate_prefix, framing_of, prefix_config

    if likelihood == "mc":
        mc_kwargs.setdefault("var_nelbo", True)  # its SE needs var_nelbo; computing it draws nothing (same NELBO)
        out = evaluate_prefix(cfg, model_fn, prefix, tokenizer, seed=seed, progress=progress, zero_shot=zero_shot,
                              **mc_kwargs)
        return add_mc_fields(out, cfg)
    check_supported(cfg, likelihood, units=units)
    if not os.path.isfile(prefix + ".bin") or not os.path.isfile(prefix + ".idx"):
        raise UserError(f"dataset prefix {prefix} has no .bin/.idx: make it with tools/preprocess_data.py")
    pcfg = prefix_config(cfg, prefix, zero_shot=zero_shot)
    loader = build_loader(pcfg, "test", 0, 1, 0, pcfg.eval.batch_size)
    gen = torch.Generator().manual_seed(eval_seed(seed, 0))  # one process: data-parallel rank 0
    out = evaluate_likelihood(pcfg, model_fn, loader, likelihood=likelihood, mask_id=tokenizer.mask_id,
                              vocab_size=tokenizer.model_vocab_size, generator=gen, units=units,
                              max_batches=pcfg.eval.max_batches, progress=progress,
                              **({"var_nelbo": False} if pcfg.diffusion.objective == "ar" else {}))
    out["framing"] = framing_of(pcfg, zero_shot)
    return out


__all__: List[str] = [
    "LIKELIHOODS", "MAX_EXACT_BLOCK", "T_RANGE_FULL", "t_range_eps", "set_weight", "stratum_weight", "check_supported", "exact_batch",
    "stratified_batch", "stratified_forwards", "evaluate_exact_or_stratified", "evaluate_likelihood",
    "evaluate_prefix_likelihood", "mc_standard_error", "add_mc_fields",
]
