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
    with torch.no_grad():  # random weights everywhere (the reference init zeroes the head)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    step = root / f"run_{objective}" / "checkpoints" / "step_00000001"
    save_resolved(c, step)
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                "ema": None, "step": 1}, step / "model.pt")
    return step


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_ckpt")
    return {o: make_checkpoint(root, o) for o in ("ar", "bd3lm")}


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


def bd3_brute_force(lm, ids, first) -> float:
    """-sum over blocks of sum_{M subset S_block, M != {}} f(M) / (|M| C(|S|, |M|)), padded to L, one
    forward per (block, subset): the block-restricted NELBO of the module docstring, term by term."""
    n = len(ids)
    x0 = torch.full((1, L), lm.tok.eod_id)
    x0[0, :n] = torch.tensor(ids)
    real = torch.zeros(1, L, dtype=torch.bool)
    real[0, :n] = True
    pos = torch.arange(L).repeat(2)[None]
    total = 0.0
    for blk in range(L // B):
        S = [i for i in range(blk * B, blk * B + B) if first <= i < n]
        for k in range(1, len(S) + 1):
            for M in itertools.combinations(S, k):
                xt = x0.clone()
                xt[0, list(M)] = lm.tok.mask_id
                with torch.no_grad():
                    logits = lm.model(torch.cat([xt, x0], 1), pos, AttentionSpec("bd3", L, B, real), None, (0, L))
                logits = logits[0, :, : lm.tok.model_vocab_size].double()
                logits[:, lm.tok.mask_id] = -math.inf
                logp = torch.log_softmax(logits, -1)
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


def test_mdlm_loglikelihood_and_generation(tmp_path):
    lm = ad.MegaBD3LM(checkpoint=str(make_checkpoint(tmp_path, "mdlm")))  # likelihood=auto: exact for <= 8 tokens
    pairs = [("The cat sat on the", " mat"), ("Water is", " a small dry stone")]
    got = lm.loglikelihood([req(*p) for p in pairs])
    for (context, continuation), (ll, _) in zip(pairs, got):
        ids, first = tokens(lm.tok, context, continuation)
        assert ll == pytest.approx(mdlm_brute_force(lm, ids, first), rel=1e-6, abs=1e-6)
    out = lm.generate_until([req("The cat", {"until": ["\n\n"], "max_gen_toks": 5})])
    assert isinstance(out[0], str)
