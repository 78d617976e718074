"""Config-time checks of model.arch and the Llama-family fields (megabd3/config/validate.py)."""
from __future__ import annotations

from megabd3.config.schema import Config
from megabd3.config.validate import validate


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
    cfg = _llama()
    cfg.parallel.tensor_parallel = 2
    assert any("tensor_parallel=1" in p for p in _model_problems(cfg, 2))
    # the DiT default is untouched by the new fields
    assert _model_problems(Config()) == []
