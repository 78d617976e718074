"""Gen PPL end to end on a tiny causal LM saved to a local directory (no network)."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from megabd3.errors import UserError  # noqa: E402
from megabd3.eval.genppl import gen_ppl, load_judge, retokenize, sliding_window_nll  # noqa: E402
from megabd3.sampling.stopping import unigram_entropy  # noqa: E402

WORDS = ["<|endoftext|>"] + [f"w{i}" for i in range(40)]


class WordTokenizer:
    """A stand-in for the training tokenizer: ids -> space-separated words."""

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("judge")
    vocab = {w: i for i, w in enumerate(WORDS + ["[UNK]"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="[UNK]")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return str(d)


def brute_force_nll(model, ids, context, stride, exclude):
    """Each target j scored once, with the left context of the window that first contains it."""
    total, count = 0.0, 0
    for j in range(1, len(ids)):
        begin = 0 if j < context else ((j - context) // stride + 1) * stride
        assert begin < j <= begin + context - 1
        if ids[j] == exclude:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[begin:j]])).logits[0, -1].double()
        total -= torch.log_softmax(logits, -1)[ids[j]].item()
        count += 1
    return total, count


def test_sliding_window_nll_matches_brute_force(judge_dir):
    model, tok = load_judge(judge_dir)
    g = torch.Generator().manual_seed(0)
    ids = [0] + torch.randint(1, 41, (45,), generator=g).tolist()
    ids[20] = 0  # an EOS target, excluded
    for context, stride in [(16, 8), (16, 5), (64, 32), (10, 9)]:
        got = sliding_window_nll(model, ids, context, stride, exclude_id=0)
        ref = brute_force_nll(model, ids, context, stride, exclude=0)
        assert got[1] == ref[1] == len(ids) - 2
        assert math.isclose(got[0], ref[0], rel_tol=1e-5), (context, stride)
    with pytest.raises(UserError, match="judge_stride=10"):
        sliding_window_nll(model, ids, 10, 10, 0)
    # a context covering everything equals one plain forward
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    full = -sum(lp[j - 1, ids[j]].item() for j in range(1, len(ids)) if ids[j] != 0)
    assert math.isclose(sliding_window_nll(model, ids, 64, 32, 0)[0], full, rel_tol=1e-5)


def test_gen_ppl_end_to_end(judge_dir):
    model, tok = load_judge(judge_dir)
    samples = [[0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 12, 13], [0] + [5] * 30, [0, 1, 2, 3, 4]]
    res = gen_ppl(samples, WordTokenizer(), model, tok, context=8, stride=4, judge_name=judge_dir, progress=False)
    judge_ids = retokenize(samples, WordTokenizer(), tok)
    assert judge_ids[0] == samples[0]  # word-level judge: ids coincide, so brute force applies directly
    per, nll_sum, cnt_sum = [], 0.0, 0
    for ids in samples:
        nll, cnt = brute_force_nll(model, ids, 8, 4, exclude=0)
        per.append(math.exp(nll / cnt))
        nll_sum, cnt_sum = nll_sum + nll, cnt_sum + cnt
    assert res.per_sample_tokens == [11, 30, 4]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(res.per_sample_ppl, per))
    assert math.isclose(res.mean_ppl, sum(per) / 3, rel_tol=1e-5)
    assert math.isclose(res.pooled_ppl, math.exp(nll_sum / cnt_sum), rel_tol=1e-5)
    assert res.pooled_ppl != pytest.approx(res.mean_ppl)  # the two aggregates really differ here
    assert res.median_length == 13 and res.max_length == 31
    assert math.isclose(res.mean_entropy, sum(unigram_entropy(s) for s in samples) / 3)


def test_judge_path_missing_is_one_line(tmp_path):
    for name in [str(tmp_path / "nope"), "./judges/none", "a/b/c"]:
        with pytest.raises(UserError, match="does not exist") as e:
            load_judge(name)
        assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="cannot load judge") as e:
        load_judge(str(empty))
    assert "\n" not in str(e.value)


def test_context_longer_than_judge_positions(judge_dir):
    model, tok = load_judge(judge_dir)
    with pytest.raises(UserError, match="judge_context=128 exceeds"):
        gen_ppl([[0, 1, 2]], WordTokenizer(), model, tok, context=128, stride=64, progress=False)


class TripleTokenizer:
    """A training tokenizer whose id i > 0 decodes to three judge words: the id streams differ."""

    def decode(self, ids):
        return " ".join(WORDS[i] if i == 0 else " ".join([WORDS[i]] * 3) for i in ids)


def test_mean_entropy_is_over_judge_ids(judge_dir):
    """Reference (metrics.py record_generative_perplexity): torch.unique counts of the retokenized ids."""
    model, tok = load_judge(judge_dir)
    samples = [[0, 1, 2, 3, 4], [0, 5, 5, 6, 7, 8, 9]]
    res = gen_ppl(samples, TripleTokenizer(), model, tok, context=8, stride=4, progress=False)
    ref = []
    for s in samples:
        ids = torch.tensor(tok(TripleTokenizer().decode(s), add_special_tokens=False)["input_ids"])
        _, counts = torch.unique(ids, return_counts=True, sorted=False)
        ref.append(float(torch.special.entr(counts.double() / counts.sum()).sum()))
    assert math.isclose(res.mean_entropy, sum(ref) / len(ref), rel_tol=1e-12)
    on_training_ids = sum(unigram_entropy(s) for s in samples) / len(samples)
    assert abs(res.mean_entropy - on_training_ids) > 0.03  # the two really differ here
