"""Threshold and top-k-per-step parallel decoding inside BD3 blocks (megabd3/sampling/parallel.py).

Expected reveal positions are computed here independently (numpy float64 softmax with the mask token
removed, its largest entry as the confidence -- *before* any top-p truncation --, argmax with
lowest-position ties) from the logits the sampler actually received; revealed tokens must lie in the
reference nucleus written out by hand. So a wrong (e.g. truncated) confidence, a wrong tie rule, a
draw from the untruncated distribution or a batch-coupled reveal set or random stream fails these tests.
"""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from sampling_toy import ToyLM  # noqa: E402

from megabd3.errors import UserError  # noqa: E402
from megabd3.sampling.backend import ModelBackend  # noqa: E402
from megabd3.sampling.block import STRATEGIES, BD3Sampler, MDLMSampler, denoise_block  # noqa: E402
from megabd3.sampling.common import SamplerOptions, StopTracker  # noqa: E402

V, MASK, BOS = 41, 40, 0
DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.json")


def opts(**kw):
    base = dict(length=32, mask_id=MASK, bos_id=BOS, eod_id=BOS, vocab_size=V, block_size=8, window=64,
                top_p=0.95, train_length=32)
    base.update(kw)
    return SamplerOptions(**base)


@pytest.fixture(scope="module")
def toy():
    return ToyLM(V, seed=1)


def hand_probs(logits_row: np.ndarray) -> np.ndarray:
    """SUBS probabilities: float64 softmax with the mask token removed."""
    z = np.asarray(logits_row, dtype=np.float64).copy()
    z[MASK] = -np.inf
    e = np.exp(z - z.max())
    return e / e.sum()


def hand_confidence(logits_row: np.ndarray) -> float:
    """Largest probability of the *untruncated* SUBS distribution (the documented confidence)."""
    return float(hand_probs(logits_row).max())


def hand_nucleus(logits_row: np.ndarray, p: float) -> set:
    """Token ids kept by the reference nucleus (keep while inclusive cumsum <= p, top-1 always)."""
    probs = hand_probs(logits_row)
    order = np.argsort(-probs, kind="stable")
    if p >= 1.0:
        return {int(i) for i in order if probs[i] > 0}
    m = max(1, int(np.sum(np.cumsum(probs[order]) <= p)))
    return {int(i) for i in order[:m]}


class Recording(ModelBackend):
    """The real adapter, recording every denoising call: (block start, block before, logits)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def denoise_cached(self, cache, block, start, kind="bd3", positions=None, store=None):
        out = super().denoise_cached(cache, block, start, kind=kind, positions=positions, store=store)
        self.calls.append((start, block.clone(), out.clone()))
        return out


def sample_recorded(model, o, batch=2, seed=3):
    backend = Recording(model, o.vocab_size, o.window)
    res = BD3Sampler(backend, o).sample(batch, torch.Generator().manual_seed(seed))
    return res, backend.calls


def steps_per_block(calls, res, bsz):
    """[(block before, block after, logits)] per call, 'after' = the next call's block or the final one."""
    final = torch.tensor([r.tokens for r in res])
    out = []
    for i, (start, before, logits) in enumerate(calls):
        if i + 1 < len(calls) and calls[i + 1][0] == start:
            after = calls[i + 1][1]
        else:
            after = final[:, start : start + bsz]
        out.append((before, after, logits))
    return out


def test_strategies_match_config_choices():
    from megabd3.config.validate import SAMPLING_STRATEGIES

    assert tuple(STRATEGIES) == SAMPLING_STRATEGIES


@pytest.mark.parametrize("top_p,tau", [(1.0, 1.5), (0.8, 1.5), (0.5, 1.0)])
def test_tau_above_one_reveals_the_most_confident_position_one_per_step(toy, top_p, tau):
    o = opts(strategy="threshold", threshold=tau, top_p=top_p)
    res, calls = sample_recorded(toy, o)
    for r in res:
        assert r.nfe == o.length - 1 and len(r.tokens) == o.length and MASK not in r.tokens
    steps = steps_per_block(calls, res, o.block_size)
    assert len(steps) == o.length - 1  # one batched call per revealed token
    for before, after, logits in steps:
        for b in range(before.shape[0]):
            changed = (before[b] != after[b]).nonzero().flatten().tolist()
            masked = (before[b] == MASK).nonzero().flatten().tolist()
            conf = [hand_confidence(logits[b, j].numpy()) for j in masked]
            expected = masked[int(np.argmax(conf))]  # np.argmax: first maximum = lowest position
            assert changed == [expected], (changed, expected, conf)
            assert int(after[b, expected]) in hand_nucleus(logits[b, expected].numpy(), top_p)


def test_tau_above_one_is_not_first_hitting_order(toy):
    """The documented rule is confidence-first: the reveal order differs from first hitting's random one."""
    o = opts(strategy="threshold", threshold=2.0)
    _, calls_t = sample_recorded(toy, o)
    _, calls_f = sample_recorded(toy, opts())
    first_block = lambda calls: [c[1] for c in calls if c[0] == 0]  # noqa: E731
    assert any(not torch.equal(a, b) for a, b in zip(first_block(calls_t)[1:], first_block(calls_f)[1:]))


def test_tau_zero_reveals_every_masked_position_in_one_step(toy):
    o = opts(strategy="threshold", threshold=0.0)
    res, calls = sample_recorded(toy, o, batch=3)
    blocks = o.length // o.block_size
    assert len(calls) == blocks
    for r in res:
        assert r.nfe == blocks and MASK not in r.tokens
    # tiny tau: the same on a hand-made logits table
    fn_calls = []

    def fn(blk):
        fn_calls.append(blk.clone())
        return torch.randn(blk.shape[0], blk.shape[1], V, generator=torch.Generator().manual_seed(len(fn_calls)))

    blk = torch.full((2, 8), MASK)
    out, nfe = denoise_block(blk, fn, opts(strategy="threshold", threshold=1e-9), torch.Generator().manual_seed(0))
    assert (out != MASK).all() and nfe.tolist() == [1, 1] and len(fn_calls) == 1


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_reveals_min_k_masked_most_confident(toy, k):
    o = opts(strategy="topk_per_step", tokens_per_step=k)
    res, calls = sample_recorded(toy, o)
    steps = steps_per_block(calls, res, o.block_size)
    # block 0 has 7 masks (BOS given), the others 8
    per_block = [-(-7 // k)] + [-(-8 // k)] * (o.length // o.block_size - 1)
    assert len(steps) == sum(per_block)
    for r in res:
        assert r.nfe == sum(per_block)
    for before, after, logits in steps:
        for b in range(before.shape[0]):
            changed = (before[b] != after[b]).nonzero().flatten().tolist()
            masked = (before[b] == MASK).nonzero().flatten().tolist()
            assert len(changed) == min(k, len(masked))
            conf = np.array([hand_confidence(logits[b, j].numpy()) for j in masked])
            order = sorted(range(len(masked)), key=lambda i: (-conf[i], masked[i]))
            assert changed == sorted(masked[i] for i in order[:k])


def _sharp_fn(other, record):
    """Row-wise deterministic logits: row b's logits depend only on row b's block.

    Row 0: position j's peak grows with j and with the number of revealed positions, so its
    confidences cross tau at different steps for different positions. Row 1: ``other`` is
    "confident" (a sharp one-hot everywhere: all revealed at once), "diffuse" (uniform: one per
    step) or a float sharpness applied to row 0's rule.
    """
    table = torch.randn(8, V, generator=torch.Generator().manual_seed(7))

    def fn(blk):
        record.append(blk.clone())
        revealed = (blk != MASK).sum(-1).float()  # [b]
        peak = torch.zeros(blk.shape[0], blk.shape[1], V)
        peak[:, :, 5] = torch.arange(blk.shape[1]).float()[None] + 2 * revealed[:, None]
        logits = table[None] + peak
        if other == "confident":
            logits[1] = 0.0
            logits[1, :, 7] = 100.0
        elif other == "diffuse":
            logits[1] = 0.0
        else:
            logits[1] = logits[1] * other
        return logits

    return fn


def test_batch_rows_choose_reveals_independently():
    o = opts(strategy="threshold", threshold=0.7, top_p=1.0)
    blk = torch.full((2, 8), MASK)
    runs = {}
    for other in ("confident", "diffuse"):
        rec = []
        out, nfe = denoise_block(blk, _sharp_fn(other, rec), o, torch.Generator().manual_seed(5))
        runs[other] = (out, nfe, [r[0] for r in rec])
    (out_a, nfe_a, row0_a), (out_b, nfe_b, row0_b) = runs["confident"], runs["diffuse"]
    assert nfe_a[1] == 1 and nfe_b[1] == 8  # the other row: all at once vs one per step
    assert 1 < nfe_a[0] < 7  # row 0 reveals several per step, over several steps
    assert nfe_a[0] == nfe_b[0] and torch.equal(out_a[0], out_b[0])
    n = int(nfe_a[0])
    assert all(torch.equal(x, y) for x, y in zip(row0_a[:n], row0_b[:n]))  # same reveal sets step by step
    assert all(torch.equal(x, out_b[0]) for x in row0_b[n:])  # row 0 rides along unchanged once complete
    # and row 0's reveal sets are the hand rule's: above tau, else the single most confident
    for before, after in zip(row0_a[:n], row0_a[1:n] + [out_a[0]]):
        logits = _sharp_fn("diffuse", [])(before[None].repeat(2, 1))[0]
        masked = (before == MASK).nonzero().flatten().tolist()
        conf = [hand_confidence(logits[j].numpy()) for j in masked]
        want = [j for j, c in zip(masked, conf) if c > 0.7] or [masked[int(np.argmax(conf))]]
        assert (before != after).nonzero().flatten().tolist() == want


def test_threshold_counts_per_row_nfe_and_reduces_it():
    o = opts(strategy="threshold", threshold=0.9, top_p=1.0)
    blk = torch.full((2, 8), MASK)
    out, nfe = denoise_block(blk, _sharp_fn("diffuse", []), o, torch.Generator().manual_seed(1))
    assert (out != MASK).all() and nfe[1] == 8 and nfe[0] < 7


def _table_fn(rows_probs):
    """logits_fn returning log(probs) per position (tokens beyond the given ones get probability 0)."""
    def fn(blk):
        logits = torch.full((blk.shape[0], blk.shape[1], V), float("-inf"), dtype=torch.float64)
        for b, row in enumerate(rows_probs):
            for j, pr in enumerate(row):
                logits[b, j, 1 : 1 + len(pr)] = torch.log(torch.tensor(pr, dtype=torch.float64))
        return logits
    return fn


@pytest.mark.parametrize("nucleus", ["reference", "hf"])
def test_confidence_is_taken_before_top_p(nucleus):
    """Reviewer's case: raw (0.46, 0.45, 0.09) at top_p=0.9 is cut to one token by the reference nucleus
    (confidence 1.0 after truncation); its top probability 0.46 must not pass tau=0.95."""
    probs = [[0.46, 0.45, 0.09], [0.7, 0.25, 0.05], [0.2, 0.3, 0.5], [0.96, 0.03, 0.01]]
    o = opts(strategy="threshold", threshold=0.95, top_p=0.9, nucleus=nucleus)
    blk = torch.full((1, 4), MASK)
    blk[0, 3] = 5  # position 3 is already clean: never revealed again
    out, nfe = denoise_block(blk, _table_fn([probs]), o, torch.Generator().manual_seed(0))
    # nobody's top probability exceeds 0.95 among masked {0, 1, 2}: one per call, the most confident first
    assert nfe.tolist() == [3] and out[0, 3] == 5 and (out != MASK).all()
    calls = []
    fn = _table_fn([probs])
    denoise_block(blk, lambda b: (calls.append(b.clone()), fn(b))[1], o, torch.Generator().manual_seed(0))
    order = [int((calls[i + 1][0] != calls[i][0]).nonzero()) for i in range(len(calls) - 1)]
    assert order == [1, 2]  # by top probability 0.7, 0.5, then 0.46 last
    # and each drawn token lies in the nucleus: reference at 0.9 keeps one token at positions 0 and 1
    if nucleus == "reference":
        assert out[0, 0] == 1 and out[0, 1] == 1
    # a lower tau reveals exactly the positions whose *raw* top probability exceeds it
    o2 = opts(strategy="threshold", threshold=0.6, top_p=0.9, nucleus=nucleus)
    calls.clear()
    denoise_block(blk, lambda b: (calls.append(b.clone()), fn(b))[1], o2, torch.Generator().manual_seed(0))
    assert (calls[1][0] != calls[0][0]).nonzero().flatten().tolist() == [1]


def test_rows_keep_their_random_stream_across_blocks():
    """Row 0's tokens over two blocks do not depend on how many calls its batch mate needed.

    Row 1 is either confident (one call per block) or diffuse (one token per call), so the first
    block runs for a different number of calls; row 0 must still draw the same tokens in block 2.
    """
    o = opts(strategy="threshold", threshold=0.3, top_p=1.0)
    outs = {}
    for other in ("confident", "diffuse"):
        gen = torch.Generator().manual_seed(9)
        fn = _soft_fn(other)
        b1, n1 = denoise_block(torch.full((2, 8), MASK), fn, o, gen)
        b2, n2 = denoise_block(torch.full((2, 8), MASK), fn, o, gen)
        outs[other] = (b1, n1, b2, n2)
    a, d = outs["confident"], outs["diffuse"]
    assert a[1][1] == 1 and d[1][1] == 8  # the batch mate's block-1 call counts differ
    assert 1 < a[1][0] < 8  # and row 0's own count lies between them (so the blocks' call counts differ)
    assert torch.equal(a[0][0], d[0][0]) and torch.equal(a[2][0], d[2][0])  # row 0: both blocks identical
    assert a[1][0] == d[1][0] and a[3][0] == d[3][0]
    assert not torch.equal(a[0][0], a[2][0])  # and the draws are random (blocks differ)


def _soft_fn(other):
    """Row 0: flat-ish logits that sharpen as positions get revealed (several random draws per block)."""
    table = torch.randn(8, V, generator=torch.Generator().manual_seed(3)) * 0.5

    def fn(blk):
        revealed = (blk != MASK).sum(-1).float()
        logits = table[None].repeat(blk.shape[0], 1, 1)
        logits[:, :, 5] += revealed[:, None] * 0.8 + torch.arange(blk.shape[1]).float()[None] * 0.4
        if other == "confident":
            logits[1] = 0.0
            logits[1, :, 7] = 100.0
        else:
            logits[1] = 0.0
        return logits

    return fn


@pytest.mark.parametrize("strategy,extra", [("threshold", dict(threshold=0.3)), ("topk_per_step", dict(tokens_per_step=3))])
def test_seeded_determinism_and_cache_equivalence(toy, strategy, extra):
    o = opts(strategy=strategy, **extra)
    a, _ = sample_recorded(toy, o, seed=11)
    b, _ = sample_recorded(toy, o, seed=11)
    c, _ = sample_recorded(toy, o, seed=12)
    assert [r.tokens for r in a] == [r.tokens for r in b] and [r.nfe for r in a] == [r.nfe for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    u = BD3Sampler(ModelBackend(toy, V, o.window), opts(strategy=strategy, kv_cache=False, **extra))
    un = u.sample(2, torch.Generator().manual_seed(11))
    assert [r.tokens for r in un] == [r.tokens for r in a] and [r.nfe for r in un] == [r.nfe for r in a]


def test_mdlm_threshold_above_one_one_token_per_step(toy):
    o = opts(strategy="threshold", threshold=3.0, length=32, train_length=32)
    res = MDLMSampler(ModelBackend(toy, V, o.window), o).sample(2, torch.Generator().manual_seed(0))
    assert all(r.nfe == 31 and MASK not in r.tokens for r in res)


def test_stop_tracker_keeps_each_rows_nfe():
    """Variable-length stopping records the stopping row's own NFE, not the batch's."""
    o = opts(var_length=True, entropy_threshold=0.0, eod_id=3)
    st = StopTracker(2, o)
    x = torch.randint(4, 40, (2, 300), generator=torch.Generator().manual_seed(0))
    x[0, 100] = 3  # row 0 ends its document
    st.update(x, torch.tensor([7, 9]), 2)
    res = st.results(torch.cat([x, x[:, :8]], 1), torch.tensor([7, 11]), 3, 1.0)
    assert (res[0].nfe, res[0].stop_reason, res[0].length) == (7, "eos", 101)
    assert (res[1].nfe, res[1].stop_reason) == (11, "max_length")


@pytest.mark.parametrize("kw,msg", [
    (dict(strategy="bogus"), "sampling.strategy must be one of"),
    (dict(strategy="threshold", threshold=-0.1), "sampling.threshold=-0.1"),
    (dict(strategy="threshold", threshold=float("nan")), "sampling.threshold=nan"),
    (dict(strategy="topk_per_step", tokens_per_step=0), "sampling.tokens_per_step=0"),
    (dict(strategy="threshold", first_hitting=False), "conflicts with sampling.strategy=threshold"),
])
def test_sampler_option_errors(toy, kw, msg):
    with pytest.raises(UserError, match=msg) as e:
        BD3Sampler(ModelBackend(toy, V, 64), opts(**kw))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sets,msg", [
    (["sampling.strategy=fast"], "sampling.strategy='fast' is not one of"),
    (["sampling.strategy=threshold", "sampling.threshold=-1"], "sampling.threshold=-1.0 must lie in"),
    (["sampling.strategy=topk_per_step", "sampling.tokens_per_step=0"], "sampling.tokens_per_step=0 must be"),
    (["sampling.strategy=threshold", "sampling.first_hitting=false"], "conflicts with sampling.strategy=threshold"),
    (["sampling.strategy=threshold", "diffusion.objective=ar"], "applies to bd3lm and mdlm"),
])
def test_config_validation_errors(sets, msg):
    from megabd3.config.load import load_config

    with pytest.raises(Exception, match=msg):
        load_config(DEMO, sets)


def test_config_accepts_strategies_and_legacy_switch():
    from megabd3.config.load import load_config
    from megabd3.sampling.registry import options_from_config

    class Tok:
        mask_id, bos_id, eod_id, model_vocab_size = MASK, BOS, BOS, V

    cfg = load_config(DEMO, ["sampling.strategy=threshold", "sampling.threshold=1.5"])
    o = options_from_config(cfg, Tok())
    assert (o.rule, o.threshold) == ("threshold", 1.5)
    legacy = options_from_config(load_config(DEMO, ["sampling.first_hitting=false"]), Tok())
    assert legacy.rule == "ancestral"
    assert options_from_config(load_config(DEMO, []), Tok()).rule == "first_hitting"


def test_reveal_mask_tie_rules():
    from megabd3.sampling.parallel import reveal_mask

    conf = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.9, 0.1]])
    masked = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert reveal_mask(conf, masked, "threshold", 1.5).tolist() == [[False, True, False, False], [False, True, False, False]]
    assert reveal_mask(conf, masked, "threshold", 0.4).tolist() == [[False, True, True, True], [False, True, True, False]]
    assert reveal_mask(conf, masked, "topk_per_step", k=2).tolist() == [[False, True, True, False], [False, True, True, False]]
    assert reveal_mask(conf, masked, "topk_per_step", k=9).tolist() == masked.tolist()


def test_variable_length_stop_reports_each_rows_own_nfe(toy):
    """var_length with threshold decoding: a stopped row's NFE is the calls its own blocks needed."""
    o = opts(strategy="threshold", threshold=0.15, length=320, var_length=True, entropy_threshold=0.0, eod_id=5,
             window=512)
    res, calls = sample_recorded(toy, o, batch=3, seed=2)
    assert all(r.stop_reason == "eos" for r in res)
    stop_block = 264 // o.block_size  # rules apply once a sample is longer than 256 tokens: the 33rd block
    for i, r in enumerate(res):
        own = sum(int((blk[i] == MASK).any()) for start, blk, _ in calls if start < stop_block * o.block_size)
        assert r.nfe == own and r.tokens[-1] == 5 and 5 not in r.tokens[1:-1]
    assert len({r.nfe for r in res}) > 1  # rows revealed different numbers per step
    assert all(r.nfe < stop_block * o.block_size - 1 for r in res)  # fewer calls than tokens
