"""Exact / stratified NELBO (megabd3.eval.exact_nelbo) against independent computations on a toy model:
per-block brute-force enumeration, quadrature over t of the Monte Carlo integrand, the Monte Carlo mean,
per-prefix causal runs (B = 1), and repeated stratified runs against exact (B = 8)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from megabd3.config.schema import Config
from megabd3.diffusion.masks import AttentionSpec
from megabd3.diffusion.objectives import build_objective
from megabd3.diffusion.reference_model import init_reference_model
from megabd3.errors import UserError
from megabd3.eval import exact_nelbo as ex

V, MASK = 7, 6  # tokens 0..5, mask 6


def cfg(objective="bd3lm", block=2, seq_len=8, ignore_bos=False, **model):
    c = Config()
    c.diffusion.objective, c.diffusion.block_size, c.data.seq_len = objective, block, seq_len
    c.diffusion.ignore_bos = ignore_bos
    for k, v in model.items():
        setattr(c.model, k, v)
    return c


@pytest.fixture(scope="module")
def model():
    return init_reference_model(V, seed=5, hidden=16, layers=2, heads=2)


def data(rows, L, seed=0):
    return torch.randint(0, MASK, (rows, L), generator=torch.Generator().manual_seed(seed))


def logp_rows(model, objective, x_t, x0, key_padding, block, mask=MASK):
    """log p [b, L, V] from the model's logits with SUBS written here (mask logit -inf), float64."""
    b, L = x0.shape
    if objective == "mdlm":
        logits = model(x_t, torch.arange(L).expand(b, L), AttentionSpec("full", L, L, key_padding), None, None)
    else:
        pos = torch.arange(L).repeat(2).expand(b, 2 * L)
        logits = model(torch.cat([x_t, x0], 1), pos, AttentionSpec("bd3", L, block, key_padding), None, (0, L))
    logits = logits.double().clone()
    logits[..., mask] = float("-inf")
    return torch.log_softmax(logits, -1)


def brute_force(model, x0, block, attention_mask=None, ignore_bos=False, objective="bd3lm", mask=MASK):
    """[b, nblk] block NELBOs: for each row and block separately, every non-empty subset M of the block's
    counted positions is masked ALONE (other blocks clean), f(M) = sum of -log p; sum_k 1/k mean_{|M|=k} f."""
    b, L = x0.shape
    out = torch.zeros(b, L // block, dtype=torch.float64)
    for r in range(b):
        for j in range(L // block):
            counted = [i for i in range(j * block, (j + 1) * block)
                       if (attention_mask is None or attention_mask[r, i]) and not (ignore_bos and i == 0)]
            total = 0.0
            for k in range(1, len(counted) + 1):
                fs = []
                for subset in itertools.combinations(counted, k):
                    x_t = x0[r:r + 1].clone()
                    x_t[0, list(subset)] = mask
                    kp = None if attention_mask is None else attention_mask[r:r + 1].bool()
                    lp = logp_rows(model, objective, x_t, x0[r:r + 1], kp, block, mask)[0]
                    fs.append(-sum(float(lp[i, x0[r, i]]) for i in subset))
                total += np.mean(fs) / k
            out[r, j] = total
    return out


# ---- weights ----------------------------------------------------------------------------------------
def test_weights_are_beta_integrals():
    for size in range(1, 9):
        # stratum weights are exactly 1/k, and they reproduce the t-integral of t^(k-1)(1-t)^(B-k)
        assert sum(ex.stratum_weight(k, size) * k for k in range(1, size + 1)) == pytest.approx(size)
        for k in range(1, size + 1):
            for eps in (0.0, 1e-3, 0.2):
                quad = integrate.quad(lambda t: t ** (k - 1) * (1 - t) ** (size - k), eps, 1, epsabs=1e-14)[0] / (1 - eps)
                assert ex.set_weight(k, size, eps) == pytest.approx(quad, rel=1e-9)
            assert ex.stratum_weight(k, size) == pytest.approx(1.0 / k, rel=1e-12)


# ---- exact == brute force ---------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 2, 4])
@torch.no_grad()
def test_exact_equals_per_block_brute_force(model, block):
    L = 8
    x0 = data(3, L, seed=block)
    obj = build_objective(cfg(block=block, seq_len=L), MASK, V, evaluation=True)
    got = ex.exact_batch(obj, model, x0)
    assert int(got["forwards"]) == 2 ** block - 1
    torch.testing.assert_close(got["cells"], brute_force(model, x0, block), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_exact_with_ignore_bos_and_padding_equals_brute_force(model):
    L, block = 8, 4
    x0 = data(3, L, seed=11)
    am = torch.ones(3, L, dtype=torch.bool)
    am[1, 5:] = False  # second block of row 1 has one counted token, row 2 is fully real
    am[2, 7] = False
    obj = build_objective(cfg(block=block, seq_len=L, ignore_bos=True), MASK, V, evaluation=True)
    got = ex.exact_batch(obj, model, x0, am)
    want = brute_force(model, x0, block, attention_mask=am, ignore_bos=True)
    torch.testing.assert_close(got["cells"], want, rtol=1e-5, atol=1e-5)
    assert int(got["tokens"]) == int(am.sum()) - 3  # position 0 never counted
    # the counted set really matters: without ignore_bos the first block differs
    plain = ex.exact_batch(build_objective(cfg(block=block, seq_len=L), MASK, V, evaluation=True), model, x0, am)
    assert not torch.allclose(plain["cells"][:, 0], got["cells"][:, 0])


@torch.no_grad()
def test_exact_mdlm_equals_brute_force(model):
    L = 4
    x0 = data(2, L, seed=3)
    obj = build_objective(cfg("mdlm", seq_len=L), MASK, V, evaluation=True)
    got = ex.exact_batch(obj, model, x0)
    torch.testing.assert_close(got["cells"], brute_force(model, x0, L, objective="mdlm"), rtol=1e-5, atol=1e-5)


# ---- the derivation: quadrature over t of the MC integrand ------------------------------------------
@torch.no_grad()
def test_exact_equals_quadrature_of_the_mc_integrand(model):
    """int_0^1 (1/t) E_{M ~ Bern(t)^B}[f(M)] dt by quadrature, E over masks by enumeration with their
    Bernoulli probabilities (no 1/k anywhere) == the 1/k formula."""
    L, block = 8, 4
    x0 = data(1, L, seed=21)
    obj = build_objective(cfg(block=block, seq_len=L), MASK, V, evaluation=True)
    got = ex.exact_batch(obj, model, x0)["cells"][0]
    for j in range(L // block):
        fk = []  # (k, f(M)) for every mask of block j
        for bits in itertools.product([0, 1], repeat=block):
            m = torch.zeros(1, L, dtype=torch.bool)
            m[0, j * block:(j + 1) * block] = torch.tensor(bits, dtype=torch.bool)
            lp = logp_rows(model, "bd3lm", torch.where(m, MASK, x0), x0, None, block)[0]
            f = -sum(float(lp[i, x0[0, i]]) for i in range(L) if m[0, i])
            fk.append((sum(bits), f))

        def integrand(t):
            return sum(t ** k * (1 - t) ** (block - k) * f for k, f in fk) / t

        val = integrate.quad(integrand, 0.0, 1.0, epsabs=1e-12, epsrel=1e-12)[0]
        assert float(got[j]) == pytest.approx(val, rel=1e-6)


# ---- exact == the Monte Carlo mean ------------------------------------------------------------------
@torch.no_grad()
def test_exact_equals_mc_mean_within_its_standard_error(model):
    L, block = 8, 4
    c = cfg(block=block, seq_len=L)
    x0 = data(2, L, seed=4)
    res = ex.evaluate_exact_or_stratified(c, model, [{"input_ids": x0}], likelihood="exact", mask_id=MASK, vocab_size=V)
    assert res["nelbo_se"] == 0.0 and res["forward_passes"] == 15 and res["tokens"] == 16
    obj = build_objective(c, MASK, V, evaluation=True)
    gen = torch.Generator().manual_seed(1)
    batch = x0.repeat(128, 1)  # identical copies: the batch's stratified t's cover [eps, 1] for each row
    reps = []
    for _ in range(60):
        out = obj(model, batch, gen, train=False)
        reps.append(float(out.nelbo_sum / out.token_count))
    reps = np.array(reps)
    se = reps.std(ddof=1) / math.sqrt(len(reps))
    target = res["nelbo_at_sampling_eps"]  # the MC's exact expectation (t ~ U[eps, 1])
    assert abs(reps.mean() - target) < 4 * se, (reps.mean(), target, se)
    # eps = 1e-3 moves the value by O(eps) only, but it does move it (both numbers are computed)
    assert res["nelbo"] == pytest.approx(target, rel=5e-3) and res["nelbo"] != target


# ---- B = 1 is the exact L'=1 AR NLL -----------------------------------------------------------------
@torch.no_grad()
def test_b1_exact_equals_ar_nll_by_prefix_runs(model):
    """BD3 L'=1 on [x_t ; x0] with every x_t token masked is the project's AR (DESIGN invariant 5: the
    tuned U[1,1] objective); independently: run the model causally on [x0_<i, MASK] for every i."""
    L = 6
    x0 = data(2, L, seed=8)
    c = cfg(block=1, seq_len=L)
    res = ex.evaluate_exact_or_stratified(c, model, [{"input_ids": x0}], likelihood="exact", mask_id=MASK, vocab_size=V)
    assert res["forward_passes"] == 1
    nll = 0.0
    for i in range(L):
        ids = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], 1)
        logits = model(ids, torch.arange(i + 1).expand(2, -1), AttentionSpec("causal", i + 1), None, None)[:, -1].double()
        logits[:, MASK] = float("-inf")
        nll += float(-torch.log_softmax(logits, -1).gather(-1, x0[:, i:i + 1]).sum())
    assert res["nelbo"] == pytest.approx(nll / (2 * L), rel=1e-6)
    tuned = cfg(block=1, seq_len=L)
    tuned.diffusion.time_mode = "tuned"
    out = build_objective(tuned, MASK, V)(model, x0, None, train=True)
    assert res["nelbo"] == pytest.approx(float(out.loss), rel=1e-6)


# ---- stratified: unbiased at B = 8, smaller error than MC at equal forwards -------------------------
@torch.no_grad()
def test_stratified_unbiased_and_beats_mc_at_equal_forwards(model):
    L, block, units = 16, 8, 2
    c = cfg(block=block, seq_len=L, ignore_bos=True)  # the first block has 7 counted positions
    x0 = data(2, L, seed=13)
    batches = [{"input_ids": x0}]
    exact = ex.evaluate_exact_or_stratified(c, model, batches, likelihood="exact", mask_id=MASK, vocab_size=V)
    gen = torch.Generator().manual_seed(0)
    runs = [ex.evaluate_exact_or_stratified(c, model, batches, likelihood="stratified", mask_id=MASK, vocab_size=V,
                                            generator=gen, units=units) for _ in range(50)]
    per_batch = ex.stratified_forwards(block, units)
    assert runs[0]["forward_passes"] == per_batch == 29
    est = np.array([r["nelbo"] for r in runs])
    sd = est.std(ddof=1)
    assert abs(est.mean() - exact["nelbo"]) < 4 * sd / math.sqrt(len(est)), (est.mean(), exact["nelbo"], sd)
    # the reported SE is honest: close to the spread of repeated runs
    reported = np.sqrt(np.mean([r["nelbo_se"] ** 2 for r in runs]))
    assert 0.75 < reported / sd < 1.3, (reported, sd)  # (a missing 1/units would give 1.37)
    # Monte Carlo (today's estimator) with the same number of forwards: mean of 29 independent draws
    obj = build_objective(c, MASK, V, evaluation=True)
    mgen = torch.Generator().manual_seed(0)
    mc = []
    for _ in range(50):
        draws = [obj(model, x0, mgen, train=False) for _ in range(per_batch)]
        mc.append(sum(float(d.nelbo_sum) for d in draws) / sum(int(d.token_count) for d in draws))
    mc_sd = np.std(mc, ddof=1)
    assert sd < mc_sd, (sd, mc_sd)
    assert abs(np.mean(mc) - exact["nelbo_at_sampling_eps"]) < 4 * mc_sd / math.sqrt(len(mc))


@torch.no_grad()
def test_stratified_draws_are_k_subsets_of_counted_positions(model):
    """Every stratified forward masks exactly k counted positions per active cell (spy on the model)."""
    L, block = 8, 4
    c = cfg(block=block, seq_len=L, ignore_bos=True)
    obj = build_objective(c, MASK, V, evaluation=True)
    seen = []

    def spy(ids, pos, spec, sigma, rng):
        seen.append((ids[:, :L] == MASK).view(ids.shape[0], L // block, block).sum(-1))
        return model(ids, pos, spec, sigma, rng)

    ex.stratified_batch(obj, spy, data(2, L), torch.Generator().manual_seed(0), units=3)
    assert len(seen) == ex.stratified_forwards(block, 3)
    ks = [k for k in range(1, block) for _ in range(3) for _ in range(2)] + [block]
    for k, counts in zip(ks, seen):
        assert torch.equal(counts[:, 1], torch.full((2,), k))  # full blocks: exactly k masked
        assert torch.equal(counts[:, 0], torch.full((2,), min(k, block - 1)))  # BOS block: 3 counted
    assert int(seen[-1][0, 0]) == block - 1  # BOS kept clean even in the all-masked pass


# ---- refusals ----------------------------------------------------------------------------------------
def test_refusals_are_one_line_user_errors():
    with pytest.raises(UserError, match="stratified") as e:
        ex.check_supported(cfg(block=16, seq_len=32), "exact")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="stratified"):
        ex.check_supported(cfg("mdlm", seq_len=16), "exact")
    ex.check_supported(cfg("mdlm", seq_len=8), "exact")
    ex.check_supported(cfg(block=16, seq_len=32), "stratified")
    with pytest.raises(UserError, match="time conditioning"):
        ex.check_supported(cfg(block=4, time_conditioning=True), "exact")
    with pytest.raises(UserError, match="sedd"):
        ex.check_supported(cfg("sedd"), "stratified")
    ex.check_supported(cfg("sedd"), "mc")
    with pytest.raises(UserError, match="at least 2"):
        ex.stratified_batch(build_objective(cfg(), MASK, V, evaluation=True), None, data(1, 8), None, units=1)


@pytest.mark.parametrize("units", [1, 0, -3])
def test_units_are_checked_before_any_data_is_read(tmp_path, units):
    """--likelihood-units < 2 is refused by check_supported, i.e. before the loader (a missing dataset
    prefix would otherwise be the error), and only for the estimator that reads it."""
    with pytest.raises(UserError, match=f"--likelihood-units={units}") as e:
        ex.check_supported(cfg(block=4), "stratified", units=units)
    assert "\n" not in str(e.value) and "2 or more" in str(e.value)
    ex.check_supported(cfg(block=4), "exact", units=units)  # exact and mc ignore units
    ex.check_supported(cfg(block=4), "mc", units=units)
    with pytest.raises(UserError, match="--likelihood-units"):
        ex.evaluate_prefix_likelihood(cfg(block=4), None, str(tmp_path / "missing"), None, likelihood="stratified",
                                      seed=0, units=units, progress=False)
    with pytest.raises(UserError, match="no .bin/.idx"):  # with valid units the data check comes next
        ex.evaluate_prefix_likelihood(cfg(block=4), None, str(tmp_path / "missing"), None, likelihood="stratified",
                                      seed=0, units=2, progress=False)


@torch.no_grad()
def test_mc_path_is_todays_evaluation_plus_se(model):
    from megabd3.eval.nelbo import evaluate_nelbo

    c = cfg(block=2, seq_len=8)
    batches = [{"input_ids": data(4, 8, seed=s)} for s in range(3)]
    today = evaluate_nelbo(c, model, batches, mask_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(9))
    got = ex.evaluate_likelihood(c, model, batches, likelihood="mc", mask_id=MASK, vocab_size=V,
                                 generator=torch.Generator().manual_seed(9))
    assert got["nelbo"] == today["nelbo"] and got["forward_passes"] == 3
    assert got["t_range"] == "[0.001, 1]"  # MC integrates t over [sampling_eps, 1]
    # between-cell SE from var_nelbo: cells = tokens / B, each cell sum has variance B^2 var_nelbo
    assert got["nelbo_se"] == pytest.approx(math.sqrt(today["var_nelbo"] * 2 * 96) / 96)
