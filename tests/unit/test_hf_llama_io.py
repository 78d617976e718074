"""Llama-family HF directories in and out (megabd3/hf/llama_import.py, llama_export.py): a transformers
LlamaForCausalLM directory imports with its exact weights; our export loads strictly in transformers with
the same causal logits and re-imports to the same config (shift, objective) and tensors; bad directories and
run configs that do not describe the checkpoint get one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.masks import AttentionSpec  # noqa: E402
from megabd3.errors import UserError  # noqa: E402
from megabd3.hf.importer import load_hf_dir  # noqa: E402
from megabd3.hf.llama_export import export_llama_state_dict  # noqa: E402
from megabd3.model.export import gather_full_state_dict, load_full_state_dict  # noqa: E402
from megabd3.model.hf_llama import LlamaShape, hf_to_megabd3  # noqa: E402
from megabd3.model.transformer import build_model  # noqa: E402
from megabd3.parallel.init import init_distributed  # noqa: E402

V, L = 96, 16


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


def _hf(tied: bool = True, **kw):  # noqa: ANN202
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 rms_norm_eps=1e-5, tie_word_embeddings=tied, **kw)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(c).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_import_of_a_transformers_llama_directory(tmp_path, tied: bool) -> None:  # noqa: ANN001
    hf = _hf(tied)
    hf.save_pretrained(tmp_path)
    cfg, sd = load_hf_dir(tmp_path)
    assert (cfg.model.arch, cfg.diffusion.objective, cfg.model.num_query_groups, cfg.model.tie_embeddings) == \
        ("llama", "ar", 2, tied)
    want = hf_to_megabd3(hf.state_dict(), LlamaShape.from_hf_config(hf.config))
    assert sorted(sd) == sorted(want)
    for k in sd:
        assert torch.equal(sd[k], want[k]), k


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("edit, needle", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 32}, "sliding-window"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_llama_variants_are_refused(tmp_path, edit: dict, needle: str) -> None:  # noqa: ANN001
    _hf().save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError) as e:
        load_hf_dir(tmp_path)
    assert needle in _one_line(e)


def _bd3_llama_cfg(hf) -> Config:  # noqa: ANN001
    from megabd3.model.hf_llama import model_config_from_hf

    cfg = Config()
    for k, v in model_config_from_hf(hf.config).items():
        setattr(cfg.model, k, v)
    cfg.model.attention_backend, cfg.model.shift_logits = "dense", True
    cfg.diffusion.objective, cfg.diffusion.block_size, cfg.data.seq_len = "bd3lm", 4, L
    return cfg


def test_export_loads_in_transformers_and_reimports(tmp_path) -> None:  # noqa: ANN001
    hf = _hf(tied=True)
    cfg = _bd3_llama_cfg(hf)
    model = build_model(cfg, V).eval()
    load_full_state_dict(model, hf_to_megabd3(hf.state_dict(), LlamaShape.from_hf_config(hf.config)))
    sd = gather_full_state_dict(model)
    out = export_llama_state_dict(sd, cfg, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, torch.arange(L).expand(2, L), AttentionSpec("causal", L))[..., :V]
        theirs = back(input_ids=ids).logits.float()
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert json.loads((out / "config.json").read_text())["rope_theta"] == cfg.model.rope_base  # transformers 4.x reads it
    cfg2, sd2 = load_hf_dir(out)
    assert (cfg2.diffusion.objective, cfg2.diffusion.block_size, cfg2.model.shift_logits) == ("bd3lm", 4, True)
    assert sorted(sd2) == sorted(k for k in sd)
    for k in sd2:
        assert torch.equal(sd2[k], sd[k][: sd2[k].shape[0]]), k
    # an edited megabd3 block that no longer describes the weights
    conf = json.loads((out / "config.json").read_text())
    conf["megabd3"]["model"]["norm_eps"] = 0.1
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError) as e:
        load_hf_dir(out)
    assert "norm_eps" in _one_line(e)


def test_init_from_checks_the_run_describes_the_checkpoint(tmp_path) -> None:  # noqa: ANN001
    from megabd3.training.run import load_init_weights

    hf = _hf(tied=True)
    hf.save_pretrained(tmp_path)
    cfg = _bd3_llama_cfg(hf)
    model = build_model(cfg, V).eval()
    payload = load_init_weights(model, str(tmp_path))  # matches: loads
    assert torch.equal(gather_full_state_dict(model)["embedding.weight"][:V], payload["model"]["embedding.weight"])
    cfg.model.rope_base = 500000.0  # same shapes, different model: only the field check can see it
    wrong = build_model(cfg, V)
    with pytest.raises(UserError) as e:
        load_init_weights(wrong, str(tmp_path))
    assert "model.rope_base" in _one_line(e)
    cfg.model.rope_base = 10000.0
    appended = build_model(cfg, V + 1)  # a tokenizer without mask token appends one row
    with pytest.raises(UserError) as e:
        load_init_weights(appended, str(tmp_path))
    assert "add_mask_token.py" in _one_line(e)
