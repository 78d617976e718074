"""Hugging Face import (megabd3.hf.importer via training.init_from / load_for_inference): our export and a
directory built from the released layout's documented names load into the megabd3 model at TP = 1;
import(export(m)) == m; bad input (another architecture, a tokenizer of another vocabulary)."""
from __future__ import annotations

import json

import pytest
import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.errors import UserError
from megabd3.hf.export import export_state_dict
from megabd3.model.export import gather_full_state_dict, load_full_state_dict
from megabd3.model.transformer import build_model
from megabd3.training.checkpoint import load_for_inference, read_model_file
from tests.unit._hf_common import V, L, random_model, released_dir

transformers = pytest.importorskip("transformers")


def _bd3_input(b: int = 2):  # noqa: ANN202
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V - 1, (b, L), generator=g)
    xt = torch.where(torch.rand(b, L, generator=g) < 0.5, V - 1, x0)
    return torch.cat([xt, x0], 1), torch.arange(L).repeat(2)[None].expand(b, -1)


def test_round_trip_and_load_for_inference(tmp_path) -> None:  # noqa: ANN001
    model, sd, cfg = random_model("bd3lm", 4)
    out = export_state_dict(sd, cfg, tmp_path / "hf", clip=(0.2, 0.9))
    cfg2, sd2 = load_for_inference(out)
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert (cfg2.diffusion.clip_min, cfg2.diffusion.clip_max) == (0.2, 0.9)  # the interval stored with the weights
    cfg2.diffusion.clip_min, cfg2.diffusion.clip_max = cfg.diffusion.clip_min, cfg.diffusion.clip_max
    assert cfg2.model == cfg.model and cfg2.diffusion == cfg.diffusion and cfg2.data.seq_len == L
    other, _, _ = random_model("bd3lm", 4, seed=9)  # different weights, then import
    load_full_state_dict(other, read_model_file(out)[1]["model"])
    back = gather_full_state_dict(other)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    ids, pos = _bd3_input()
    spec = AttentionSpec("bd3", L, 4)
    with torch.no_grad():
        assert torch.equal(other(ids, pos, spec, logits_range=(0, L)), model(ids, pos, spec, logits_range=(0, L)))


def test_released_layout_imports_and_matches_transformers(tmp_path) -> None:  # noqa: ANN001
    path = released_dir(tmp_path / "released")
    cfg, sd = load_for_inference(path)
    assert (cfg.diffusion.objective, cfg.diffusion.block_size, cfg.data.seq_len) == ("bd3lm", 4, L)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads, cfg.model.cond_dim) == (32, 2, 4, 16)
    cfg.model.dropout, cfg.model.attention_backend = 0.0, "dense"
    model = build_model(cfg, V).eval()
    load_full_state_dict(model, sd)
    ids, pos = _bd3_input()
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=True).eval()
    with torch.no_grad():
        ours = model(ids, pos, AttentionSpec("bd3", L, 4), logits_range=(0, L))[..., :V]
        theirs = hf(input_ids=ids, timesteps=torch.zeros(2)).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_init_from_hf_dir_and_bad_input(tmp_path) -> None:  # noqa: ANN001
    from megabd3.training.run import load_init_weights

    model, sd, cfg = random_model("mdlm", L)
    out = export_state_dict(sd, cfg, tmp_path / "hf")
    fresh, _, _ = random_model("mdlm", L, seed=4)
    load_init_weights(fresh, str(out))  # training.init_from = an HF directory
    assert all(torch.equal(gather_full_state_dict(fresh)[k], sd[k]) for k in sd)
    fresh.vocab_size = V + 2  # a run whose tokenizer has another vocabulary
    with pytest.raises(UserError, match="vocabulary 40 but the run's tokenizer"):
        load_init_weights(fresh, str(out))

    conf = json.loads((out / "config.json").read_text())
    conf["model_type"] = "gpt2"  # another architecture (llama goes to megabd3.hf.llama_import)
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported; supported: bd3lm"):
        load_for_inference(out)
    conf["model_type"] = "bd3lm"
    (out / "config.json").write_text(json.dumps(conf))

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(V + 5)}  # 45 tokens + an appended mask = 46 != 40
    tk = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w1").save_pretrained(str(out))
    with pytest.raises(UserError, match="model vocabulary is 40 but the tokenizer files there give 46"):
        load_for_inference(out)


def test_eval_and_sample_launchers_resolve_an_hf_dir(tmp_path) -> None:  # noqa: ANN001
    """`launchers/evaluate.py` / `sample.py --checkpoint HF_DIR`: the config (with --set overrides applied after
    the directory's own), the weights, and results written outside the (possibly read-only) directory."""
    from megabd3.eval.inference import hf_checkpoint, inference_config, output_location

    _, sd, cfg = random_model("bd3lm", 4)
    out = export_state_dict(sd, cfg, tmp_path / "hf", clip=(0.2, 0.9))
    cfg2, sd2, directory = hf_checkpoint(str(out), ["sampling.steps=7", "data.tokenizer=gpt2"])
    assert cfg2.sampling.steps == 7 and cfg2.data.tokenizer == "gpt2" and directory == out
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert inference_config(str(out))[1] == out / "model.safetensors"
    run_dir, tag = output_location(str(out))
    assert tag == "hf" and out not in run_dir.parents and run_dir != out
    assert hf_checkpoint(str(tmp_path / "not_an_hf_dir")) is None
