"""evaluate_nelbo: padded rows change nothing, Var. NELBO under the training interval, per-rank seeds.

The references are written out by hand in the reference's order of operations (spec 1.1, 1.4):
stratified t per (sequence, block), Bernoulli masks, SUBS cross-entropy weighted by 1/t, per-block
mean over L' tokens, unbiased variance over all K x B means, mean over batches.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megabd3.config.schema import Config
from megabd3.diffusion.masks import AttentionSpec
from megabd3.diffusion.objectives import build_objective
from megabd3.diffusion.reference_model import init_reference_model
from megabd3.eval.nelbo import copy_generator, eval_seed, evaluate_nelbo, training_objective
from megabd3.eval.padding import block_means, blocks_per_row, real_rows

V, MASK, PAD, L, BLOCK = 7, 6, 0, 8, 2
SEED = 9


def cfg(**diffusion) -> Config:
    c = Config()
    c.diffusion.block_size, c.data.seq_len = BLOCK, L
    for k, v in diffusion.items():
        setattr(c.diffusion, k, v)
    return c


@pytest.fixture(scope="module")
def model():
    return init_reference_model(V, seed=0, hidden=16, layers=1)


def real_batches(n: int = 3, rows: int = 4) -> list:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, MASK, (rows, L), generator=g),
             "attention_mask": torch.ones(rows, L, dtype=torch.bool)} for _ in range(n)]


def pad_rows(batch: dict, where: list) -> dict:
    """Insert all-padding rows (as the loader makes them) before the given row indices."""
    ids, mask = list(batch["input_ids"]), list(batch["attention_mask"])
    for i in sorted(where, reverse=True):
        ids.insert(i, torch.full((L,), PAD))
        mask.insert(i, torch.zeros(L, dtype=torch.bool))
    return {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask)}


def run(c: Config, model, batches, **kw) -> dict:
    return evaluate_nelbo(c, model, batches, mask_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(SEED), **kw)


# ---------------------------------------------------------------- 1. padding rows take no strata
@torch.no_grad()
def test_padded_rows_change_neither_nelbo_nor_var(model):
    c = cfg(clip_min=0.3, clip_max=0.8)
    train = training_objective(c, MASK, V)
    plain = run(c, model, real_batches(), train_objective=train)
    padded = real_batches()
    padded[-1] = pad_rows(padded[-1], [4, 4, 4, 4])  # the loader's last batch: 4 real + 4 padded rows
    padded[0] = pad_rows(padded[0], [1, 3])  # anywhere in the batch
    padded.append(pad_rows({"input_ids": torch.zeros(0, L, dtype=torch.long),
                            "attention_mask": torch.zeros(0, L, dtype=torch.bool)}, [0, 0]))  # all padding
    got = run(c, model, padded, train_objective=train)
    for k in ("nelbo", "ppl", "bpd", "var_nelbo", "var_nelbo_train", "tokens"):
        assert got[k] == plain[k], k
    assert got["batches"] == plain["batches"] + 1  # the loader step is counted, its variance is not
    # positive control: handing the padded batch to the objective as is moves the real rows' t
    obj = build_objective(c, MASK, V, evaluation=True)
    b = padded[-2]
    whole = obj(model, b["input_ids"], torch.Generator().manual_seed(1), train=False, attention_mask=b["attention_mask"])
    real = real_rows(b)
    only = obj(model, real["input_ids"], torch.Generator().manual_seed(1), train=False, attention_mask=real["attention_mask"])
    assert float(whole.nelbo_sum) != float(only.nelbo_sum)


def test_real_rows_keeps_partly_padded_rows_and_block_means_of_nothing():
    b = pad_rows(real_batches(1)[0], [0])
    b["attention_mask"][2, 5:] = False  # a pad-mode row: real, only partly attended
    r = real_rows(b)
    assert r["input_ids"].shape[0] == 4 and not bool(r["attention_mask"][1, 5:].any())
    empty = {"input_ids": torch.zeros(2, L, dtype=torch.long), "attention_mask": torch.zeros(2, L, dtype=torch.bool)}
    obj = build_objective(cfg(), MASK, V, evaluation=True)
    out, means = block_means(obj, None, empty, None, train=False)
    assert out is None and tuple(means.shape) == (0, L // BLOCK)
    assert blocks_per_row(build_objective(cfg(objective="ar"), MASK, V), L) == L
    assert blocks_per_row(build_objective(cfg(objective="mdlm"), MASK, V), L) == 1


# ---------------------------------------------------------------- 2. Var. NELBO under the training interval
def hand_block_means(model, x0: torch.Tensor, gen: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """Spec 1.1/1.4 written out: loglinear (p = t, weight 1/t), no resampling, no ignore_bos."""
    k, nb = x0.shape[0], L // BLOCK
    r = torch.rand(k, nb, generator=gen, dtype=torch.float64)
    cells = k * nb
    u = (r + torch.arange(cells, dtype=torch.float64).view(k, nb)) / cells
    t = lo + u * (hi - lo)
    t_tok = t.repeat_interleave(BLOCK, dim=1)
    masked = torch.rand(k, L, generator=gen, dtype=torch.float64) < t_tok
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    pos = torch.arange(L).repeat(2).expand(k, 2 * L)
    logits = model(torch.cat([xt, x0], 1), pos, AttentionSpec("bd3", L, BLOCK), None, (0, L)).float()
    logits[..., MASK] = float("-inf")
    ce = -F.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    term = torch.where(masked, (1.0 / t_tok).float() * ce, torch.zeros_like(ce))
    return term.view(k, nb, BLOCK).mean(-1)


@torch.no_grad()
def test_var_nelbo_train_is_the_variance_under_the_clip_interval(model):
    lo, hi = 0.3, 0.8
    c = cfg(clip_min=lo, clip_max=hi)
    batches = [{"input_ids": b["input_ids"]} for b in real_batches()]
    got = run(c, model, batches, train_objective=training_objective(c, MASK, V))
    gen = torch.Generator().manual_seed(SEED)  # the train pass replays the eval generator's stream
    var = [float(hand_block_means(model, b["input_ids"], gen, lo, hi).double().flatten().var()) for b in batches]
    assert got["var_nelbo_train"] == pytest.approx(sum(var) / len(var), rel=1e-6)
    assert tuple(got["var_nelbo_train_interval"]) == (lo, hi)
    assert abs(got["var_nelbo_train"] - got["var_nelbo"]) > 1e-3 * got["var_nelbo"]
    # the honest variance and the NELBO are those of U[eps, 1], untouched by the second pass
    gen = torch.Generator().manual_seed(SEED)
    honest = [float(hand_block_means(model, b["input_ids"], gen, 1e-3, 1.0).double().flatten().var()) for b in batches]
    assert got["var_nelbo"] == pytest.approx(sum(honest) / len(honest), rel=1e-6)
    without = run(c, model, batches)
    assert "var_nelbo_train" not in without
    assert {k: got[k] for k in without} == without
    # an explicit interval (a checkpoint's saved clip interval) overrides the objective's
    other = run(c, model, batches, train_objective=training_objective(c, MASK, V), train_interval=(0.001, 0.5))
    gen = torch.Generator().manual_seed(SEED)
    var = [float(hand_block_means(model, b["input_ids"], gen, 0.001, 0.5).double().flatten().var()) for b in batches]
    assert other["var_nelbo_train"] == pytest.approx(sum(var) / len(var), rel=1e-6)


@torch.no_grad()
def test_var_nelbo_train_equals_var_nelbo_for_unclipped_loglinear(model):
    c = cfg()
    got = run(c, model, real_batches(), train_objective=training_objective(c, MASK, V))
    assert got["var_nelbo_train"] == got["var_nelbo"] and tuple(got["var_nelbo_train_interval"]) == (1e-3, 1.0)


def test_training_objective_takes_the_checkpoint_interval():
    obj = training_objective(cfg(clip_min=0.3, clip_max=0.8), MASK, V, interval=(0.45, 0.95), progress=0.5)
    assert obj.train_interval == (0.45, 0.95)
    assert training_objective(cfg(clip_min=0.3, clip_max=0.8), MASK, V).train_interval == (0.3, 0.8)


# ---------------------------------------------------------------- 4. per-rank evaluation seeds
def test_eval_seed_differs_per_data_parallel_rank_and_keeps_rank0():
    assert eval_seed(7, 0) == 7
    seeds = [eval_seed(7, r) for r in range(8)]
    assert len(set(seeds)) == 8
    # different seeds really give different t for the same rows (the defect: identical draws)
    t = [torch.rand(4, generator=torch.Generator().manual_seed(s)) for s in seeds[:2]]
    assert not torch.equal(t[0], t[1])


def test_copy_generator_replays_the_same_stream():
    g = torch.Generator().manual_seed(3)
    torch.rand(5, generator=g)
    twin = copy_generator(g)
    assert torch.equal(torch.rand(6, generator=g), torch.rand(6, generator=twin))
    assert copy_generator(None) is None
    assert eval_seed(1, 3) == 4 and eval_seed(1, 0) == 1  # seed + dp_rank: rank 0 keeps the configured seed


# ---------------------------------------------------------------- clip search: padded rows take no strata either
@torch.no_grad()
def test_clip_search_variances_ignore_padded_rows(model):
    from megabd3.diffusion.clip_search import candidate_intervals, search_clip_interval

    c = cfg(resample=False)
    cands = candidate_intervals([0.5], 0.25, c.diffusion.sampling_eps, BLOCK)
    plain = search_clip_interval(build_objective(c, MASK, V), model, real_batches(), torch.Generator().manual_seed(SEED),
                                 candidates=cands, num_batches=3, fix=True)
    padded = real_batches()
    padded[-1] = pad_rows(padded[-1], [4, 4, 4, 4])
    padded[1] = pad_rows(padded[1], [0])
    got = search_clip_interval(build_objective(c, MASK, V), model, padded, torch.Generator().manual_seed(SEED),
                               candidates=cands, num_batches=3, fix=True)
    assert got.table == plain.table and got.interval == plain.interval
    # by hand for one candidate: the variance of the per-block means the objective gives on the real rows
    obj = build_objective(c, MASK, V)
    g = torch.Generator().manual_seed(SEED)
    want = {k: 0.0 for k in cands}
    for b in real_batches():
        for cand in cands:
            out = obj(model, b["input_ids"], g, train=False, attention_mask=b["attention_mask"], interval=cand)
            want[cand] += float(out.per_block_mean.double().flatten().var(unbiased=True)) / 3
    assert got.table == pytest.approx(want, rel=1e-12)
