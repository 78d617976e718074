"""Evaluation NELBO: independent of every training-only knob, and equal to a hand reduction."""
from __future__ import annotations

import math

import pytest
import torch

from megabd3.config.schema import Config
from megabd3.diffusion.objectives import build_objective
from megabd3.diffusion.reference_model import init_reference_model
from megabd3.eval.nelbo import evaluate_nelbo

V, MASK = 7, 6


def base_cfg():
    c = Config()
    c.diffusion.block_size, c.data.seq_len = 2, 8
    return c


def batches():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 6, (4, 8), generator=gen)} for _ in range(3)]


@torch.no_grad()
def test_eval_ignores_training_knobs():
    model = init_reference_model(V, seed=0, hidden=16, layers=1)
    ref = evaluate_nelbo(base_cfg(), model, batches(), mask_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(9))
    variants = []
    for name, value in [("weighting", "fm"), ("weighting", "sigmoid"), ("clip_min", 0.3), ("resample", True)]:
        c = base_cfg()
        setattr(c.diffusion, name, value)
        if name == "resample":
            c.diffusion.clip_min, c.diffusion.clip_max = 0.45, 0.95
        variants.append(c)
    for kind in ("gaussian", "cosine", "bimodal_gaussian"):
        c = base_cfg()
        c.diffusion.noise.type = kind
        variants.append(c)
    for c in variants:
        got = evaluate_nelbo(c, model, batches(), mask_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(9))
        assert got == ref
        # positive control: the training loss of the same config does differ
        train = build_objective(c, MASK, V)(model, batches()[0]["input_ids"], torch.Generator().manual_seed(9), train=True)
        plain = build_objective(base_cfg(), MASK, V)(model, batches()[0]["input_ids"], torch.Generator().manual_seed(9), train=True)
        assert float(train.loss) != float(plain.loss)


@torch.no_grad()
def test_eval_reduction_by_hand():
    model = init_reference_model(V, seed=0, hidden=16, layers=1)
    got = evaluate_nelbo(base_cfg(), model, batches(), mask_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(9))
    obj = build_objective(base_cfg(), MASK, V)
    gen = torch.Generator().manual_seed(9)
    s, n, var = 0.0, 0, []
    for b in batches():
        out = obj(model, b["input_ids"], gen, train=False)
        s += float(out.nelbo_sum)
        n += int(out.token_count)
        var.append(float(out.per_block_mean.double().flatten().var()))
    assert got["tokens"] == n == 96
    assert got["nelbo"] == pytest.approx(s / n, rel=1e-12)
    assert got["ppl"] == pytest.approx(math.exp(s / n)) and got["bpd"] == pytest.approx(s / n / math.log(2))
    assert got["var_nelbo"] == pytest.approx(sum(var) / len(var), rel=1e-12)
