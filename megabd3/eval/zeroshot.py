"""Zero-shot perplexity: the honest test NELBO of one model on other preprocessed datasets.

Each prefix (e.g. PTB made by tools/preprocess_data.py with the model's tokenizer) is evaluated like
the test split (:func:`megabd3.eval.nelbo.evaluate_nelbo`: loglinear, [eps, 1], unweighted, EMA
weights; exact NLL for AR). The manifest of each prefix is checked against the model's tokenizer by
the loader, so a dataset made with another tokenizer is refused.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Sequence

import torch

from megabd3.errors import UserError


def dataset_name(prefix: str) -> str:
    return os.path.basename(os.path.normpath(prefix))


def evaluate_prefix(cfg: Any, model_fn: Any, prefix: str, tokenizer: Any, *, seed: int, progress: bool = True,
                    var_nelbo: bool = False) -> Dict[str, float]:
    """Test NELBO/PPL of ``model_fn`` on the dataset at ``prefix`` (one whole pass)."""
    from megabd3.data.loader import build_loader
    from megabd3.eval.nelbo import evaluate_nelbo

    if not os.path.isfile(prefix + ".bin") or not os.path.isfile(prefix + ".idx"):
        raise UserError(f"dataset prefix {prefix} has no .bin/.idx: make it with tools/preprocess_data.py")
    cfg = copy.deepcopy(cfg)
    cfg.data.test_prefix = prefix
    loader = build_loader(cfg, "test", 0, 1, 0, cfg.eval.batch_size)
    gen = torch.Generator().manual_seed(seed)
    return evaluate_nelbo(cfg, model_fn, loader, mask_id=tokenizer.mask_id, vocab_size=tokenizer.model_vocab_size,
                          generator=gen, var_nelbo=var_nelbo, max_batches=cfg.eval.max_batches, progress=progress)


def zero_shot(cfg: Any, model_fn: Any, prefixes: Sequence[str], tokenizer: Any, *, seed: int,
              progress: bool = True) -> Dict[str, Dict[str, float]]:
    """{dataset name: metrics} for every prefix."""
    out: Dict[str, Dict[str, float]] = {}
    for prefix in prefixes:
        name = dataset_name(prefix)
        if name in out:
            name = prefix
        out[name] = evaluate_prefix(cfg, model_fn, prefix, tokenizer, seed=seed, progress=progress)
    return out
