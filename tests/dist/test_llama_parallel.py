"""The llama backbone (model.arch=llama) under tensor and pipeline parallelism, 2 gloo ranks.

A random tiny Llama (GQA: 4 heads, 2 key/value groups, hidden 64, SwiGLU 96, 2 layers, vocab 128,
norms randomised) made by transformers, converted with hf_to_megabd3 and loaded at TP=1, TP=2 (tied
and untied) and PP=2 (untied; tied + PP > 1 is rejected): the same logits (causal and the BD3 2L
input), the same cross-entropy loss / grad norm / gradients through megatron's schedule, the same
BD3-objective training-step loss and grad norm (PP = 1), gather_full_state_dict returning exactly the
loaded full state dict, and megabd3_to_hf of it equal to the HF tensors bitwise. TP=2 puts one query
group ([q0 q1 k v]) on each rank and [gate_r; up_r] of the stride-2 linear_fc1, so both layouts are
exercised. The TP = 1 causal logits are also checked against transformers itself (an anchor
independent of megabd3's layouts).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from _launch import launch  # noqa: E402

from megabd3.config.schema import Config  # noqa: E402
from megabd3.errors import UserError  # noqa: E402
from megabd3.model.transformer import check_model_config  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]
WORKER = Path(__file__).with_name("_llama_parallel_worker.py")
V = 128
HF_CONFIG = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5000.0,
                 attn_implementation="eager")
LAYOUTS = [(False, 1, 1), (False, 2, 1), (False, 1, 2), (True, 1, 1), (True, 2, 1)]
TOL = 1e-5


def _hf(tied: bool):  # noqa: ANN202
    torch.manual_seed(0 if tied else 1)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:  # HF's std 0.02 makes near-uniform logits; larger weights make layout errors visible
                p.normal_(0.0, 0.1)
    return m


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("llama_par")
    models = {"untied": _hf(False), "tied": _hf(True)}
    torch.save({"hf_config": HF_CONFIG, "layouts": LAYOUTS,
                "hf": {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in models.items()}},
               tmp / "in.pt")
    launch(WORKER, 2, str(tmp / "in.pt"), str(tmp / "out.pt"), timeout=600)
    results = torch.load(tmp / "out.pt")
    return {"models": models, **{r["layout"]: r for r in results}}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp1_causal_logits_match_transformers(runs: dict, tied: bool) -> None:
    hf = runs["models"]["tied" if tied else "untied"]
    ref = runs[(tied, 1, 1)]
    with torch.no_grad():
        want = hf(input_ids=_causal_ids()).logits.float()
    d = _maxdiff(ref["causal"], want)
    print(f"tied={tied}: TP1 causal vs transformers {d:.2e}")
    assert d <= TOL, d


def _causal_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)  # the worker's x0
    return torch.randint(0, V - 1, (2, 16), generator=gen)


@pytest.mark.parametrize("tied,tp,pp", [l for l in LAYOUTS if l[1:] != (1, 1)],
                         ids=lambda v: str(v))
def test_layout_matches_tp1(runs: dict, tied: bool, tp: int, pp: int) -> None:
    ref, got = runs[(tied, 1, 1)], runs[(tied, tp, pp)]
    diffs = {k: _maxdiff(got[k], ref[k]) for k in ("causal", "bd3")}
    diffs["ce_loss"] = abs(got["ce_loss"] - ref["ce_loss"])
    diffs["ce_grad_norm"] = abs(got["ce_grad_norm"] - ref["ce_grad_norm"])
    diffs["ce_grads"] = max(_maxdiff(got["ce_grads"][k], g) for k, g in ref["ce_grads"].items())
    if pp == 1:
        diffs["obj_loss"] = abs(got["obj_loss"] - ref["obj_loss"])
        diffs["obj_grad_norm"] = abs(got["obj_grad_norm"] - ref["obj_grad_norm"])
    print(f"tied={tied} tp={tp} pp={pp}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert ref["ce_grad_norm"] > 0.1 and ref["ce_loss"] > 0.1
    assert got["ce_grads"].keys() == ref["ce_grads"].keys()
    assert all(v <= TOL for v in diffs.values()), diffs


@pytest.mark.parametrize("tied,tp,pp", LAYOUTS, ids=lambda v: str(v))
def test_gather_and_hf_round_trip_are_exact(runs: dict, tied: bool, tp: int, pp: int) -> None:
    from megabd3.model.hf_llama import LlamaShape, hf_to_megabd3

    hf = runs["models"]["tied" if tied else "untied"]
    want_hf = hf.state_dict()
    full = hf_to_megabd3(want_hf, LlamaShape.from_hf_config(hf.config))
    got = runs[(tied, tp, pp)]
    assert sorted(got["gathered"]) == sorted(full)
    for k, t in full.items():
        assert torch.equal(got["gathered"][k], t), k
    assert sorted(got["hf_back"]) == sorted(k for k in want_hf if not k.endswith("inv_freq"))
    for k, t in got["hf_back"].items():
        assert torch.equal(t, want_hf[k]), k


def test_tied_pipeline_parallel_is_rejected() -> None:
    cfg = Config()
    cfg.model.arch, cfg.model.adaln, cfg.model.time_conditioning = "llama", False, False
    cfg.model.tie_embeddings, cfg.parallel.pipeline_parallel = True, 2
    with pytest.raises(UserError, match="tie_embeddings"):
        check_model_config(cfg)
