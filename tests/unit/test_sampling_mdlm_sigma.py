"""The MDLM sampler calls the model exactly as the training objective does (sigma included).

A spy records every model call. The training forward of the mdlm objective on x0 gives (x_t, t, sigma,
logits); the sampler's window forward on the same x_t at the same t must give the same sigma and the
same logits — for a time-conditioned model (sigma = sigma_from_p(t)) and for an unconditioned one
(sigma zeroed by the model). Runs on the reference model and, when importable, the megatron model.
"""
from __future__ import annotations

import math

import pytest
import torch

from megabd3.config.schema import Config
from megabd3.diffusion.objectives import build_objective
from megabd3.diffusion.reference_model import init_reference_model
from megabd3.sampling.backend import ModelBackend
from megabd3.sampling.block import MDLMSampler
from megabd3.sampling.common import SamplerOptions

V, MASK, BOS, L = 23, 22, 0, 16


class Spy(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, ids, positions, attn, sigma=None, logits_range=None):  # noqa: ANN001
        out = self.model(ids, positions, attn, sigma, logits_range)
        self.calls.append({"ids": ids.clone(), "positions": positions.clone(), "kind": attn.kind,
                           "sigma": None if sigma is None else sigma.clone(), "range": logits_range, "out": out})
        return out


def config(time_conditioning: bool) -> Config:
    c = Config()
    c.diffusion.objective, c.data.seq_len = "mdlm", L
    c.model.time_conditioning = time_conditioning
    c.model.hidden_size, c.model.num_heads, c.model.num_layers, c.model.cond_dim, c.model.dropout = 32, 2, 2, 16, 0.0
    c.model.attention_backend = "dense"
    c.parallel.precision = "fp32"
    return c


def reference_model(c: Config) -> torch.nn.Module:
    return init_reference_model(V, seed=0, hidden=16, layers=1, time_conditioning=c.model.time_conditioning)


def megatron_model(c: Config) -> torch.nn.Module:
    pytest.importorskip("megatron.core")
    from megabd3.model.transformer import build_model
    from megabd3.parallel.init import init_distributed

    init_distributed(c)
    model = build_model(c, V).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the reference init zeroes the head and adaLN: randomise so sigma matters
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def sampler(c: Config, model: torch.nn.Module) -> MDLMSampler:
    o = SamplerOptions(length=L, mask_id=MASK, bos_id=BOS, eod_id=BOS, vocab_size=V, block_size=L, train_length=L,
                       top_p=1.0, time_conditioning=c.model.time_conditioning, sigma_max=c.diffusion.sigma_max)
    return MDLMSampler(ModelBackend(model, V, 0), o)


@pytest.mark.parametrize("build", [reference_model, megatron_model], ids=["reference", "megatron"])
@pytest.mark.parametrize("time_conditioning", [True, False])
@torch.no_grad()
def test_mdlm_sampler_forward_equals_training_forward(build, time_conditioning: bool) -> None:
    c = config(time_conditioning)
    spy = Spy(build(c))
    x0 = torch.randint(1, MASK, (3, L), generator=torch.Generator().manual_seed(1))
    out = build_objective(c, MASK, V)(spy, x0, torch.Generator().manual_seed(2), train=True)
    train = spy.calls[-1]
    xt, t = train["ids"], out.t[:, 0]
    logits = sampler(c, spy).window_logits(xt[:, :0], xt, None, t)
    sample = spy.calls[-1]
    assert torch.equal(sample["ids"], train["ids"]) and torch.equal(sample["positions"], train["positions"])
    assert sample["kind"] == train["kind"] == "full" and sample["range"] == (0, L) and train["range"] is None
    if time_conditioning:
        assert sample["sigma"].dtype == train["sigma"].dtype and torch.equal(sample["sigma"], train["sigma"])
    else:
        assert sample["sigma"] is None and train["sigma"] is None  # both: the model's sigma = 0
    assert torch.equal(sample["out"], train["out"])
    assert torch.allclose(logits, train["out"][..., :V])
    if time_conditioning:  # positive control: the old call (no sigma) is a different forward
        assert not torch.allclose(spy(xt, train["positions"], _full_spec(), None, None), train["out"], atol=1e-4)


def _full_spec():  # noqa: ANN202
    from megabd3.diffusion.masks import AttentionSpec

    return AttentionSpec("full", L, L, None)


def test_megatron_untimed_model_zeroes_sigma() -> None:
    """Why None is right without time conditioning: the megatron model turns it into sigma = 0."""
    c = config(False)
    model = megatron_model(c)
    ids = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(L).expand(2, L)
    with torch.no_grad():
        none = model(ids, pos, _full_spec(), None, (0, L))
        zero = model(ids, pos, _full_spec(), torch.zeros(2), (0, L))
        other = model(ids, pos, _full_spec(), torch.full((2,), 3.0), (0, L))
    assert torch.equal(none, zero) and torch.equal(none, other)  # sigma is ignored: adaLN on zero


@torch.no_grad()
def test_time_conditioned_sampling_feeds_the_current_noise_level() -> None:
    from megabd3.diffusion.schedules import sigma_from_p

    c = config(True)
    spy = Spy(reference_model(c))
    s = sampler(c, spy)
    s.sample(2, torch.Generator().manual_seed(0))  # first hitting: L - 1 calls, t decreasing
    sig = torch.stack([call["sigma"] for call in spy.calls])
    assert sig.shape == (L - 1, 2) and bool((sig[1:] <= sig[:-1]).all()) and bool((sig > 0).all())
    spy.calls.clear()
    s.opts.first_hitting, s.opts.steps = False, 4
    s.sample(2, torch.Generator().manual_seed(0))  # ancestral: sigma(t_k) on the grid t_k = 1 - k/4
    for call in spy.calls:
        t = torch.tensor([1.0 - k / 4 for k in range(4)], dtype=torch.float64)
        assert any(torch.equal(call["sigma"], sigma_from_p(t[k].expand(2), c.diffusion.sigma_max).float())
                   for k in range(4))
    assert math.isclose(float(spy.calls[0]["sigma"][0]), c.diffusion.sigma_max, rel_tol=1e-6)  # t = 1: clamped
