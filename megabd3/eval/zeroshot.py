"""Zero-shot perplexity: the honest test NELBO of one model on other preprocessed datasets.

Each prefix (e.g. PTB made by tools/preprocess_data.py with the model's tokenizer) is evaluated like
the test split (:func:`megabd3.eval.nelbo.evaluate_nelbo`: loglinear, [eps, 1], unweighted, EMA
weights; exact NLL for AR). The manifest of each prefix is checked against the model's tokenizer by
the loader, so a dataset made with another tokenizer is refused.

Framing: the reference wraps every zero-shot set to L with chunk BOS/EOS (spec 7: ``wrap``, default
``insert_special_tokens=True``), whatever the model was trained with (BD3-LM OWT runs train without
them). So zero-shot chunks are always ``[BOS] + L-2 tokens + [EOS]`` packed across documents
(``data.mode=wrap``, ``data.chunk_special_tokens=true``), and each result says so in ``framing``.
The test split of the run itself keeps the run's own framing.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Sequence

import torch

from megabd3.errors import UserError

ZERO_SHOT_FRAMING = "wrap: [BOS] + L-2 tokens + [EOS] (reference zero-shot framing)"


def dataset_name(prefix: str) -> str:
    return os.path.basename(os.path.normpath(prefix))


def framing_of(cfg: Any, zero_shot: bool = False) -> str:
    """How the loader frames samples under ``cfg.data`` (reported with every perplexity)."""
    d = cfg.data
    if zero_shot:
        return ZERO_SHOT_FRAMING
    if d.mode == "wrap":
        return "wrap: [BOS] + L-2 tokens + [EOS] (run framing)" if d.chunk_special_tokens else \
            "wrap: L tokens, no chunk BOS/EOS (run framing)"
    return "pad: one document per sample" + (", leading BOS" if d.chunk_special_tokens else "") + " (run framing)"


def prefix_config(cfg: Any, prefix: str, *, zero_shot: bool) -> Any:
    """A copy of ``cfg`` whose test split is ``prefix``; zero-shot forces the reference framing."""
    cfg = copy.deepcopy(cfg)
    cfg.data.test_prefix = prefix
    if zero_shot:
        cfg.data.mode = "wrap"
        cfg.data.chunk_special_tokens = True
        # Position 0 is then the chunk's BOS: not a token of the text, and AR never scores it. Diffusion
        # objectives would (with ignore_bos=false), charging them for a token their training data may
        # never have had there; the reference's zero-shot BD3 eval excludes it too.
        cfg.diffusion.ignore_bos = True
    return cfg


def evaluate_prefix(cfg: Any, model_fn: Any, prefix: str, tokenizer: Any, *, seed: int, progress: bool = True,
                    var_nelbo: bool = False, zero_shot: bool = False, train_objective: Optional[Any] = None,
                    train_interval: Optional[tuple] = None) -> Dict[str, Any]:
    """Test NELBO/PPL of ``model_fn`` on the dataset at ``prefix`` (one whole pass, one process)."""
    from megabd3.data.loader import build_loader
    from megabd3.eval.nelbo import eval_seed, evaluate_nelbo

    if not os.path.isfile(prefix + ".bin") or not os.path.isfile(prefix + ".idx"):
        raise UserError(f"dataset prefix {prefix} has no .bin/.idx: make it with tools/preprocess_data.py")
    cfg = prefix_config(cfg, prefix, zero_shot=zero_shot)
    loader = build_loader(cfg, "test", 0, 1, 0, cfg.eval.batch_size)
    gen = torch.Generator().manual_seed(eval_seed(seed, 0))  # one process: data-parallel rank 0
    out = evaluate_nelbo(cfg, model_fn, loader, mask_id=tokenizer.mask_id, vocab_size=tokenizer.model_vocab_size,
                         generator=gen, var_nelbo=var_nelbo, train_objective=train_objective,
                         train_interval=train_interval, max_batches=cfg.eval.max_batches, progress=progress)
    out["framing"] = framing_of(cfg, zero_shot)
    return out


def zero_shot(cfg: Any, model_fn: Any, prefixes: Sequence[str], tokenizer: Any, *, seed: int,
              progress: bool = True) -> Dict[str, Dict[str, Any]]:
    """{dataset name: metrics} for every prefix, each framed as the reference frames zero-shot sets."""
    out: Dict[str, Dict[str, Any]] = {}
    for prefix in prefixes:
        name = dataset_name(prefix)
        if name in out:
            name = prefix
        out[name] = evaluate_prefix(cfg, model_fn, prefix, tokenizer, seed=seed, progress=progress, zero_shot=True)
    return out
