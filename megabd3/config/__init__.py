"""megabd3 configuration: typed schema, JSON loading with composition and overrides, validation.

Typical use::

    from megabd3.config import load_config, derive_deepspeed_config
    cfg = load_config("configs/demo.json", ["training.steps=10"], world_size=2)
    ds_config = derive_deepspeed_config(cfg, dp_size=2)

Importing this package never imports torch. Validation does, lazily: precision=auto and flex checks ask
torch about CUDA, and the last check builds the training objective (noise schedule, time sampler,
resampling) so that a config that validates also builds.
"""
from megabd3.config.deepspeed import deepspeed_problems, derive_deepspeed_config
from megabd3.config.derived import (
    BatchPlan,
    p2p_options,
    batch_plan,
    data_parallel_size,
    effective_block_size,
    model_parallel_size,
    padded_vocab_size,
    resolve_precision,
)
from megabd3.config.errors import ConfigError, Problem
from megabd3.config.load import (
    config_from_dict,
    config_hash,
    config_to_dict,
    deep_merge,
    load_config,
    parse_override_value,
    save_resolved,
)
from megabd3.config.schema import (
    CheckpointConfig,
    ClipSearchConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    ParallelConfig,
    SamplingConfig,
    TrainingConfig,
)
from megabd3.config.validate import check, validate

__all__ = [
    "BatchPlan", "CheckpointConfig", "ClipSearchConfig", "Config", "ConfigError", "DataConfig",
    "DiffusionConfig", "EvalConfig", "LoggingConfig", "ModelConfig", "NoiseConfig", "OptimConfig",
    "ParallelConfig", "Problem", "SamplingConfig", "TrainingConfig", "batch_plan", "p2p_options", "check",
    "config_from_dict", "config_hash", "config_to_dict", "data_parallel_size", "deep_merge",
    "deepspeed_problems", "derive_deepspeed_config", "effective_block_size", "load_config",
    "model_parallel_size", "padded_vocab_size", "parse_override_value", "resolve_precision", "save_resolved",
    "validate",
]
