"""TP=2 vocab shards (megatron layout) give the same values and logit gradients as plain torch on the
full logits, for every vocab_ops function and every objective; 2 gloo ranks, OMP_NUM_THREADS=1."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _diffusion_tp_worker as W  # noqa: E402
from _launch import launch  # noqa: E402

pytestmark = pytest.mark.dist
C = W.make_case()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:  # noqa: ANN001
    out = tmp_path_factory.mktemp("tp") / "out.pt"
    launch(Path(W.__file__), 2, str(out))
    return torch.load(out)


def _set(x: torch.Tensor, idx, value: float) -> torch.Tensor:  # noqa: ANN001
    y = x.clone()
    y[..., idx] = value
    return y


def _fill_ids(x: torch.Tensor, ids: torch.Tensor, value: float) -> torch.Tensor:
    return x.scatter(-1, ids[..., None], torch.full((*ids.shape, 1), value))


TGT, IDS = C["target"], C["ids"]
# Plain single-process torch on the full logits: (source, fn, output kind) as in the worker.
REFERENCE = {
    "cross_entropy": ("full", lambda x: F.cross_entropy(x.transpose(1, 2), TGT, reduction="none"), "rep"),
    "cross_entropy_inf": ("full_inf", lambda x: F.cross_entropy(x.transpose(1, 2), TGT, reduction="none"), "rep"),
    "logsumexp": ("full", lambda x: torch.logsumexp(x, -1), "rep"),
    "logsumexp_inf": ("full_inf", lambda x: torch.logsumexp(x, -1), "rep"),
    "gather_logit": ("full", lambda x: x.gather(-1, TGT[..., None])[..., 0], "rep"),
    "gather_logit_inf": ("full_inf", lambda x: x.gather(-1, TGT[..., None])[..., 0], "rep"),
    "log_softmax_full": ("full", lambda x: torch.log_softmax(x, -1), "full"),
    "log_softmax_full_inf": ("full_inf", lambda x: torch.log_softmax(x, -1), "full"),
    "set_token_logit_mask": ("full", lambda x: _set(x, W.MASK, 7.0), "full"),
    "set_token_logit_r0": ("full", lambda x: _set(x, 3, -2.0), "full"),
    "suppress_from_pad": ("full", lambda x: _set(x, slice(W.V_REAL, None), -5.0), "full"),
    "suppress_from_20": ("full", lambda x: _set(x, slice(20, None), -5.0), "full"),
    "suppress_from_inf": ("full", lambda x: _set(x, slice(W.V_REAL, None), float("-inf")), "full"),
    "masked_fill_ids": ("full", lambda x: _fill_ids(x, IDS, 4.0), "full"),
    "subs_ce": ("full", lambda x: F.cross_entropy(
        _set(_set(x, slice(W.V_REAL, None), float("-inf")), W.MASK, float("-inf")).transpose(1, 2), TGT,
        reduction="none"), "rep"),
    "gather_logit_allinf_shard": ("full", lambda x: x.gather(-1, TGT.clamp(max=27)[..., None])[..., 0], "rep"),
    "logsumexp_allinf_shard": ("full", lambda x: torch.logsumexp(x[..., :28], -1), "rep"),
}


def test_shard_range_is_megatrons(ranks: list) -> None:
    assert [r["shard_range"] for r in ranks] == [(0, 28), (28, 56)]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_vocab_op_matches_plain_torch(ranks: list, name: str) -> None:
    src, fn, kind = REFERENCE[name]
    x = C[src].clone().requires_grad_(True)
    val = fn(x)
    W.finite_sum(val, C["w_rep"] if kind == "rep" else C["w_full"]).backward()
    for r in ranks:  # replicated outputs must agree on every rank, sharded ones once gathered
        got = r["ops"][name]
        assert got["unchanged"], f"{name} modified its input logits in place"
        torch.testing.assert_close(got["value"], val.detach(), rtol=1e-5, atol=1e-5, equal_nan=False)
        assert not torch.isnan(got["grad"]).any()
        torch.testing.assert_close(got["grad"], x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,train", W.OBJECTIVE_CASES)
def test_objective_matches_tp1(ranks: list, name: str, train: bool) -> None:
    leaf = C["obj_logits"].clone().requires_grad_(True)
    x0 = torch.randint(0, W.V_REAL - 1, (W.B, W.L), generator=torch.Generator().manual_seed(5))
    ref = W.run_objective(name, train, leaf, x0)  # single process: vocab_ops' plain-torch path
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    for r in ranks:
        got = r["objectives"][f"{name}/{'train' if train else 'eval'}"]
        assert got["unchanged"], f"{name} modified the model's logits in place"
        torch.testing.assert_close(got["loss"], ref.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["per_token"], ref.per_token.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["nelbo_sum"], ref.nelbo_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["grad"], leaf.grad, rtol=1e-5, atol=1e-7)
