"""Exact NELBO (megabd3.eval.exact_nelbo) on a tiny llama model with shifted logits (model.shift_logits):
against test_exact_nelbo's per-block brute force (every subset of a block masked alone, the model called
on the [x_t ; x0] layout, SUBS log-softmax done by hand), and at B = 1 against transformers' causal LM on
the same weights (the shift makes L' = 1 the causal LM, see megabd3/model/shift.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from test_exact_nelbo import brute_force  # noqa: E402  (the independent enumeration)

from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.objectives import build_objective  # noqa: E402
from megabd3.eval import exact_nelbo as ex  # noqa: E402
from megabd3.parallel.init import init_distributed  # noqa: E402
from tests.unit._hf_common import llama_from_hf, tiny_llama_hf  # noqa: E402

V, L = 64, 8
MASK = V - 1


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


@pytest.fixture(scope="module")
def hf():  # noqa: ANN201
    return tiny_llama_hf(V, 32)


def build(hf, shift: bool, block: int, ignore_bos: bool = False):  # noqa: ANN001, ANN202
    return llama_from_hf(hf, V, L, block, shift, ignore_bos)


def _x0(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block", [1, 2, 4])
@torch.no_grad()
def test_exact_equals_brute_force_with_shifted_logits(hf, block: int) -> None:  # noqa: ANN001
    cfg, model = build(hf, True, block)
    x0 = _x0(block)
    got = ex.exact_batch(build_objective(cfg, MASK, V, evaluation=True), model, x0)
    assert int(got["forwards"]) == 2 ** block - 1
    torch.testing.assert_close(got["cells"], brute_force(model, x0, block, mask=MASK), rtol=1e-5, atol=1e-5)
    if block > 1:  # the shift is really in force: the unshifted model on the same weights differs
        _, plain = build(hf, False, block)
        other = ex.exact_batch(build_objective(cfg, MASK, V, evaluation=True), plain, x0)["cells"]
        assert not torch.allclose(other, got["cells"], rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_shifted_exact_at_block_one_is_the_causal_lm_nll(hf) -> None:  # noqa: ANN001
    """ignore_bos + B = 1: each position i >= 1 is read from the clean state at i - 1, i.e. the causal LM's
    next-token distribution (SUBS: the mask token removed)."""
    cfg, model = build(hf, True, 1, ignore_bos=True)
    x0 = _x0(7)
    got = ex.exact_batch(build_objective(cfg, MASK, V, evaluation=True), model, x0)
    z = hf(x0).logits.double()
    z[..., MASK] = float("-inf")
    lp = torch.log_softmax(z, -1)
    nll = -lp[:, :-1].gather(-1, x0[:, 1:, None])[..., 0]  # row i-1 predicts token i
    torch.testing.assert_close(got["cells"][:, 1:], nll, rtol=1e-4, atol=1e-4)
    assert torch.equal(got["cells"][:, 0], torch.zeros(2, dtype=torch.float64))  # BOS never counted
    torch.testing.assert_close(got["cells"][:, 1:], brute_force(model, x0, 1, ignore_bos=True, mask=MASK)[:, 1:],
                               rtol=1e-5, atol=1e-5)
