"""Zero-shot sets are framed [BOS] + L-2 tokens + [EOS] whatever the run's framing (spec 7).

A spy model records the clean half of every BD3 input; the rows it saw must equal a brute-force
framing of the concatenated token stream (the reference's ``_group_texts`` with special tokens).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from megabd3.config.schema import Config
from megabd3.data.indexed import IndexedDatasetWriter
from megabd3.data.tokenizers import get_tokenizer
from megabd3.eval.zeroshot import ZERO_SHOT_FRAMING, evaluate_prefix, zero_shot

L = 16


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


@pytest.fixture()
def dataset(tmp_path, tok):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(100, 50000, size=int(rng.integers(5, 40))), tok.eod_id).astype(np.uint16)
            for _ in range(12)]
    w = IndexedDatasetWriter(tmp_path / "zs", np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return str(tmp_path / "zs"), docs


def run_cfg(tmp_path, specials: bool = False, mode: str = "wrap") -> Config:
    c = Config()
    c.data.tokenizer, c.data.seq_len, c.data.mode, c.data.chunk_special_tokens = "gpt2", L, mode, specials
    c.data.cache_dir = str(tmp_path / "cache")
    c.diffusion.objective, c.diffusion.block_size = "bd3lm", 4
    c.eval.batch_size, c.eval.max_batches = 3, 0
    return c


class Spy:
    """model_fn that records the x0 half of each BD3 input and predicts uniformly."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.rows = vocab, []

    def __call__(self, ids, positions, attn, sigma=None, logits_range=None):  # noqa: ANN001
        self.rows += ids[:, L:].tolist()
        return torch.zeros(ids.shape[0], L, self.vocab)


def brute_force(docs, L_: int, specials: bool, bos: int, eos: int) -> list:
    stream = [int(t) for d in docs for t in d]
    c = L_ - 2 if specials else L_
    chunks = [stream[i:i + c] for i in range(0, len(stream) - c + 1, c)]
    return [[bos] + ch + [eos] if specials else ch for ch in chunks]


def evaluate(cfg, prefix, tok, zero_shot_: bool):  # noqa: ANN001, ANN201
    spy = Spy(tok.model_vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy dataset has no manifest
        out = evaluate_prefix(cfg, spy, prefix, tok, seed=1, progress=False, zero_shot=zero_shot_)
    return out, spy.rows


@pytest.mark.parametrize("specials,mode", [(False, "wrap"), (True, "wrap"), (False, "pad")])
def test_zero_shot_frames_bos_chunk_eos_whatever_the_run(tmp_path, dataset, tok, specials, mode):
    prefix, docs = dataset
    out, rows = evaluate(run_cfg(tmp_path, specials, mode), prefix, tok, True)
    ref = brute_force(docs, L, True, tok.bos_id, tok.eos_id)
    assert rows == ref and len(ref) >= 4
    # position 0 (the chunk's BOS) is not scored: as for AR, which never predicts position 0
    assert out["framing"] == ZERO_SHOT_FRAMING and out["tokens"] == len(ref) * (L - 1)


def test_test_split_keeps_the_run_framing(tmp_path, dataset, tok):
    prefix, docs = dataset
    out, rows = evaluate(run_cfg(tmp_path), prefix, tok, False)
    assert rows == brute_force(docs, L, False, tok.bos_id, tok.eos_id)
    assert "no chunk BOS/EOS" in out["framing"]


def test_zero_shot_helper_reports_framing(tmp_path, dataset, tok):
    prefix, _ = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = zero_shot(run_cfg(tmp_path), Spy(tok.model_vocab_size), [prefix], tok, seed=1, progress=False)
    assert res["zs"]["framing"] == ZERO_SHOT_FRAMING


class Uniform:
    """model_fn with uniform logits over the rows it is asked for (any objective)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, ids, positions, attn, sigma=None, logits_range=None):  # noqa: ANN001
        n = logits_range[1] - logits_range[0] if logits_range else ids.shape[1]
        return torch.zeros(ids.shape[0], n, self.vocab)


@pytest.mark.parametrize("objective", ["ar", "mdlm", "sedd", "bd3lm"])
def test_zero_shot_scores_the_same_tokens_for_every_objective(tmp_path, dataset, tok, objective):
    """BOS-framed zero-shot chunks: no objective is charged for the BOS at position 0 (AR never predicts it)."""
    prefix, docs = dataset
    c = run_cfg(tmp_path)
    c.diffusion.objective = objective
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate_prefix(c, Uniform(tok.model_vocab_size), prefix, tok, seed=1, progress=False, zero_shot=True)
    assert out["tokens"] == len(brute_force(docs, L, True, tok.bos_id, tok.eos_id)) * (L - 1)
