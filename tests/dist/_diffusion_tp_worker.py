"""Worker for tests/dist/test_diffusion_tp.py: vocab_ops and the objectives on TP=2 vocab shards.

Usage: torchrun --nproc-per-node 2 _diffusion_tp_worker.py <out.pt>

Every rank builds the same full logits [b, S, V_PAD] (``make_case``), keeps its megatron vocab shard
(VocabUtility range, checked against ``vocab_ops.shard_range``), runs each op / objective on the
shard, backprops a fixed random functional of the result and all-gathers the gradient along the
vocab dimension. Rank 0 writes the gathered values and gradients; the test compares them with plain
single-process torch on the full logits. Whether an op left its input untouched is recorded too
(megatron's vocab-parallel CE works in place).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict

import torch
import torch.distributed as dist

V_REAL, V_PAD, MASK = 50, 56, 49  # ids >= V_REAL are padded rows (make_vocab_size_divisible_by)
B, S, L, BLOCK = 3, 6, 8, 4


def make_case() -> Dict[str, torch.Tensor]:
    """The shared random inputs (identical in every process)."""
    g = torch.Generator().manual_seed(1234)
    full = torch.randn(B, S, V_PAD, generator=g) * 3
    full_inf = full.clone()
    full_inf[..., MASK] = float("-inf")
    full_inf[..., V_REAL:] = float("-inf")
    # targets on both shards (rank 0 owns [0, 28), rank 1 [28, 56)), never the mask id
    target = torch.randint(0, MASK, (B, S), generator=g)
    target[0, :2] = torch.tensor([0, 28])  # shard boundaries
    target[1, :2] = torch.tensor([27, 48])
    ids = torch.randint(0, V_REAL, (B, S), generator=g)
    w_rep = torch.randn(B, S, generator=g)
    w_full = torch.randn(B, S, V_PAD, generator=g)
    obj_logits = torch.randn(B, 2 * L, V_PAD, generator=g) * 2
    return dict(full=full, full_inf=full_inf, target=target, ids=ids, w_rep=w_rep, w_full=w_full,
                obj_logits=obj_logits)


def finite_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum(w * x) over finite entries (-inf outputs must not poison the loss)."""
    return torch.where(torch.isfinite(x), x * w, torch.zeros_like(x)).sum()


def objective_settings(name: str, train: bool):
    from megabd3.diffusion.objectives import ObjectiveSettings

    if name == "bd3lm" and train:
        return ObjectiveSettings(block_size=BLOCK, train_interval=(0.3, 0.8), weighting="sigmoid", weighting_k=1.0)
    return ObjectiveSettings(block_size=BLOCK)


OBJECTIVE_CASES = [("ar", False), ("mdlm", False), ("bd3lm", False), ("bd3lm", True), ("sedd", False)]


def fake_model(logits: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A model_fn whose output is ``logits`` (this rank's shard), cut to the input length / range."""

    def model_fn(input_ids, position_ids, attn, sigma=None, logits_range=None):  # noqa: ANN001, ANN202
        out = logits[:, : input_ids.shape[1]]
        if logits_range is not None:
            out = out[:, logits_range[0]: logits_range[1]]
        return out

    return model_fn


def run_objective(name: str, train: bool, logits_leaf: torch.Tensor, x0: torch.Tensor):  # noqa: ANN201
    from megabd3.diffusion.objectives import OBJECTIVES

    obj = OBJECTIVES[name](objective_settings(name, train), MASK, V_REAL)
    out = obj(fake_model(logits_leaf), x0, torch.Generator().manual_seed(77), train=train)
    out.loss.backward()
    return out


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.utils import VocabUtility

    from megabd3.config.schema import Config
    from megabd3.diffusion import vocab_ops as vo
    from megabd3.parallel.init import destroy_distributed, init_distributed

    out_path = sys.argv[1]
    cfg = Config()
    cfg.parallel.tensor_parallel = 2
    init_distributed(cfg)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group()
    local = V_PAD // tp
    lo, hi = VocabUtility.vocab_range_from_global_vocab_size(V_PAD, rank, tp)
    assert (lo, hi) == vo.shard_range(local), ((lo, hi), vo.shard_range(local))
    assert vo.global_vocab_size(torch.zeros(1, local)) == V_PAD
    c = make_case()

    def gather_vocab(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(tp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, -1)

    tgt, ids = c["target"], c["ids"]
    # name -> (source logits, op on the shard, output kind: "rep" [b, S], "full" [b, S, V], "shard")
    ops = {
        "cross_entropy": ("full", lambda x: vo.cross_entropy(x, tgt), "rep"),
        "cross_entropy_inf": ("full_inf", lambda x: vo.cross_entropy(x, tgt), "rep"),
        "logsumexp": ("full", vo.logsumexp, "rep"),
        "logsumexp_inf": ("full_inf", vo.logsumexp, "rep"),
        "gather_logit": ("full", lambda x: vo.gather_logit(x, tgt), "rep"),
        "gather_logit_inf": ("full_inf", lambda x: vo.gather_logit(x, tgt), "rep"),
        "log_softmax_full": ("full", vo.log_softmax_full, "full"),
        "log_softmax_full_inf": ("full_inf", vo.log_softmax_full, "full"),
        "set_token_logit_mask": ("full", lambda x: vo.set_token_logit(x, MASK, 7.0), "shard"),
        "set_token_logit_r0": ("full", lambda x: vo.set_token_logit(x, 3, -2.0), "shard"),
        "suppress_from_pad": ("full", lambda x: vo.suppress_from(x, V_REAL, -5.0), "shard"),
        "suppress_from_20": ("full", lambda x: vo.suppress_from(x, 20, -5.0), "shard"),
        "suppress_from_inf": ("full", lambda x: vo.suppress_from(x, V_REAL), "shard"),
        "masked_fill_ids": ("full", lambda x: vo.masked_fill_ids(x, ids, 4.0), "shard"),
        # the SUBS chain of the objectives: -inf on padded rows and the mask, then CE
        "subs_ce": ("full", lambda x: vo.cross_entropy(vo.set_token_logit(vo.suppress_from(x, V_REAL), MASK, float("-inf")), tgt), "rep"),
        # the whole shard padded with -inf on rank 1 (a TP=4-like layout where a shard is all padding)
        "gather_logit_allinf_shard": ("full", lambda x: vo.gather_logit(vo.suppress_from(x, 28), tgt.clamp(max=27)), "rep"),
        "logsumexp_allinf_shard": ("full", lambda x: vo.logsumexp(vo.suppress_from(x, 28)), "rep"),
    }
    result: dict = {"ops": {}, "objectives": {}, "shard_range": (lo, hi)}
    for name, (src, fn, kind) in ops.items():
        shard = c[src][..., lo:hi].clone().requires_grad_(True)
        pristine = shard.detach().clone()
        val = fn(shard)
        unchanged = bool(torch.equal(shard.detach(), pristine))
        if kind == "rep":
            loss = finite_sum(val, c["w_rep"])
            full_val = val.detach()
        elif kind == "full":
            loss = finite_sum(val, c["w_full"])
            full_val = val.detach()
        else:  # sharded output: each rank backprops its own part of the sum
            loss = finite_sum(val, c["w_full"][..., lo:hi])
            full_val = gather_vocab(val.detach())
        loss.backward()
        result["ops"][name] = {"value": full_val, "grad": gather_vocab(shard.grad), "unchanged": unchanged}

    x0 = torch.randint(0, V_REAL - 1, (B, L), generator=torch.Generator().manual_seed(5))
    for name, train in OBJECTIVE_CASES:
        leaf = c["obj_logits"][..., lo:hi].clone().requires_grad_(True)
        pristine = leaf.detach().clone()
        out = run_objective(name, train, leaf, x0)
        result["objectives"][f"{name}/{'train' if train else 'eval'}"] = {
            "loss": out.loss.detach(), "per_token": out.per_token.detach(), "nelbo_sum": out.nelbo_sum,
            "grad": gather_vocab(leaf.grad), "unchanged": bool(torch.equal(leaf.detach(), pristine)),
        }
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, result)
    if dist.get_rank() == 0:
        torch.save(objs, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main()
