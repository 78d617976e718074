"""Every file in configs/ loads and validates; generated files and docs are not stale."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megabd3.config import derive_deepspeed_config, effective_block_size, load_config
from megabd3.config.docs import render_reference

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ALL = sorted(CONFIGS.rglob("*.json"))


def _gen_configs():
    spec = importlib.util.spec_from_file_location("gen_configs", ROOT / "tools" / "gen_configs.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_there_are_configs() -> None:
    names = {str(p.relative_to(CONFIGS)) for p in ALL}
    for required in ["owt.json", "lm1b.json", "demo.json", "model/tiny.json", "model/small.json",
                     "model/medium.json", "model/demo.json", "ds/zero0.json", "ds/zero1.json", "ds/zero2.json",
                     "ds/zero3.json", "experiments/lm1b/bd3lm_bs1_tuned.json", "experiments/owt/ar.json"]:
        assert required in names


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_every_config_loads_and_validates(path: Path) -> None:
    # CPU without CUDA, and a cluster with 8 GPUs: both must be consistent.
    load_config(path, cuda=False)
    cfg = load_config(path, world_size=8, cuda=True)
    ds = derive_deepspeed_config(cfg, 8, cuda=True)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8


def test_generated_experiments_are_committed() -> None:
    gen = _gen_configs()
    generated = gen.generate()
    on_disk = {str(p.relative_to(CONFIGS)) for p in (CONFIGS / gen.OUT_DIR).rglob("*.json")}
    assert on_disk == set(generated), "run: python tools/gen_configs.py"
    for rel, content in generated.items():
        assert (CONFIGS / rel).read_text() == gen.render(content), f"{rel} is stale; run: python tools/gen_configs.py"


def test_docs_reference_is_fresh() -> None:
    text = (ROOT / "docs" / "config_reference.md").read_text()
    assert text == render_reference(), "run: python tools/gen_config_docs.py"


def test_docs_cover_every_field() -> None:
    from megabd3.config.load import all_key_paths

    text = render_reference()
    for key in all_key_paths():
        assert f"`{key}`" in text


def test_reference_recipes_hand_checked() -> None:
    owt = load_config(CONFIGS / "owt.json", world_size=8, cuda=True)
    assert (owt.data.tokenizer, owt.data.seq_len, owt.diffusion.objective, effective_block_size(owt)) == ("gpt2", 1024, "bd3lm", 16)
    assert (owt.model.hidden_size, owt.model.num_heads, owt.model.num_layers) == (768, 12, 12)
    assert (owt.optim.lr, owt.optim.warmup_steps, owt.optim.grad_clip, owt.training.ema) == (3e-4, 2500, 1.0, 0.9999)
    # the paper's OWT layout: 8 GPUs x micro 16 x accumulation 4 = 512
    ds = derive_deepspeed_config(owt, 8, cuda=True)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["bf16"]["enabled"]) == (512, 4, True)
    assert derive_deepspeed_config(owt, 8, cuda=False)["bf16"]["enabled"] is False  # auto: fp32 on CPU
    lm1b = load_config(CONFIGS / "lm1b.json", cuda=False)
    assert (lm1b.data.tokenizer, lm1b.data.seq_len, lm1b.data.chunk_special_tokens) == ("bert-base-uncased", 128, True)
    # LM1B: 4 GPUs x micro 64 x accumulation 2 = 512
    assert derive_deepspeed_config(lm1b, 4, cuda=True)["gradient_accumulation_steps"] == 2
    demo = load_config(CONFIGS / "demo.json", world_size=2, cuda=False)
    assert (demo.parallel.zero_stage, demo.data.seq_len, effective_block_size(demo)) == (3, 128, 4)
    assert demo.data.train_prefix == "data/demo/ptb_train" and demo.data.valid_prefix == "data/demo/ptb_valid"
    assert demo.data.tokenizer == "data/demo/tok_ptb" and demo.diffusion.ignore_bos and demo.data.chunk_special_tokens
    assert derive_deepspeed_config(demo, 2, cuda=False)["train_batch_size"] == 16


def test_experiment_files_state_what_they_vary() -> None:
    exp = CONFIGS / "experiments"
    cfg = load_config(exp / "lm1b" / "bd3lm_bs4_clip_0.45-0.95.json", cuda=False)
    assert (cfg.diffusion.block_size, cfg.diffusion.clip_min, cfg.diffusion.clip_max) == (4, 0.45, 0.95)
    assert cfg.diffusion.clip_search.enabled is False and cfg.data.seq_len == 128
    cfg = load_config(exp / "lm1b" / "bd3lm_bs128_clip_0-0.5.json", cuda=False)
    assert (cfg.diffusion.clip_min, cfg.diffusion.clip_max) == (1e-3, 0.5)  # the reference's U[0, x]
    cfg = load_config(exp / "lm1b" / "bd3lm_bs16_gaussian_mu0.6.json", cuda=False)
    assert (cfg.diffusion.noise.type, cfg.diffusion.noise.mu, cfg.diffusion.noise.sigma) == ("gaussian", 0.6, 0.1)
    cfg = load_config(exp / "lm1b" / "bd3lm_bs4_bimodal_mu0.3_w0.6.json", cuda=False)
    assert (cfg.diffusion.noise.type, cfg.diffusion.noise.mu1, cfg.diffusion.noise.w1) == ("bimodal_gaussian", 0.3, 0.6)
    cfg = load_config(exp / "owt" / "bd3lm_bs8_weighting_sigmoid.json", cuda=False)
    assert (cfg.diffusion.weighting, cfg.diffusion.weighting_k, cfg.data.seq_len) == ("sigmoid", 0.0, 1024)
    cfg = load_config(exp / "lm1b" / "bd3lm_bs1_tuned.json", cuda=False)
    assert (cfg.diffusion.time_mode, cfg.diffusion.block_size) == ("tuned", 1)
    cfg = load_config(exp / "lm1b" / "sedd.json", cuda=False)
    assert cfg.diffusion.objective == "sedd" and cfg.model.time_conditioning is True
    gen = _gen_configs()
    blocks = {b: 0 for b in (1, 4, 8, 16, 128)}
    for rel in gen.generate():
        parts = Path(rel).stem.split("_")
        if rel.startswith("experiments/lm1b/bd3lm_bs"):
            blocks[int(parts[1][2:])] += 1
    # every LM1B block size gets every schedule, clip range and weighting
    n = len(gen.SCHEDULES) + len(gen.CLIPS) + len(gen.WEIGHTINGS)
    assert all(count >= n for count in blocks.values()), blocks
    assert json.loads((exp / "owt" / "mdlm.json").read_text())["base"] == ["../../owt.json"]
