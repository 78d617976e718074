"""lm-eval-harness adapter (megabd3.eval.lm_eval_adapter): lm_eval runs a local multiple-choice
(loglikelihood) task and a local perplexity (loglikelihood_rolling) task end to end on tiny AR and
BD3 checkpoints, and every number it logs equals an independent computation with the model:
AR: a direct causal forward; BD3 (B = 4): brute-force subset enumeration per block written here, and
:func:`megabd3.eval.exact_nelbo.exact_batch` for whole documents."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("megatron.core")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.masks import AttentionSpec  # noqa: E402
from megabd3.eval import lm_eval_adapter as ad  # noqa: E402  (registers "megabd3")

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "lm_eval"
L, B = 16, 4


# ------------------------------------------------------------------ checkpoints
def make_checkpoint(root: Path, objective: str) -> Path:
    from megabd3.config.load import save_resolved
    from megabd3.data.tokenizers import get_tokenizer
    from megabd3.eval.inference import build_inference_model, single_process

    c = Config()
    m = c.model
    m.hidden_size, m.num_heads, m.num_layers, m.cond_dim, m.dropout, m.attention_backend = 32, 2, 1, 16, 0.0, "dense"
    c.parallel.precision = "fp32"
    c.data.tokenizer, c.data.seq_len = "gpt2", L
    c.diffusion.objective, c.diffusion.block_size = objective, (B if objective == "bd3lm" else 1)
    c.eval.use_ema = False
    tok = get_tokenizer("gpt2")
    model = build_inference_model(single_process(c), tok.model_vocab_size, "cpu")
    g = torch.Generator().manual_seed(1)
    d = m.hidden_size
    with torch.no_grad():  # random weights (the reference init zeroes the head) ...
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            # ... but no constant offsets: with random biases / adaLN shifts one token is the argmax
            # everywhere, and greedy decoding would not depend on its context at all
            if name.endswith("bias") or "adaLN" in name or "sigma_map" in name:
                p.zero_()
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            if name.endswith("adaLN_modulation.bias"):  # chunks shift1, scale1, gate1, shift2, scale2, gate2
                p[2 * d: 3 * d] = 1.0
                p[5 * d: 6 * d] = 1.0
    step = root / f"run_{objective}" / "checkpoints" / "step_00000001"
    save_resolved(c, step)
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                "ema": None, "step": 1}, step / "model.pt")
    return step


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_ckpt")
    return {o: make_checkpoint(root, o) for o in ("ar", "bd3lm", "mdlm")}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The fixture tasks with absolute data_files (lm_eval resolves relative ones against the cwd)."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for f in FIX.iterdir():
        text = f.read_text()
        if f.suffix == ".yaml":
            text = text.replace("test: mc.jsonl", f"test: {FIX / 'mc.jsonl'}").replace("test: ppl.jsonl", f"test: {FIX / 'ppl.jsonl'}")
        (d / f.name).write_text(text)
    return d


def evaluate(ckpt: Path, task_dir: Path, model_args: str = "") -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="megabd3", model_args=f"checkpoint={ckpt}{model_args}",
                                   tasks=["megabd3_local_mc", "megabd3_local_ppl"], batch_size=3,
                                   task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)


# ------------------------------------------------------------------ independent references
def tokens(tok, context: str, continuation: str):
    ctx = tok.encode(context) if context else []
    whole = tok.encode(context + continuation)
    assert whole[: len(ctx)] == ctx  # the fixtures tokenise without a merge at the boundary
    return [tok.bos_id] + whole, 1 + len(ctx)


def ar_reference(lm, ids, first) -> tuple:
    """log p(ids[first:] | ids[:first]) by one causal forward and an explicit log-softmax."""
    x = torch.tensor([ids])
    n = x.shape[1]
    with torch.no_grad():
        logits = lm.model(x, torch.arange(n)[None], AttentionSpec("causal", n), None, (0, n - 1))
    logits = logits[0, :, : lm.tok.model_vocab_size].double()
    logits[:, lm.tok.mask_id] = -math.inf
    logp = torch.log_softmax(logits, -1)
    ll = sum(float(logp[i - 1, ids[i]]) for i in range(first, n))
    greedy = all(int(logp[i - 1].argmax()) == ids[i] for i in range(first, n))
    return ll, greedy


def bd3_logits(lm, xt, x0, n) -> torch.Tensor:
    """SUBS log-probabilities [L, V] of the noisy stream xt [1, L] after the clean stream x0 (one 2L forward)."""
    real = torch.zeros(1, L, dtype=torch.bool)
    real[0, :n] = True
    with torch.no_grad():
        logits = lm.model(torch.cat([xt, x0], 1), torch.arange(L).repeat(2)[None], AttentionSpec("bd3", L, B, real),
                          None, (0, L))
    logits = logits[0, :, : lm.tok.model_vocab_size].double()
    logits[:, lm.tok.mask_id] = -math.inf
    return torch.log_softmax(logits, -1)


def bd3_brute_force(lm, ids, first) -> float:
    """-sum over blocks of sum_{M subset S_block, M != {}} f(M) / (|M| C(|S|, |M|)), padded to L, one
    forward per (block, subset): the block-restricted NELBO of the module docstring, term by term."""
    n = len(ids)
    x0 = torch.full((1, L), lm.tok.eod_id)
    x0[0, :n] = torch.tensor(ids)
    total = 0.0
    for blk in range(L // B):
        S = [i for i in range(blk * B, blk * B + B) if first <= i < n]
        for k in range(1, len(S) + 1):
            for M in itertools.combinations(S, k):
                xt = x0.clone()
                xt[0, list(M)] = lm.tok.mask_id
                logp = bd3_logits(lm, xt, x0, n)
                f = -sum(float(logp[i, ids[i]]) for i in M)
                total += f / (k * math.comb(len(S), k))
    return -total


def exact_nelbo_doc(lm, ids) -> float:
    """Whole document via exact_nelbo.exact_batch (ignore_bos: BOS clean and unscored), padded to L."""
    import copy

    from megabd3.diffusion.objectives import build_objective
    from megabd3.eval.exact_nelbo import exact_batch

    cfg = copy.deepcopy(lm.cfg)
    cfg.diffusion.ignore_bos = True
    obj = build_objective(cfg, lm.tok.mask_id, lm.tok.model_vocab_size, evaluation=True)
    x0 = torch.full((1, L), lm.tok.eod_id)
    x0[0, : len(ids)] = torch.tensor(ids)
    mask = torch.zeros(1, L, dtype=torch.long)
    mask[0, : len(ids)] = 1
    fn = lambda *a, **k: lm.model(*a, **k)  # noqa: E731
    return -float(exact_batch(obj, fn, x0, mask)["cells"].sum())


def logged(results: dict, task: str):
    """[(arguments, response)] per request of a task from lm_eval's sample log."""
    out = []
    for s in results["samples"][task]:
        for args, resp in zip(s["arguments"], s["resps"]):
            out.append((tuple(args.values()) if isinstance(args, dict) else tuple(args), resp[0]))
    return out


# ------------------------------------------------------------------ tests
def test_score_windows_cover_each_token_once_with_max_context():
    for n, first, m in [(5, 1, 16), (40, 1, 16), (40, 30, 16), (33, 3, 4), (17, 1, 2)]:
        seen = []
        for s, e, k in ad.score_windows(n, first, m):
            assert e - s <= m and k >= 1 and e - k - s >= 1  # fits, scores something, keeps >= 1 context token
            assert s == max(0, e - m)  # as much context as fits
            seen += list(range(e - k, e))
        assert seen == list(range(first, n))


@pytest.mark.parametrize("objective", ["ar", "bd3lm"])
def test_lm_eval_end_to_end_matches_independent_likelihoods(ckpts, task_dir, objective):
    res = evaluate(ckpts[objective], task_dir, ",likelihood=exact")
    mc, ppl = res["results"]["megabd3_local_mc"], res["results"]["megabd3_local_ppl"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and math.isfinite(ppl["word_perplexity,none"])
    lm = ad.MegaBD3LM(checkpoint=str(ckpts[objective]), likelihood="exact")
    ll_req = logged(res, "megabd3_local_mc")
    assert len(ll_req) == 8  # 3 + 3 + 2 choices
    for (context, continuation), (ll, greedy) in ll_req:
        ids, first = tokens(lm.tok, context, continuation)
        if objective == "ar":
            want, want_greedy = ar_reference(lm, ids, first)
            assert greedy == want_greedy
        else:
            want = bd3_brute_force(lm, ids, first)
        assert ll == pytest.approx(want, rel=1e-6, abs=1e-6)
    docs = logged(res, "megabd3_local_ppl")
    assert len(docs) == 3
    words = 0
    total = 0.0
    for (text, *_), ll in docs:
        ids = [lm.tok.bos_id] + lm.tok.encode(text)
        assert len(ids) <= L
        want = ar_reference(lm, ids, 1)[0] if objective == "ar" else exact_nelbo_doc(lm, ids)
        assert float(ll) == pytest.approx(want, rel=1e-6, abs=1e-6)
        total += want
        words += len(text.split())
    # lm_eval's word perplexity is exp(-sum ll / sum words) of exactly these numbers
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-6)


def req(*args):
    return SimpleNamespace(args=args)


def bd3_greedy_reference(lm, ids, first, decode: bool = False):
    """Confidence-ordered greedy unmasking, block by block, one forward per revealed token: each step reveals
    the masked scored position of the block with the largest top probability (lowest position on ties).
    decode=False: whether every revealed argmax equals ids (is_greedy); decode=True: the decoded tokens
    (positions >= first) that greedy decoding produces after ids[:first]."""
    n = len(ids)
    x0 = torch.full((1, L), lm.tok.eod_id)
    x0[0, :n] = torch.tensor(ids)
    right = True
    for blk in range(L // B):
        masked = [i for i in range(blk * B, blk * B + B) if first <= i < n]
        while masked:
            xt = x0.clone()
            xt[0, masked] = lm.tok.mask_id
            logp = bd3_logits(lm, xt, x0, n)
            top = [float(logp[i].max()) for i in masked]
            i = masked[top.index(max(top))]  # list.index: the first, i.e. lowest, position on ties
            arg = int(logp[i].argmax())
            right &= arg == ids[i]
            if decode:
                x0[0, i] = arg
            masked.remove(i)
    return x0[0, first:n].tolist() if decode else right


def test_bd3_is_greedy_matches_an_independent_greedy_decoder(ckpts):
    """is_greedy for BD3: True for the continuation a hand-written greedy decoder produces (spanning three
    blocks, one of them shared with the context), False after changing any one of its tokens, and equal to
    the reference's verdict on the fixture's continuations."""
    lm = ad.MegaBD3LM(checkpoint=str(ckpts["bd3lm"]), likelihood="exact")
    ctx = [lm.tok.bos_id] + lm.tok.encode("The river runs fast")  # 5 tokens: block [4, 8) is shared
    first = len(ctx)
    greedy = bd3_greedy_reference(lm, ctx + [0] * 9, first, decode=True)
    ids = ctx + greedy
    assert bd3_greedy_reference(lm, ids, first)
    assert lm._score_requests([(ids, first)])[0][1] is True
    for j in (0, 4, 8):  # a changed token in each block: not greedy any more
        bad = list(ids)
        bad[first + j] = (bad[first + j] + 1) % (lm.tok.model_vocab_size - 1)
        assert not bd3_greedy_reference(lm, bad, first)
        assert lm._score_requests([(bad, first)])[0][1] is False
    for context, continuation in [("The river runs", " to the sea"), ("A cat", " sat on the mat")]:
        ids2, first2 = tokens(lm.tok, context, continuation)
        assert lm._score_requests([(ids2, first2)])[0][1] == bd3_greedy_reference(lm, ids2, first2)


def test_bd3_estimators_agree_with_exact(ckpts):
    """stratified and mc are unbiased estimates of the exact value (within 5 standard errors)."""
    r = [req("One, two,", " three four five six seven")]
    exact = ad.MegaBD3LM(checkpoint=str(ckpts["bd3lm"]), likelihood="exact").loglikelihood(r)[0][0]
    strat = ad.MegaBD3LM(checkpoint=str(ckpts["bd3lm"]), likelihood="stratified", units=16, seed=3)
    s = strat.loglikelihood(r)[0][0]
    assert abs(s - exact) <= 5 * strat.last_se[0] + 1e-9 and strat.last_se[0] > 0
    mc = ad.MegaBD3LM(checkpoint=str(ckpts["bd3lm"]), likelihood="mc", mc_samples=400, seed=3)
    m = mc.loglikelihood(r)[0][0]
    assert abs(m - exact) <= 5 * mc.last_se[0]


def test_long_document_is_windowed(ckpts):
    """A document longer than L: every token scored once, in windows; AR equals the window sum."""
    lm = ad.MegaBD3LM(checkpoint=str(ckpts["ar"]))
    text = " ".join(["alpha beta gamma delta"] * 8)
    got = lm.loglikelihood_rolling([req(text)])[0]
    ids = [lm.tok.bos_id] + lm.tok.encode(text)
    assert len(ids) > 2 * L
    want = 0.0
    pos = 1
    while pos < len(ids):  # chunks of L-1 scored tokens, each after the L - chunk tokens before it
        end = min(len(ids), pos + L - 1)
        start = max(0, end - L)
        want += ar_reference(lm, ids[start:end], pos - start)[0]
        pos = end
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("objective", ["ar", "bd3lm"])
def test_generate_until_prompt_stop_and_length(ckpts, objective):
    lm = ad.MegaBD3LM(checkpoint=str(ckpts[objective]), seed=0)
    out = lm.generate_until([req("The cat", {"until": ["\n\n"], "max_gen_toks": 6}),
                             req("The cat", {"until": ["\n\n"], "max_gen_toks": 6})])
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert out[0] == out[1]  # greedy (lm_eval's default do_sample=false): deterministic
    assert len(lm.tok.encode(out[0])) <= 6 + 2  # at most max_gen_toks tokens (re-tokenising may merge/split)
    # a stop string that the greedy text contains cuts it there
    if len(out[0]) > 2:
        stop = out[0][1:3]
        cut = lm.generate_until([req("The cat", {"until": [stop], "max_gen_toks": 6})])[0]
        assert cut == out[0][: out[0].index(stop)]


def test_bad_model_args_are_one_line_errors(ckpts):
    from megabd3.errors import UserError

    with pytest.raises(UserError, match="likelihood"):
        ad.MegaBD3LM(checkpoint=str(ckpts["bd3lm"]), likelihood="nope")
    with pytest.raises(UserError, match="dotted key"):
        ad.MegaBD3LM(checkpoint=str(ckpts["bd3lm"]), top_p=0.3)


@pytest.mark.slow
def test_cli_module_runs_lm_eval(ckpts, task_dir, tmp_path):
    """`python -m megabd3.eval.lm_eval_adapter --model megabd3 ...` is lm_eval's CLI with the model registered."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "megabd3.eval.lm_eval_adapter", "--model", "megabd3",
           "--model_args", f"checkpoint={ckpts['bd3lm']}", "--tasks", "megabd3_local_ppl",
           "--include_path", str(task_dir), "--batch_size", "2"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "megabd3_local_ppl" in r.stdout and "word_perplexity" in r.stdout


def mdlm_brute_force(lm, ids, first) -> float:
    """MDLM: one bidirectional window; -sum_{M subset S} f(M) / (|M| C(|S|, |M|)) by explicit subsets."""
    n = len(ids)
    x0 = torch.tensor([ids])
    S = list(range(first, n))
    total = 0.0
    for k in range(1, len(S) + 1):
        for M in itertools.combinations(S, k):
            xt = x0.clone()
            xt[0, list(M)] = lm.tok.mask_id
            with torch.no_grad():
                logits = lm.model(xt, torch.arange(n)[None], AttentionSpec("full", n, n), None, None)
            logits = logits[0, :, : lm.tok.model_vocab_size].double()
            logits[:, lm.tok.mask_id] = -math.inf
            logp = torch.log_softmax(logits, -1)
            total += -sum(float(logp[i, ids[i]]) for i in M) / (k * math.comb(len(S), k))
    return -total


def test_mdlm_loglikelihood_and_generation(ckpts):
    lm = ad.MegaBD3LM(checkpoint=str(ckpts["mdlm"]))  # likelihood=auto: exact for <= 8 tokens
    pairs = [("The cat sat on the", " mat"), ("Water is", " a small dry stone")]
    got = lm.loglikelihood([req(*p) for p in pairs])
    for (context, continuation), (ll, _) in zip(pairs, got):
        ids, first = tokens(lm.tok, context, continuation)
        assert ll == pytest.approx(mdlm_brute_force(lm, ids, first), rel=1e-6, abs=1e-6)
    out = lm.generate_until([req("The cat", {"until": ["\n\n"], "max_gen_toks": 5})])
    assert isinstance(out[0], str)


# ------------------------------------------------------------------ review fixes (issue 13 item 2)
def spy_generate(monkeypatch, lm):
    """Record (prompt tokens, generated length) of every _generate call of ``lm``."""
    calls = []
    inner = lm._generate

    def spy(prompt, max_gen, *a, **k):
        calls.append((list(prompt), max_gen))
        return inner(prompt, max_gen, *a, **k)

    monkeypatch.setattr(lm, "_generate", spy)
    return calls


@pytest.mark.parametrize("objective", ["ar", "bd3lm"])
def test_generate_prompt_has_priority_over_max_gen_toks(ckpts, objective, monkeypatch, caplog):
    """max_gen_toks >= L (lm_eval's 256 vs the demo's 128; here L=16) used to leave [BOS] alone."""
    lm = ad.MegaBD3LM(checkpoint=str(ckpts[objective]))
    calls = spy_generate(monkeypatch, lm)
    short, long_ = "The cat sat", "one two three four five six seven eight nine ten eleven twelve"
    s_ids, l_ids = lm.tok.encode(short), lm.tok.encode(long_)
    assert len(s_ids) + 1 < L // 2 and len(l_ids) + 1 > L // 2
    bos = lm.tok.bos_id
    with caplog.at_level("WARNING", logger=ad.__name__):
        out = lm.generate_until([req(short, {"until": [], "max_gen_toks": L}),
                                 req(short, {"until": [], "max_gen_toks": 256}),
                                 req(long_, {"until": [], "max_gen_toks": L + 4})])
        # a short prompt is kept whole; generation gets the rest of the window
        assert calls[0] == ([bos] + s_ids, L - 1 - len(s_ids)) and calls[1] == calls[0]
        # a long prompt keeps its last L // 2 tokens (BOS included), generation the other half
        assert calls[2] == ([bos] + l_ids[-(L // 2 - 1):], L - L // 2)
        # the same as asking for exactly what fits (greedy: deterministic), which warns nothing
        fit = lm.generate_until([req(short, {"until": [], "max_gen_toks": L - 1 - len(s_ids)})])[0]
        assert out[0] == out[1] == fit
        lm.generate_until([req(long_, {"until": [], "max_gen_toks": 300})])  # still no second warning
    warned = [r for r in caplog.records if "does not fit data.seq_len" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0].getMessage()
    # a prompt that fits with max_gen_toks is cut from the left, as HFLM does, without a warning
    calls.clear()
    lm.generate_until([req(long_, {"until": [], "max_gen_toks": 3})])
    assert calls == [([bos] + l_ids[-(L - 3 - 1):], 3)]


def stop_spy(monkeypatch, lm):
    """The generated tokens of the last _generate call (what _stop saw last)."""
    seen = []
    inner = lm._stop

    def spy(gen, until):
        seen.append(list(gen))
        return inner(gen, until)

    monkeypatch.setattr(lm, "_stop", spy)
    return seen


@pytest.mark.parametrize("objective", ["bd3lm", "mdlm"])
def test_greedy_generation_is_independent_of_the_batch(ckpts, objective, monkeypatch):
    """Greedy (do_sample=false) text of a request is the same alone, first or second in a batch, and
    it is what the scoring side's greedy check (is_greedy) calls greedy."""
    ck = str(ckpts[objective])
    r = req("The cat sat on the", {"until": [], "max_gen_toks": 6})
    others = [req("Water is", {"until": [], "max_gen_toks": 5}), req("One, two", {"until": [], "max_gen_toks": 7})]
    alone = ad.MegaBD3LM(checkpoint=ck).generate_until([r])[0]
    first = ad.MegaBD3LM(checkpoint=ck).generate_until([r] + others)[0]
    lm = ad.MegaBD3LM(checkpoint=ck)
    second = lm.generate_until(others[:1] + [r])[1]
    again = lm.generate_until(others[::-1] + [r])[2]  # the adapter's generator has moved on by now
    assert alone == first == second == again
    # greedy confidence decoding reproduces the generated tokens: prompt (BOS + 5 tokens) + 6 = 12 = 3 blocks
    seen = stop_spy(monkeypatch, lm)
    lm.generate_until([r])
    prompt = [lm.tok.bos_id] + lm.tok.encode("The cat sat on the")
    gen = seen[-1]
    assert len(prompt) + len(gen) == 12 and len(gen) == 6
    (_, is_greedy, _), = lm._score_requests([(prompt + gen, len(prompt))])
    assert is_greedy
    # and a different continuation is not greedy
    other = gen[:-1] + [(gen[-1] + 1) % 50000]
    assert not lm._score_requests([(prompt + other, len(prompt))])[0][1]


def test_temperature_is_applied(ckpts, monkeypatch):
    from megabd3.errors import UserError
    from megabd3.sampling import block as block_mod

    # AR: sampling at a vanishing temperature is the argmax, i.e. greedy (at T=1 it is not)
    lm = ad.MegaBD3LM(checkpoint=str(ckpts["ar"]), seed=5)
    kw = {"until": [], "max_gen_toks": 6}
    greedy = lm.generate_until([req("The cat", kw)])[0]
    cold = lm.generate_until([req("The cat", dict(kw, do_sample=True, temperature=1e-6))])[0]
    warm = lm.generate_until([req("The cat", dict(kw, do_sample=True, temperature=1.0))])[0]
    assert cold == greedy != warm
    # BD3: the sampler's logits function returns the model's logits divided by the temperature
    first_logits = []
    inner = block_mod.denoise_block

    def spy(blk, fn, opts, gen):
        if not first_logits or len(first_logits) < spy.run:
            first_logits.append(fn(blk).clone())
        return inner(blk, fn, opts, gen)

    monkeypatch.setattr(block_mod, "denoise_block", spy)
    lm = ad.MegaBD3LM(checkpoint=str(ckpts["bd3lm"]), seed=5)
    for spy.run, t in ((1, 1.0), (2, 0.25)):
        lm.generate_until([req("The cat sat on", dict(kw, do_sample=True, temperature=t))])
    plain, hot = first_logits
    assert torch.allclose(hot * 0.25, plain, rtol=1e-5, atol=1e-5) and not torch.allclose(hot, plain)
    with pytest.raises(UserError, match="temperature"):
        lm.generate_until([req("The cat", dict(kw, do_sample=True, temperature=-1.0))])


def test_unsupported_gen_kwargs_warn_once(ckpts, caplog):
    lm = ad.MegaBD3LM(checkpoint=str(ckpts["ar"]))
    with caplog.at_level("WARNING", logger=ad.__name__):
        for _ in range(2):
            lm.generate_until([req("The cat", {"until": [], "max_gen_toks": 2, "top_k": 5})] * 2)
    assert sum("top_k" in r.getMessage() for r in caplog.records) == 1


def test_auto_estimator_is_chosen_per_request(ckpts):
    """likelihood=auto: a short continuation is scored exactly whatever it is batched with (a batch
    holding a > 8-token MDLM continuation used to turn the whole batch stratified)."""
    ck = str(ckpts["mdlm"])
    short = req("The cat sat on the", " mat all day")  # 3 tokens: a stratified value would vary
    long_ = req("Water", " is a small dry stone that the old man")
    lm = ad.MegaBD3LM(checkpoint=ck, batch_size=8, seed=1)
    alone = lm.loglikelihood([short])[0][0]
    both = lm.loglikelihood([long_, short])
    assert lm.last_se[1] == 0.0 and lm.last_se[0] > 0  # exact and stratified
    assert both[1][0] == pytest.approx(alone, rel=1e-9, abs=1e-9)
    ids, first = tokens(lm.tok, short.args[0], short.args[1])
    assert alone == pytest.approx(mdlm_brute_force(lm, ids, first), rel=1e-6, abs=1e-6)


def test_score_windows_are_lm_eval_rolling_windows():
    """score_windows over [BOS] + doc == lm_eval's get_rolling_token_windows(doc, BOS, L - 1, 1)
    (each window: lm_eval's input plus its last predicted token; the scored tokens are its predictions)."""
    from lm_eval.utils import get_rolling_token_windows

    for n, m in [(5, 16), (15, 16), (16, 16), (40, 16), (33, 4), (17, 2)]:
        doc = list(range(100, 100 + n))
        ids = [7] + doc
        ours = [(ids[s:e], ids[e - k:e]) for s, e, k in ad.score_windows(len(ids), 1, m)]
        theirs = [(inp + pred[-1:], pred) for inp, pred in get_rolling_token_windows(doc, 7, m - 1, 1)]
        assert ours == theirs


def test_split_follows_hflm_encode_pair(ckpts):
    lm = ad.MegaBD3LM(checkpoint=str(ckpts["ar"]))
    enc = lm.tok.encode
    # HFLM: trailing spaces move to the continuation, continuation = whole[len(ctx):]
    ctx, cont = lm._split("The cat sat on the ", "mat")
    whole, c = enc("The cat sat on the mat"), enc("The cat sat on the")
    assert (ctx, cont) == (c, whole[len(c):])
    # a merge across the boundary ("hel" + "lo" -> "hello"): tokenised separately here
    assert enc("hello")[: len(enc("hel"))] != enc("hel")
    assert lm._split("hel", "lo") == (enc("hel"), enc("lo"))


def test_batch_size_auto_uses_max_batch_size(ckpts):
    assert ad.MegaBD3LM(checkpoint=str(ckpts["ar"]), batch_size="auto", max_batch_size=3).batch_size == 3
    assert ad.MegaBD3LM(checkpoint=str(ckpts["ar"]), batch_size="auto:4").batch_size == 8
    assert ad.MegaBD3LM(checkpoint=str(ckpts["ar"]), batch_size=5, max_batch_size=3).batch_size == 5
