"""Config-time (megabd3/config/validate.py) and build-time checks of model.arch and the Llama-family
fields, and export.py's strided (partition_stride) TP shard of the fused gate/up weight."""
from __future__ import annotations

import pytest
import torch

from megabd3.config.schema import Config
from megabd3.config.validate import validate
from megabd3.errors import UserError


def _llama(**model) -> Config:  # noqa: ANN003
    cfg = Config()
    cfg.model.arch, cfg.model.adaln = "llama", False
    cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_query_groups = 64, 4, 2
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def _model_problems(cfg: Config, world_size: int = 1) -> list[str]:
    return [p for p in validate(cfg, world_size, cuda=False) if "model." in p]


def test_a_valid_llama_config_passes() -> None:
    assert _model_problems(_llama(tie_embeddings=True)) == []


def test_llama_config_rejections_name_the_keys() -> None:
    assert any("model.arch" in p for p in _model_problems(_llama(arch="gpt3")))
    assert any("num_query_groups" in p for p in _model_problems(_llama(num_query_groups=3)))
    assert any("adaLN" in p for p in _model_problems(_llama(adaln=True)))
    assert any("norm_eps" in p for p in _model_problems(_llama(norm_eps=0.0)))
    # the DiT default is untouched by the new fields
    assert _model_problems(Config()) == []


def test_build_time_llama_checks_allow_tp_with_whole_query_groups() -> None:
    from megabd3.model.llama import check_llama_config

    cfg = _llama()
    cfg.model.time_conditioning = False
    cfg.parallel.tensor_parallel = 2  # 2 query groups: one per rank
    check_llama_config(cfg)
    cfg.parallel.tensor_parallel = 4
    with pytest.raises(UserError, match="num_query_groups"):
        check_llama_config(cfg)


@pytest.mark.parametrize("key,value", [("num_query_groups", 2), ("ffn_hidden_size", 512), ("norm_eps", 1e-6)])
def test_llama_only_fields_are_rejected_with_the_dit(key: str, value: object) -> None:
    from megabd3.model.transformer import check_model_config

    cfg = Config()
    check_model_config(cfg)  # defaults pass
    setattr(cfg.model, key, value)
    with pytest.raises(UserError, match=rf"model\.{key}=.*only apply to model\.arch=llama") as err:
        check_model_config(cfg)
    assert "\n" not in str(err.value)


def test_strided_shard_is_megatrons_gate_up_layout_and_unshard_inverts_it() -> None:
    from megabd3.model.export import strided_shard, strided_unshard

    gate, up = torch.arange(24.0).view(6, 4), 100 + torch.arange(24.0).view(6, 4)
    full = torch.cat([gate, up])  # linear_fc1 = [gate; up], F = 6
    for tp in (1, 2, 3):
        shards = [strided_shard(full, 0, r, tp, 2) for r in range(tp)]
        n = 6 // tp
        for r, s in enumerate(shards):  # megatron's gated MLP chunks rank r's output into gate_r, up_r
            assert torch.equal(s, torch.cat([gate[r * n:(r + 1) * n], up[r * n:(r + 1) * n]]))
        assert torch.equal(strided_unshard(shards, 0, 2), full)
        plain = [strided_shard(full, 1, r, 2, 1) for r in range(2)]  # stride 1: contiguous columns
        assert torch.equal(plain[1], full[:, 2:]) and torch.equal(strided_unshard(plain, 1, 1), full)
    with pytest.raises(UserError, match="equal parts"):
        strided_shard(full, 0, 0, 4, 2)  # 12 rows do not split into 2 x 4
