"""launchers/evaluate.py on a hand-made checkpoint: the weights label says what was loaded, the
training-interval Var. NELBO uses the clip interval saved in the checkpoint, zero-shot states its framing.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megabd3.config.schema import Config
from megabd3.eval.inference import load_checkpoint_model, saved_clip_interval, select_weights

REPO = Path(__file__).resolve().parents[2]
L, CLIP = 16, (0.3, 0.8)


def launcher():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("evaluate_launcher", REPO / "launchers" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_select_weights_reports_what_it_returns():
    a, e = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert select_weights({"model": a, "ema": e}, True) == (e, "ema")
    assert select_weights({"model": a, "ema": None}, True) == (a, "raw")  # no EMA kept: raw, and says so
    assert select_weights({"model": a}, True) == (a, "raw")
    assert select_weights({"model": a, "ema": e}, False) == (a, "raw")


def test_weights_record_never_claims_missing_ema():
    rec = launcher().weights_record
    assert rec(SimpleNamespace(weights="raw", ema_requested=True))["weights"] == "raw"
    assert "no EMA" in rec(SimpleNamespace(weights="raw", ema_requested=True))["weights_note"]
    assert rec(SimpleNamespace(weights="ema", ema_requested=True)) == {"weights": "ema"}
    assert rec(SimpleNamespace(weights="raw", ema_requested=False)) == {"weights": "raw"}


def test_saved_clip_interval(tmp_path):
    assert saved_clip_interval(tmp_path) is None
    torch.save({"step": 3, "clip_interval": (0.45, 0.95)}, tmp_path / "megabd3_state.pt")
    assert saved_clip_interval(tmp_path) == (0.45, 0.95)


# ------------------------------------------------------------------ end to end (megatron model)
def tiny_cfg(tmp_path: Path, prefix: str) -> Config:
    c = Config()
    m = c.model
    m.hidden_size, m.num_heads, m.num_layers, m.cond_dim, m.dropout, m.attention_backend = 32, 2, 1, 16, 0.0, "dense"
    c.parallel.precision = "fp32"
    c.data.tokenizer, c.data.seq_len, c.data.test_prefix, c.data.cache_dir = "gpt2", L, prefix, str(tmp_path / "cache")
    c.diffusion.objective, c.diffusion.block_size = "bd3lm", 4
    c.diffusion.clip_min, c.diffusion.clip_max = 0.001, 1.0  # the config's interval; the checkpoint's is CLIP
    c.eval.batch_size, c.eval.max_batches, c.eval.use_ema = 4, 0, True
    c.training.steps = 10
    return c


def make_checkpoint(tmp_path: Path, ema: bool) -> tuple:
    pytest.importorskip("megatron.core")
    from megabd3.config.load import save_resolved
    from megabd3.data.indexed import IndexedDatasetWriter
    from megabd3.data.tokenizers import get_tokenizer
    from megabd3.eval.inference import build_inference_model, single_process

    tok = get_tokenizer("gpt2")
    rng = np.random.default_rng(0)
    w = IndexedDatasetWriter(tmp_path / "data", np.uint16)
    for _ in range(20):
        w.add_document(np.append(rng.integers(100, 5000, size=30), tok.eod_id).astype(np.uint16))
    w.finalize()
    cfg = tiny_cfg(tmp_path, str(tmp_path / "data"))
    model = build_inference_model(single_process(cfg), tok.model_vocab_size, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the reference init zeroes the head: give the model some opinion
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    raw = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    step = tmp_path / "run" / "checkpoints" / "step_00000005"
    save_resolved(cfg, step)
    torch.save({"model": raw, "ema": {k: v + 0.01 if v.is_floating_point() else v for k, v in raw.items()} if ema else None,
                "step": 5}, step / "model.pt")
    torch.save({"step": 5, "consumed_samples": 0, "clip_interval": CLIP, "config_hash": "", "layout": {}},
               step / "megabd3_state.pt")
    return step, raw


@pytest.mark.parametrize("ema", [False, True])
def test_load_checkpoint_model_reports_weights_and_interval(tmp_path, ema):
    step, raw = make_checkpoint(tmp_path, ema=ema)
    loaded = load_checkpoint_model(str(step))
    assert loaded.weights == ("ema" if ema else "raw") and loaded.ema_requested
    assert loaded.step == 5 and loaded.clip_interval == CLIP
    key = next(k for k, v in raw.items() if v.is_floating_point() and v.dim() == 2 and v.shape[0] < 1000)
    want = raw[key] + 0.01 if ema else raw[key]
    assert torch.equal(loaded.model.state_dict()[key], want)
    assert load_checkpoint_model(str(step), use_ema=False).weights == "raw"


def test_evaluate_launcher_end_to_end(tmp_path):
    step, _ = make_checkpoint(tmp_path, ema=False)
    out = tmp_path / "res.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy dataset has no manifest
        launcher().main(["--checkpoint", str(step), "--no-progress", "--out", str(out),
                         "--zero-shot", str(tmp_path / "data")])
    res = json.loads(out.read_text())
    assert res["weights"] == "raw" and "no EMA" in res["weights_note"]  # eval.use_ema=true, none saved
    test = res["perplexity"]["test"]
    assert tuple(test["var_nelbo_train_interval"]) == CLIP
    assert test["var_nelbo_train_interval_source"] == "checkpoint train state"
    assert test["var_nelbo_train"] != test["var_nelbo"]  # the clipped interval of the checkpoint, not U[eps, 1]
    assert "no chunk BOS/EOS" in test["framing"]
    zs = res["perplexity"]["zero-shot:data"]
    # zero-shot chunks are [BOS] + L-2 + [EOS] and the BOS position is not scored (as for AR): L - 1 tokens each
    assert zs["framing"].startswith("wrap: [BOS] + L-2 tokens + [EOS]") and zs["tokens"] % (L - 1) == 0
    md = out.with_suffix(".md").read_text()
    assert "weights: raw" in md and "var_nelbo_train" in md
