"""Objectives against independent computations: exact enumeration of masks (bd3lm NELBO), random-order
enumeration (exact NLL), per-prefix causal runs (AR and the L'=1 tuned schedule), mdlm == bd3lm at
L'=L, SEDD score entropy against a per-position loop."""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from megabd3.config.schema import Config
from megabd3.diffusion.masks import AttentionSpec
from megabd3.diffusion.objectives import build_objective, score_entropy
from megabd3.diffusion.reference_model import init_reference_model
from megabd3.diffusion.weighting import loss_weight
from megabd3.errors import UserError

V, MASK = 5, 4  # toy vocabulary: tokens 0..3, mask 4


def cfg(objective="bd3lm", block=2, seq_len=4, **diff):
    c = Config()
    c.diffusion.objective = objective
    c.diffusion.block_size = block
    c.data.seq_len = seq_len
    for k, v in diff.items():
        setattr(c.diffusion, k, v)
    return c


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return init_reference_model(V, seed=3, hidden=16, layers=2, heads=2)


def bd3_logits(model, x_t, x0, block):
    L = x0.shape[1]
    pos = torch.arange(L).repeat(2)[None].expand(x0.shape[0], -1)
    return model(torch.cat([x_t, x0], 1), pos, AttentionSpec("bd3", L, block), None, (0, L))


def subs_logp(logits):
    logits = logits.clone()
    logits[..., MASK] = float("-inf")
    return torch.log_softmax(logits.double(), -1)


@torch.no_grad()
def test_bd3lm_mc_nelbo_equals_exact_enumeration_and_bounds_nll(model):
    L, B, eps = 4, 2, 1e-3
    x0 = torch.tensor([[2, 0, 3, 1]])
    # Exact E over t (per block, U[eps, 1]) and all 2^L masks: sum_b sum_masks c_b(m) E[t_b^(k_b-1)(1-t_b)^(B-k_b)]
    # * prod_{b' != b} E[t^k (1-t)^(B-k)], with c_b(m) the CE summed over block b's masked tokens.
    @functools.lru_cache(maxsize=None)
    def moment(k, shift):
        return integrate.quad(lambda t: t ** (k - shift) * (1 - t) ** (B - k), eps, 1)[0] / (1 - eps)

    exact = 0.0
    for bits in itertools.product([0, 1], repeat=L):
        m = torch.tensor([bits], dtype=torch.bool)
        logp = subs_logp(bd3_logits(model, torch.where(m, MASK, x0), x0, B))
        ce = -logp[0].gather(-1, x0[0, :, None]).squeeze(-1)
        ks = [sum(bits[b * B:(b + 1) * B]) for b in range(L // B)]
        for b in range(L // B):
            if ks[b] == 0:
                continue
            c_b = float(ce[b * B:(b + 1) * B][m[0, b * B:(b + 1) * B]].sum())
            prob = moment(ks[b], 1)
            for b2 in range(L // B):
                if b2 != b:
                    prob *= moment(ks[b2], 0)
            exact += c_b * prob
    exact_per_token = exact / L

    obj = build_objective(cfg(block=B, seq_len=L), MASK, V)
    gen = torch.Generator().manual_seed(7)
    batch = x0.expand(512, L)  # identical rows: the stratified t's average over the full interval
    reps = []
    for _ in range(24):
        out = obj(model, batch, gen, train=False)
        reps.append(float(out.nelbo_sum / out.token_count))
    reps = np.array(reps)
    se = reps.std(ddof=1) / math.sqrt(len(reps))
    assert abs(reps.mean() - exact_per_token) < 4 * se, (reps.mean(), exact_per_token, se)

    # eps -> 0 the NELBO is the average over uniformly random unmasking orders of the summed CE
    # (any-order AR); the exact NLL is -log of the average of the products (Jensen: NLL <= NELBO).
    nelbo0, nll = 0.0, 0.0
    for b in range(L // B):
        lo = b * B
        terms = []
        for order in itertools.permutations(range(B)):
            m = torch.zeros(1, L, dtype=torch.bool)
            m[0, lo:lo + B] = True
            logprob = 0.0
            revealed = []
            for pos in order:
                m_now = m.clone()
                for r in revealed:
                    m_now[0, lo + r] = False
                logp = subs_logp(bd3_logits(model, torch.where(m_now, MASK, x0), x0, B))
                logprob += float(logp[0, lo + pos, x0[0, lo + pos]])
                revealed.append(pos)
            terms.append(logprob)
        nelbo0 += -np.mean(terms)
        nll += -(np.logaddexp.reduce(terms) - math.log(len(terms)))
    exact0 = exact_per_token  # continuity check: eps = 1e-3 changes the value by O(eps)
    assert exact0 == pytest.approx(nelbo0 / L, rel=5e-3)
    assert nll / L < exact_per_token - 1e-3
    assert reps.mean() > nll / L


@torch.no_grad()
def test_tuned_L1_equals_exact_ar_nll_by_prefix_runs(model):
    L = 6
    x0 = torch.tensor([[1, 3, 0, 2, 2, 1], [0, 0, 3, 1, 2, 3]])
    obj = build_objective(cfg(block=1, seq_len=L, time_mode="tuned"), MASK, V)
    out = obj(model, x0, torch.Generator().manual_seed(0), train=True)
    assert bool(out.masked.all())
    # Independent: for each i run the model causally on [x0_0..x0_{i-1}, MASK] (positions 0..i).
    expected = torch.zeros(2, L)
    for i in range(L):
        ids = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], 1)
        pos = torch.arange(i + 1).expand(2, -1)
        logp = subs_logp(model(ids, pos, AttentionSpec("causal", i + 1), None, None))[:, -1]
        expected[:, i] = -logp.gather(-1, x0[:, i:i + 1]).squeeze(-1).float()
    torch.testing.assert_close(out.per_token, expected, rtol=1e-5, atol=1e-5)
    assert float(out.loss) == pytest.approx(float(expected.mean()), rel=1e-5)
    # weight is exactly 1 (not 1/t) even though the interval is not "beta > 0.5"
    assert torch.equal(out.t, torch.ones_like(out.t))


@torch.no_grad()
def test_ar_objective_equals_prefix_nll_without_mask_token(model):
    """AR NLL = per-prefix causal runs, each scored by a log-softmax over the vocabulary with the mask
    token's entry deleted (the reference sets its logit to -1e6: the mask never occurs in data)."""
    x0 = torch.tensor([[1, 3, 0, 2, 2, 1]])
    out = build_objective(cfg("ar", seq_len=6), MASK, V)(model, x0, None, train=False)
    nll, nll_with_mask = 0.0, 0.0
    keep = [y for y in range(V) if y != MASK]
    for i in range(1, 6):
        logits = model(x0[:, :i], torch.arange(i)[None], AttentionSpec("causal", i), None, None)[0, -1].double()
        z = logits[keep]
        nll += float(-(z[keep.index(int(x0[0, i]))] - torch.logsumexp(z, 0)))
        nll_with_mask += float(-torch.log_softmax(logits, -1)[x0[0, i]])
    assert out.token_count == 5
    assert float(out.nelbo_sum) == pytest.approx(nll, rel=1e-5)
    assert abs(nll_with_mask - nll) > 1e-2  # the model does put mass on the mask id: the test can tell


@torch.no_grad()
def test_bd3lm_full_block_equals_mdlm(model):
    x0 = torch.randint(0, 4, (8, 6), generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        a = build_objective(cfg("mdlm", seq_len=6), MASK, V)(model, x0, torch.Generator().manual_seed(5), train=train)
        b = build_objective(cfg("bd3lm", block=6, seq_len=6), MASK, V)(model, x0, torch.Generator().manual_seed(5), train=train)
        assert torch.equal(a.t, b.t) and torch.equal(a.masked, b.masked)
        torch.testing.assert_close(a.per_token, b.per_token, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_subs_carry_over_loss_average_and_weighting(model):
    x0 = torch.randint(0, 4, (4, 8), generator=torch.Generator().manual_seed(2))
    obj = build_objective(cfg(block=2, seq_len=8, weighting="simple"), MASK, V)
    out = obj(model, x0, torch.Generator().manual_seed(3), train=True)
    assert bool((out.per_token[~out.masked] == 0).all())
    # averaged over ALL tokens, not only masked ones
    assert float(out.loss) == pytest.approx(float(out.per_token.sum() / x0.numel()), rel=1e-6)
    # simple: weight * (-loss_scaling) = 1 per block -> plain CE on masked tokens, every block
    logp = subs_logp(bd3_logits(model, torch.where(out.masked, MASK, x0), x0, 2))
    ce = -logp.gather(-1, x0[..., None]).squeeze(-1).float()
    torch.testing.assert_close(out.per_token[out.masked], ce[out.masked], rtol=1e-5, atol=1e-5)
    # the unweighted NELBO terms keep 1/t per block
    t_tok = out.t.repeat_interleave(2, 1).float()
    nelbo_expected = (ce / t_tok * out.masked).double().sum()
    assert float(out.nelbo_sum) == pytest.approx(float(nelbo_expected), rel=1e-5)
    # a log-SNR weighting multiplies each block by its own w(p)
    obj_fm = build_objective(cfg(block=2, seq_len=8, weighting="fm"), MASK, V)
    out_fm = obj_fm(model, x0, torch.Generator().manual_seed(3), train=True)
    w = loss_weight("fm", out.t, -1 / out.t).repeat_interleave(2, 1).float()
    torch.testing.assert_close(out_fm.per_token, (ce / t_tok * w) * out.masked, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_ignore_bos_and_padding(model):
    x0 = torch.randint(0, 4, (16, 8), generator=torch.Generator().manual_seed(4))
    out = build_objective(cfg(block=2, seq_len=8, ignore_bos=True), MASK, V)(model, x0, torch.Generator().manual_seed(0), train=True)
    assert not bool(out.masked[:, 0].any()) and out.token_count == 16 * 7
    att = torch.ones(16, 8, dtype=torch.bool)
    att[:, 6:] = False
    obj = build_objective(cfg(block=2, seq_len=8), MASK, V)
    a = obj(model, x0, torch.Generator().manual_seed(0), train=True, attention_mask=att)
    x0b = x0.clone()
    x0b[:, 6:] = 3  # different pad ids: invisible as keys and excluded from the sums
    b = obj(model, x0b, torch.Generator().manual_seed(0), train=True, attention_mask=att)
    assert a.token_count == 16 * 6
    assert bool((a.per_token[:, 6:] == 0).all())
    torch.testing.assert_close(a.loss, b.loss)


def test_score_entropy_matches_loop_and_is_zero_at_true_ratio():
    gen = torch.Generator().manual_seed(0)
    b, L = 2, 3
    logits = torch.randn(b, L, V, generator=gen)
    x0 = torch.randint(0, 4, (b, L), generator=gen)
    sigma = torch.tensor([[0.3], [2.5]], dtype=torch.float64)
    se = score_entropy(logits, x0, sigma, MASK, V)
    for i in range(b):
        s = float(sigma[i])
        q = 1 / math.expm1(s)
        for j in range(L):
            log_s = [float(logits[i, j, y]) - math.log(math.expm1(s)) - math.log(V - 1) for y in range(V)]
            pos = sum(math.exp(log_s[y]) for y in range(V) if y != MASK)
            ref = pos - q * log_s[int(x0[i, j])] + q * (math.log(q) - 1)
            assert float(se[i, j]) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert bool((se >= -1e-5).all())
    # a model that outputs the true ratios (q at x0, 0 elsewhere) has zero score entropy
    true = torch.full((b, L, V), -1e4)
    offset = torch.log(torch.expm1(sigma)) + math.log(V - 1)
    true.scatter_(-1, x0[..., None], (-torch.log(torch.expm1(sigma)) + offset).float()[:, :, None].expand(b, L, 1))
    assert float(score_entropy(true, x0, sigma, MASK, V).abs().max()) < 1e-5


@torch.no_grad()
def test_sedd_runs_time_conditioned_and_grads_flow():
    model = init_reference_model(V, seed=1, hidden=16, layers=1, heads=2, time_conditioning=True)
    x0 = torch.randint(0, 4, (4, 6), generator=torch.Generator().manual_seed(0))
    out = build_objective(cfg("sedd", seq_len=6), MASK, V)(model, x0, torch.Generator().manual_seed(0), train=False)
    assert out.per_token.shape == (4, 6) and bool((out.per_token >= -1e-5).all())
    assert bool((out.per_token[~out.masked] == 0).all())


def test_bad_combinations_raise_user_error():
    with pytest.raises(UserError, match="tuned"):
        build_objective(cfg(block=2, time_mode="tuned"), MASK, V)
    with pytest.raises(UserError, match="weighting"):
        build_objective(cfg("ar", weighting="fm"), MASK, V)
    with pytest.raises(UserError, match="weighting"):
        build_objective(cfg(weighting="nope"), MASK, V)
    with pytest.raises(UserError, match="objective"):
        build_objective(cfg("xyz"), MASK, V)
