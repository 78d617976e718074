"""Exact NELBO on the project's megatron model (configs/model/tiny.json, random weights) against a
per-block brute force and, at B = 1, per-prefix causal runs (the L'=1 AR NLL)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_exact_nelbo import brute_force  # noqa: E402  (the independent enumeration)

from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.masks import AttentionSpec  # noqa: E402
from megabd3.diffusion.objectives import build_objective  # noqa: E402
from megabd3.eval import exact_nelbo as ex  # noqa: E402

pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[2]
V, L = 40, 8
MASK = 39


def tiny_cfg(block: int) -> Config:
    c = Config()
    for k, v in json.loads((REPO / "configs" / "model" / "tiny.json").read_text())["model"].items():
        setattr(c.model, k, v)
    c.model.dropout, c.model.make_vocab_size_divisible_by = 0.0, 8
    c.parallel.precision = "fp32"
    c.data.seq_len = L
    c.diffusion.objective, c.diffusion.block_size = "bd3lm", block
    return c


@pytest.fixture(scope="module")
def model():
    from megabd3.model.export import gather_full_state_dict, load_full_state_dict
    from megabd3.model.transformer import build_model
    from megabd3.parallel.init import init_distributed

    cfg = tiny_cfg(4)
    init_distributed(cfg)
    m = build_model(cfg, V)
    g = torch.Generator().manual_seed(3)
    # random everywhere (the reference init zeroes the head and adaLN: the output would not depend on masks)
    sd = {k: torch.randn(t.shape, generator=g) * 0.05 for k, t in gather_full_state_dict(m).items()}
    load_full_state_dict(m, sd)
    return m.eval()


@pytest.mark.parametrize("block", [2, 4])
@torch.no_grad()
def test_exact_equals_brute_force_on_the_tiny_megatron_model(model, block):
    x0 = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(block))
    obj = build_objective(tiny_cfg(block), MASK, V, evaluation=True)
    got = ex.exact_batch(obj, model, x0)["cells"]
    want = brute_force(model, x0, block, mask=MASK)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float(want.std()) > 0.05  # the model's output depends on its input


@torch.no_grad()
def test_b1_exact_equals_causal_prefix_nll_on_the_tiny_megatron_model(model):
    x0 = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(7))
    res = ex.evaluate_exact_or_stratified(tiny_cfg(1), model, [{"input_ids": x0}], likelihood="exact",
                                          mask_id=MASK, vocab_size=V)
    nll = 0.0
    for i in range(L):
        ids = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], 1)
        logits = model(ids, torch.arange(i + 1).expand(2, -1), AttentionSpec("causal", i + 1), None, None)[:, -1].double()
        logits[:, MASK:] = float("-inf")
        nll += float(-torch.log_softmax(logits, -1).gather(-1, x0[:, i:i + 1]).sum())
    assert res["nelbo"] == pytest.approx(nll / (2 * L), rel=1e-5)
