"""Exact NELBO (megabd3.eval.exact_nelbo) on a tiny llama model with shifted logits (model.shift_logits):
against a per-block brute force written here (every subset of a block masked alone, the model called on
the [x_t ; x0] layout, SUBS log-softmax done by hand), and at B = 1 against transformers' causal LM on
the same weights (the shift makes L' = 1 the causal LM, see megabd3/model/shift.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.masks import AttentionSpec  # noqa: E402
from megabd3.diffusion.objectives import build_objective  # noqa: E402
from megabd3.eval import exact_nelbo as ex  # noqa: E402
from megabd3.model.export import load_full_state_dict  # noqa: E402
from megabd3.model.hf_llama import LlamaShape, hf_to_megabd3, model_config_from_hf  # noqa: E402
from megabd3.model.transformer import build_model  # noqa: E402
from megabd3.parallel.init import init_distributed  # noqa: E402

V, L = 64, 8
MASK = V - 1


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


@pytest.fixture(scope="module")
def hf():  # noqa: ANN201
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                 tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(c).eval()


def build(hf, shift: bool, block: int, ignore_bos: bool = False):  # noqa: ANN001, ANN202
    cfg = Config()
    for k, v in model_config_from_hf(hf.config).items():
        setattr(cfg.model, k, v)
    cfg.model.attention_backend = "dense"
    cfg.model.shift_logits = shift
    cfg.diffusion.objective, cfg.diffusion.block_size, cfg.data.seq_len = "bd3lm", block, L
    cfg.diffusion.ignore_bos = ignore_bos
    model = build_model(cfg, V)
    load_full_state_dict(model, hf_to_megabd3(hf.state_dict(), LlamaShape.from_hf_config(hf.config)))
    return cfg, model.eval()


def brute_force(model, x0: torch.Tensor, block: int, ignore_bos: bool = False) -> torch.Tensor:  # noqa: ANN001
    """[b, nblk]: sum_k 1/k mean_{|M|=k} sum_{i in M} -log p(x_i | x0 with M masked, other blocks clean)."""
    b, _ = x0.shape
    out = torch.zeros(b, L // block, dtype=torch.float64)
    pos = torch.arange(L).repeat(2)[None]
    for r in range(b):
        for j in range(L // block):
            counted = [i for i in range(j * block, (j + 1) * block) if not (ignore_bos and i == 0)]
            total = 0.0
            for k in range(1, len(counted) + 1):
                fs = []
                for subset in itertools.combinations(counted, k):
                    x_t = x0[r:r + 1].clone()
                    x_t[0, list(subset)] = MASK
                    logits = model(torch.cat([x_t, x0[r:r + 1]], 1), pos, AttentionSpec("bd3", L, block), None, (0, L))
                    z = logits[0].double().clone()
                    z[:, MASK] = float("-inf")
                    lp = torch.log_softmax(z, -1)
                    fs.append(-sum(float(lp[i, x0[r, i]]) for i in subset))
                total += np.mean(fs) / k
            out[r, j] = total
    return out


def _x0(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block", [1, 2, 4])
@torch.no_grad()
def test_exact_equals_brute_force_with_shifted_logits(hf, block: int) -> None:  # noqa: ANN001
    cfg, model = build(hf, True, block)
    x0 = _x0(block)
    got = ex.exact_batch(build_objective(cfg, MASK, V, evaluation=True), model, x0)
    assert int(got["forwards"]) == 2 ** block - 1
    torch.testing.assert_close(got["cells"], brute_force(model, x0, block), rtol=1e-5, atol=1e-5)
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
    torch.testing.assert_close(got["cells"][:, 1:], brute_force(model, x0, 1, ignore_bos=True)[:, 1:],
                               rtol=1e-5, atol=1e-5)
