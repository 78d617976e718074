"""What megabd3.hf.importer reads from an HF directory and what it refuses: the clip interval (the stored
buffers first), our export's megabd3 block cross-checked against the released fields beside it, missing
or malformed fields, the objective of a foreign time-conditioned checkpoint (MDLM, never a guessed
SEDD), Hub ids vs mistyped local paths; and the exporter refusing a Llama-family run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.errors import UserError
from megabd3.hf.export import export_state_dict, hf_config
from megabd3.hf.importer import load_hf_dir, resolve_hf
from megabd3.model.export import load_full_state_dict
from megabd3.model.transformer import build_model
from tests.unit._hf_common import L, V, edit_config, random_model, released_dir

transformers = pytest.importorskip("transformers")


_edit = edit_config


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, UserError), msg
    return msg


@pytest.mark.parametrize("buffers, fields, want", [
    ((0.3, 0.8), {"sampling_eps_min": 0.1, "sampling_eps_max": 0.95}, (0.3, 0.8)),  # buffers win
    (None, {"sampling_eps_min": 0.1, "sampling_eps_max": 0.95}, (0.1, 0.95)),  # no buffers: config.json
    (None, {"sampling_eps_min": None, "sampling_eps_max": None}, (1e-3, 0.999)),  # the released defaults
])
def test_clip_interval_from_the_stored_buffers(tmp_path, buffers, fields, want) -> None:  # noqa: ANN001
    cfg, _ = load_hf_dir(released_dir(tmp_path / "r", eps=buffers, **fields))
    assert (cfg.diffusion.clip_min, cfg.diffusion.clip_max) == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("key, value, where", [
    ("hidden_dim", 64, "model.hidden_size"), ("n_blocks", 3, "model.num_layers"), ("n_heads", 2, "model.num_heads"),
    ("block_size", 8, "diffusion.block_size=4"), ("model_length", 32, "data.seq_len"),
    ("cross_attn", False, "diffusion.objective=bd3lm"), ("causal", True, "diffusion.objective=bd3lm"),
    ("time_conditioning", True, "model.time_conditioning"),
])
def test_edited_config_json_contradicts_the_megabd3_block(tmp_path, key, value, where) -> None:  # noqa: ANN001
    _, sd, cfg = random_model("bd3lm", 4)
    out = export_state_dict(sd, cfg, tmp_path / "hf")
    load_hf_dir(out)  # as exported: consistent
    _edit(out, **{key: value})
    with pytest.raises(UserError) as exc:
        load_hf_dir(out)
    msg = _one_line(exc)
    assert f"{key}={value!r} but its megabd3 block says" in msg and where in msg and "config.json" in msg


@pytest.mark.parametrize("key", ["hidden_dim", "n_heads", "n_blocks", "vocab_size"])
def test_missing_required_field(tmp_path, key: str) -> None:  # noqa: ANN001
    path = released_dir(tmp_path / "r", **{key: None})
    with pytest.raises(UserError) as exc:
        load_hf_dir(path)
    msg = _one_line(exc)
    assert f"required field {key!r} is missing" in msg and str(path / "config.json") in msg


@pytest.mark.parametrize("fields, text", [
    ({"hidden_dim": "32"}, "hidden_dim must be a positive integer, found '32'"),
    ({"n_heads": 2.5}, "n_heads must be a positive integer, found 2.5"),
    ({"block_size": None, "model_length": "long"}, "model_length must be a positive integer"),
    ({"dropout": "x"}, "dropout must be a number, found 'x'"),
    ({"cross_attn": "yes"}, "cross_attn must be true or false, found 'yes'"),
    ({"sampling_eps_min": [0.1]}, "sampling_eps_min must be a number"),
    ({"hidden_dim": 30, "n_heads": 4}, "hidden_dim=30 is not divisible by n_heads=4"),
    ({"block_size": 5}, "block_size=5 does not divide model_length=16"),
    ({"causal": True}, "causal=true and cross_attn=true contradict"),
])
def test_malformed_fields(tmp_path, fields, text) -> None:  # noqa: ANN001
    with pytest.raises(UserError) as exc:
        load_hf_dir(released_dir(tmp_path / "r", **fields))
    assert text in _one_line(exc)


def test_weights_that_config_json_does_not_describe(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(UserError) as exc:  # config says 1 layer, the weights have 2
        load_hf_dir(released_dir(tmp_path / "a", n_blocks=1))
    assert "does not describe, first 'backbone.blocks.1." in _one_line(exc)
    with pytest.raises(UserError) as exc:  # config says cond_dim 8, the weights have 16
        load_hf_dir(released_dir(tmp_path / "b", cond_dim=8))
    assert "'backbone.sigma_map.mlp.0.weight' has shape [16, 256], config.json implies [8, 256]" in _one_line(exc)
    path = released_dir(tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError) as exc:
        load_hf_dir(path)
    assert "cannot be read" in _one_line(exc)


@torch.no_grad()
def test_foreign_time_conditioned_non_bd3_is_mdlm_with_time_conditioning(tmp_path) -> None:  # noqa: ANN001
    """No megabd3 block, cross_attn=false, time_conditioning=true: MDLM fed sigma (megabd3 supports it),
    and megabd3 then computes transformers' logits at the same sigma. Our SEDD export stays SEDD (its
    megabd3 block says so)."""
    path = released_dir(tmp_path / "r", cross_attn=False, time_conditioning=True, block_size=L)
    cfg, sd = load_hf_dir(path)
    assert (cfg.diffusion.objective, cfg.model.time_conditioning, cfg.diffusion.block_size) == ("mdlm", True, L)
    cfg.model.dropout, cfg.model.attention_backend = 0.0, "dense"
    model = build_model(cfg, V).eval()
    load_full_state_dict(model, sd)
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.3, 2.0])
    ours = model(ids, torch.arange(L)[None].expand(2, -1), AttentionSpec("full", L), sigma=sigma,
                 logits_range=(0, L))[..., :V]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=True).eval()
    assert (ours - hf(input_ids=ids, timesteps=sigma).logits).abs().max().item() <= 1e-5
    _, sd2, cfg2 = random_model("sedd", L, time_conditioning=True)
    assert load_hf_dir(export_state_dict(sd2, cfg2, tmp_path / "sedd"))[0].diffusion.objective == "sedd"


def test_mistyped_local_paths_never_reach_the_hub(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import huggingface_hub

    asked = []

    def fake_download(repo_id: str, **kw) -> str:  # noqa: ANN003
        asked.append(repo_id)
        return str(released_dir(tmp_path / f"hub{len(asked)}"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "notes.txt").write_text("")
    for local in ["runs/demo2", "./foo/bar", "../foo/bar", "/abs/foo", "~/foo", "foo/bar/baz", "foo/", "/foo/bar",
                  "runs", "notes.txt/x", "owner/model.pt", "owner/..", Path("foo/bar"), Path("./foo/bar")]:
        assert resolve_hf(local) is None, local
    assert asked == []
    got = resolve_hf("kuleshov-group/bd3lm-owt-block_size16")  # the one shape that may be a Hub id
    assert asked == ["kuleshov-group/bd3lm-owt-block_size16"] and got is not None and (got / "config.json").is_file()


def test_llama_run_is_refused_by_the_dit_exporter(tmp_path) -> None:  # noqa: ANN001
    _, sd, cfg = random_model("bd3lm", 4)
    cfg.model.arch = "llama"
    for call in (lambda: hf_config(cfg, V, (0.1, 0.9)), lambda: export_state_dict(sd, cfg, tmp_path / "x")):
        with pytest.raises(UserError) as exc:
            call()
        assert "model.arch='llama'" in _one_line(exc) and "DiT backbone" in str(exc.value)
    assert not (tmp_path / "x").exists()
