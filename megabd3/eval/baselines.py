"""Reference points a trained model must beat: the unigram cross-entropy of a split.

A model that learned nothing about context scores about the unigram entropy of the text. The
baseline here is the cross-entropy of the evaluated split's token stream under add-one-smoothed
token frequencies of the *training* split (over the model vocabulary), so "validation PPL below the
unigram PPL" is the first sign that a run learned anything beyond token frequencies.
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np


def unigram_cross_entropy(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab: int) -> float:
    """Mean -log q(x) over the test tokens, q = add-one-smoothed train frequencies over the vocabulary."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    logq = np.log(counts) - math.log(counts.sum())
    return float(-logq[np.asarray(test_tokens, dtype=np.int64)].mean())


def unigram_baseline(train_prefix: str, eval_prefix: str, vocab: int) -> Dict[str, float]:
    """{unigram_nelbo, unigram_ppl} of ``eval_prefix`` under ``train_prefix``'s frequencies."""
    from megabd3.data.indexed import IndexedDataset

    ce = unigram_cross_entropy(IndexedDataset(train_prefix).stream, IndexedDataset(eval_prefix).stream, vocab)
    return {"unigram_nelbo": ce, "unigram_ppl": math.exp(ce)}
