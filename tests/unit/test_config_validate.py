"""Cross-field validation: each rule fires on its bad combination and stays quiet on good ones."""
from __future__ import annotations

import importlib

import pytest

from megabd3.config import Config, check, choices, validate
from megabd3.config.load import parse_override_value, _schema_target


def make(**sets: object) -> Config:
    """A default Config with dotted-key assignments, e.g. make(**{"parallel.zero_stage": 3})."""
    cfg = Config()
    for dotted, value in sets.items():
        *path, last = dotted.split(".")
        node = cfg
        for p in path:
            node = getattr(node, p)
        assert hasattr(node, last), dotted
        setattr(node, last, value)
    return cfg


def keys_of(cfg: Config, world_size: int | None = None, cuda: bool = False, training: bool = True) -> list[tuple[str, ...]]:
    return [p.keys for p in check(cfg, world_size, training=training, cuda=cuda)]


def test_defaults_are_valid() -> None:
    assert validate(Config(), cuda=False) == []
    assert validate(Config(), 8, cuda=True) == []


# (settings, a key that must appear in the problem). One case per rule.
BAD = [
    ({"data.seq_len": 100, "diffusion.block_size": 16}, "diffusion.block_size"),  # L % L'
    ({"data.seq_len": 128, "diffusion.block_size": 256}, "diffusion.block_size"),  # L' > L
    ({"diffusion.block_size": 0}, "diffusion.block_size"),
    ({"model.num_heads": 6, "model.hidden_size": 384, "parallel.tensor_parallel": 4}, "model.num_heads"),
    ({"model.hidden_size": 250}, "model.hidden_size"),  # hidden % heads
    ({"model.hidden_size": 24, "model.num_heads": 8}, "model.hidden_size"),  # odd head dim (rotary)
    ({"parallel.pipeline_parallel": 2, "parallel.zero_stage": 0}, "parallel.zero_stage"),
    ({"parallel.pipeline_parallel": 2, "parallel.zero_stage": 2}, "parallel.zero_stage"),
    ({"parallel.pipeline_parallel": 2, "parallel.zero_stage": 3}, "parallel.zero_stage"),
    ({"parallel.sequence_parallel": True, "parallel.tensor_parallel": 2}, "parallel.sequence_parallel"),
    ({"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1, "model.tie_embeddings": True}, "model.tie_embeddings"),
    ({"parallel.virtual_pipeline": 2}, "parallel.virtual_pipeline"),  # interleaving needs PP > 1
    # interleaved PP is rejected (one model chunk per stage), see megabd3/config/validate.py
    ({"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1, "parallel.virtual_pipeline": 2},
     "parallel.virtual_pipeline"),
    ({"parallel.pipeline_parallel": 3, "parallel.zero_stage": 1}, "model.num_layers"),  # 8 layers over 3 stages
    ({"parallel.zero_stage": 4}, "parallel.zero_stage"),
    ({"parallel.precision": "fp16"}, "parallel.precision"),
    ({"model.attention_backend": "flash"}, "model.attention_backend"),
    ({"model.attention_backend": "flex"}, "model.attention_backend"),  # training without CUDA
    ({"diffusion.noise.type": "gaussian", "diffusion.noise.sigma": 0.0}, "diffusion.noise.sigma"),
    ({"diffusion.noise.type": "gaussian", "diffusion.noise.mu": 1.2}, "diffusion.noise.mu"),
    ({"diffusion.noise.type": "bimodal_gaussian", "diffusion.noise.w1": 1.0}, "diffusion.noise.w1"),
    ({"diffusion.noise.type": "bimodal_gaussian", "diffusion.noise.sigma2": -0.1}, "diffusion.noise.sigma2"),
    ({"diffusion.noise.type": "cubic"}, "diffusion.noise.type"),
    ({"diffusion.clip_min": 0.6, "diffusion.clip_max": 0.5}, "diffusion.clip_min"),
    ({"diffusion.clip_min": -0.1}, "diffusion.clip_min"),
    ({"diffusion.clip_max": 1.5}, "diffusion.clip_max"),
    ({"diffusion.objective": "ar", "diffusion.weighting": "edm"}, "diffusion.weighting"),
    ({"diffusion.objective": "sedd", "diffusion.weighting": "sigmoid"}, "diffusion.weighting"),
    ({"diffusion.weighting": "uniform"}, "diffusion.weighting"),
    ({"diffusion.time_mode": "tuned", "diffusion.block_size": 4}, "diffusion.time_mode"),
    ({"diffusion.time_mode": "tuned", "diffusion.block_size": 1, "diffusion.objective": "mdlm"}, "diffusion.time_mode"),
    ({"diffusion.objective": "diffusion"}, "diffusion.objective"),
    ({"diffusion.objective": "ar", "diffusion.clip_search.enabled": True}, "diffusion.clip_search.enabled"),
    ({"diffusion.clip_search.widths": [0.5, 1.5]}, "diffusion.clip_search.widths"),
    ({"optim.lr": 0.0}, "optim.lr"),
    ({"optim.betas": [0.9]}, "optim.betas"),
    ({"optim.min_lr": 1.0}, "optim.min_lr"),
    ({"optim.schedule": "linear"}, "optim.schedule"),
    ({"training.ema": 1.0}, "training.ema"),
    ({"training.micro_batch_size": 0}, "training.micro_batch_size"),
    ({"training.nan_policy": "ignore"}, "training.nan_policy"),
    ({"data.mode": "pack"}, "data.mode"),
    ({"data.mode": "pad", "data.chunk_special_tokens": True}, "data.chunk_special_tokens"),
    ({"sampling.length": 1000}, "sampling.length"),  # not a multiple of L'=16
    ({"sampling.top_p": 0.0}, "sampling.top_p"),
    ({"eval.judge_stride": 2048}, "eval.judge_stride"),
    ({"logging.wandb_mode": "cloud"}, "logging.wandb_mode"),
]


@pytest.mark.parametrize("settings,key", BAD, ids=[k for _, k in BAD])
def test_each_rule_fires(settings: dict, key: str) -> None:
    found = keys_of(make(**settings))
    assert any(key in keys for keys in found), found


GOOD = [
    {"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1},
    {"parallel.tensor_parallel": 8, "parallel.zero_stage": 3},
    {"diffusion.block_size": 1, "diffusion.time_mode": "tuned", "data.seq_len": 128, "sampling.length": 128},
    {"diffusion.objective": "mdlm", "diffusion.weighting": "simple", "data.seq_len": 128},
    {"diffusion.objective": "ar", "diffusion.block_size": 7},  # block size ignored for ar
    {"diffusion.clip_min": 0.3, "diffusion.clip_max": 0.3},  # 0 <= beta <= omega <= 1, equality allowed
    {"diffusion.noise.type": "bimodal_gaussian", "diffusion.noise.w1": 0.6, "diffusion.noise.mu1": 0.1},
]


@pytest.mark.parametrize("settings", GOOD)
def test_good_combinations_pass(settings: dict) -> None:
    assert validate(make(**settings), cuda=False) == []


def test_flex_allowed_with_cuda_or_for_inference() -> None:
    cfg = make(**{"model.attention_backend": "flex"})
    assert validate(cfg, cuda=True) == []
    assert validate(cfg, cuda=False, training=False) == []


def test_global_batch_needs_world_size() -> None:
    # global 512 = micro 16 x accum 4 x dp 8 works on 8 ranks; 6 ranks do not divide it.
    cfg = make(**{"training.micro_batch_size": 16, "training.global_batch_size": 512})
    assert validate(cfg, 8, cuda=False) == []
    (msg,) = validate(cfg, 6, cuda=False)
    assert "512 is not a multiple of" in msg and "16 x 6 = 96" in msg
    assert validate(cfg, None, cuda=False) == []  # unknown world size: no batch check
    cfg.parallel.world_size = 6  # ...unless the config states one
    assert len(validate(cfg, None, cuda=False)) == 1
    assert any("but the job has 8 ranks" in m for m in validate(cfg, 8, cuda=False))
    cfg.parallel.world_size = 0
    cfg.training.gradient_accumulation = 2  # explicit accumulation must agree with the derived 4
    assert any("disagrees" in m for m in validate(cfg, 8, cuda=False))
    tp = make(**{"parallel.tensor_parallel": 2})
    assert any("not a multiple of tensor_parallel" in m for m in validate(tp, 3, cuda=False))


def test_all_problems_reported_together() -> None:
    cfg = make(**{"parallel.pipeline_parallel": 2, "parallel.zero_stage": 3, "diffusion.clip_min": 2.0,
                  "training.steps": 0})
    assert len(validate(cfg, cuda=False)) == 3


def test_choice_fields_accept_every_listed_value() -> None:
    # Each allowed value of each choice field validates on its own (with what it requires).
    needs = {"tuned": {"diffusion.block_size": 1, "sampling.length": 1024}}
    for dotted, values in [("diffusion.objective", choices.OBJECTIVES), ("diffusion.noise.type", choices.NOISE_TYPES),
                           ("diffusion.weighting", choices.WEIGHTINGS), ("diffusion.time_mode", choices.TIME_MODES),
                           ("model.attention_backend", choices.ATTENTION_BACKENDS), ("parallel.precision", choices.PRECISIONS)]:
        for v in values:
            assert validate(make(**{dotted: v, **needs.get(v, {})}), cuda=True) == [], (dotted, v)
            # and the same value is what --set produces for that field
            kind, hint = _schema_target(dotted.split("."))
            assert parse_override_value(hint, str(v)) == v


@pytest.mark.parametrize("module,attr,names", [
    ("megabd3.diffusion.schedules", "SCHEDULES", choices.NOISE_TYPES),
    ("megabd3.diffusion.weighting", "WEIGHTINGS", tuple(w for w in choices.WEIGHTINGS if w != "none")),
    ("megabd3.diffusion.objectives", "OBJECTIVES", choices.OBJECTIVES),
])
def test_choices_match_registries(module: str, attr: str, names: tuple) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        pytest.skip(f"{module} not written yet")
    registry = getattr(mod, attr)
    assert set(names) <= set(registry), f"{module}.{attr} lacks {set(names) - set(registry)}"


# ---- validation builds the objective: a config that validates also builds ------------------------------

LM1B_EXP = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "experiments" / "lm1b"


@pytest.mark.parametrize("name,why", [
    ("bd3lm_bs1_clip_0-0.5", "identically zero"),  # a 1-token block's fraction is 0 or 1: <= 0.5 means 0
    ("bd3lm_bs1_clip_0.3-0.8", "never finish"),  # neither 0 nor 1 lies in [0.3, 0.8]
    ("bd3lm_bs1_clip_0.45-0.95", "never finish"),
])
def test_resampling_that_cannot_train_is_refused_at_config_time(name: str, why: str) -> None:
    from megabd3.config import ConfigError, load_config

    path = LM1B_EXP / f"{name}.json"
    load_config(path, cuda=False)  # as committed: resample=false at L'=1
    with pytest.raises(ConfigError) as info:
        load_config(path, ["diffusion.resample=true"], cuda=False)
    (line,) = info.value.problems
    assert why in line and "diffusion.resample=false" in line and "block_size=1" in line and "\n" not in line
    # L'=1 with a lower bound only: every token masked, a real loss; allowed (the kept BOS is resampled first)
    load_config(LM1B_EXP / "bd3lm_bs1_clip_0.5-1.json", ["diffusion.resample=true"], cuda=False)


def test_schedule_that_cannot_be_built_is_refused_at_config_time() -> None:
    cfg = make(**{"diffusion.noise.type": "bimodal_gaussian", "diffusion.noise.mu1": 0.3, "diffusion.noise.w1": 0.6,
                  "diffusion.noise.uniform_mix": 0.0})
    (problem,) = check(cfg, cuda=False)
    assert problem.keys == ("diffusion.noise.type",) and "uniform_mix > 0" in problem.message
    cfg.diffusion.noise.uniform_mix = 0.1  # the schema default
    assert check(cfg, cuda=False) == []
