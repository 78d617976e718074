"""Hugging Face export (megabd3.hf): the exported directory loaded by transformers' AutoModelForMaskedLM
(trust_remote_code, offline, from a local directory) gives megabd3's logits (fp32, <= 1e-5) for BD3 at
L' = 4 and 16 (2L input, BD3 mask), MDLM, AR and SEDD; the layout is the released one; bad input."""
from __future__ import annotations

import json

import pytest
import torch

from megabd3.diffusion.masks import AttentionSpec
from megabd3.errors import UserError
from megabd3.hf.export import export_state_dict
from tests.unit._hf_common import V, L, random_model

transformers = pytest.importorskip("transformers")


def _hf_load(path):  # noqa: ANN001, ANN202
    return transformers.AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=True).eval()


def _ids(kind: str, b: int = 2):  # noqa: ANN202
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, V - 1, (b, L), generator=g)
    xt = torch.where(torch.rand(b, L, generator=g) < 0.5, V - 1, x0)
    if kind == "bd3":
        return torch.cat([xt, x0], 1), torch.arange(L).repeat(2)[None].expand(b, -1)
    return (xt if kind == "full" else x0), torch.arange(L)[None].expand(b, -1)


CASES = {  # name: (objective, block, model overrides, attention kind)
    "bd3_4": ("bd3lm", 4, {}, "bd3"),
    "bd3_16": ("bd3lm", 16, {}, "bd3"),
    "mdlm": ("mdlm", L, {}, "full"),
    "ar": ("ar", 1, {"adaln": False}, "causal"),
    "sedd": ("sedd", L, {"time_conditioning": True}, "full"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_matches_megabd3(case: str, tmp_path) -> None:  # noqa: ANN001
    objective, block, model_kw, kind = CASES[case]
    model, sd, cfg = random_model(objective, block, **model_kw)
    out = export_state_dict(sd, cfg, tmp_path / "hf", clip=(0.3, 0.8))
    ids, pos = _ids(kind)
    sigma = torch.tensor([0.4, 1.7])
    spec = AttentionSpec(kind, L, block if kind == "bd3" else 1)
    with torch.no_grad():
        ours = model(ids, pos, spec, sigma=sigma, logits_range=(0, L))[..., :V]
        hf = _hf_load(out)
        theirs = hf(input_ids=ids, timesteps=sigma).logits
    assert type(hf).__name__ == "BD3LM" and theirs.dtype == torch.float32 and theirs.shape == (2, L, V)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"{case}: max abs diff {diff}"
    conf = json.loads((out / "config.json").read_text())
    assert conf["cross_attn"] == (kind == "bd3") and conf["causal"] == (kind == "causal")
    assert conf["block_size"] == block and conf["model_length"] == L and conf["vocab_size"] == V
    assert (float(hf.sampling_eps_min), float(hf.sampling_eps_max)) == pytest.approx((0.3, 0.8))


def test_released_names_and_shapes(tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file

    model, sd, cfg = random_model("bd3lm", 4)
    out = export_state_dict(sd, cfg, tmp_path / "hf")
    t = load_file(str(out / "model.safetensors"))
    d, c, h, n = cfg.model.hidden_size, cfg.model.cond_dim, cfg.model.num_heads, cfg.model.num_layers
    want = {"sampling_eps_min": (), "sampling_eps_max": (), "backbone.vocab_embed.embedding": (V, d),
            "backbone.sigma_map.mlp.0.weight": (c, 256), "backbone.sigma_map.mlp.0.bias": (c,),
            "backbone.sigma_map.mlp.2.weight": (c, c), "backbone.sigma_map.mlp.2.bias": (c,),
            "backbone.rotary_emb.inv_freq": (d // h // 2,),
            "backbone.output_layer.norm_final.weight": (d,), "backbone.output_layer.linear.weight": (V, d),
            "backbone.output_layer.linear.bias": (V,), "backbone.output_layer.adaLN_modulation.weight": (2 * d, c),
            "backbone.output_layer.adaLN_modulation.bias": (2 * d,)}
    for i in range(n):
        p = f"backbone.blocks.{i}."
        want.update({p + "norm1.weight": (d,), p + "attn_qkv.weight": (3 * d, d), p + "attn_out.weight": (d, d),
                     p + "norm2.weight": (d,), p + "mlp.0.weight": (4 * d, d), p + "mlp.0.bias": (4 * d,),
                     p + "mlp.2.weight": (d, 4 * d), p + "mlp.2.bias": (d,),
                     p + "adaLN_modulation.weight": (6 * d, c), p + "adaLN_modulation.bias": (6 * d,)})
    assert {k: tuple(v.shape) for k, v in t.items()} == want
    # qkv rows are (three, head, head_dim): rows of head 1's k are megatron's rows [h1: q k v] k part
    hd = d // h
    ours = sd["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(t["backbone.blocks.0.attn_qkv.weight"][d + hd:d + 2 * hd], ours[3 * hd + hd:3 * hd + 2 * hd])
    conf = json.loads((out / "config.json").read_text())
    assert conf["auto_map"]["AutoModelForMaskedLM"] == "modeling_bd3lm.BD3LM"
    assert conf["auto_map"]["AutoConfig"] == "configuration_bd3lm.BD3LMConfig"
    src = (out / "modeling_bd3lm.py").read_text() + (out / "configuration_bd3lm.py").read_text()
    for banned in ("import megabd3", "from megabd3", "flash_attn", "flex_attention"):
        assert banned not in src, banned


def test_bad_export_input(tmp_path) -> None:  # noqa: ANN001
    _, sd, cfg = random_model("bd3lm", 4)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(UserError, match="exists and is not empty"):
        export_state_dict(sd, cfg, busy)
    cfg.diffusion.objective = "unknown"
    with pytest.raises(UserError, match="supported: bd3lm, mdlm, ar, sedd"):
        export_state_dict(sd, cfg, tmp_path / "new")


def test_parity_at_training_length(tmp_path) -> None:  # noqa: ANN001
    """At L = 1024 an fp32 inv_freq moves cos by ~6e-5 (logits by ~3.6e-4 here): the remote code's rotary must
    match megabd3's float64-angle rotary at real lengths, not only at the other tests' L = 16."""
    from megabd3.model.export import gather_full_state_dict, load_full_state_dict
    from megabd3.model.transformer import build_model
    from megabd3.parallel.init import init_distributed
    from tests.unit._hf_common import tiny_cfg

    n = 1024
    cfg = tiny_cfg("mdlm", n, hidden_size=128, num_heads=2)  # head_dim 64, as the released models
    cfg.data.seq_len = n
    init_distributed(cfg)
    model = build_model(cfg, V).eval()
    g = torch.Generator().manual_seed(4)
    sd = {k: torch.randn(t.shape, generator=g) * 0.3 for k, t in gather_full_state_dict(model).items()}
    load_full_state_dict(model, sd)
    out = export_state_dict(sd, cfg, tmp_path / "hf", clip=(1e-3, 1.0))
    ids = torch.randint(0, V - 1, (1, n), generator=g)
    with torch.no_grad():
        ours = model(ids, torch.arange(n)[None], AttentionSpec("full", n, 1), logits_range=(0, n))[..., :V]
        theirs = _hf_load(out)(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    # 4e-5, not the short tests' 1e-5: with logits up to ~18, fp32 sums over 1024 keys in a different order
    # (SDPA vs our dense backend) differ by ~1.7e-5 (1e-6 relative); the fp32-inv_freq bug gave 3.6e-4
    assert diff <= 4e-5, f"L={n}: max abs diff {diff}, max |logit| {ours.abs().max().item()}"
