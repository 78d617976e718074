"""The derived DeepSpeed config and the other derived quantities, against hand-computed values."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megabd3.config import (
    Config,
    ConfigError,
    p2p_options,
    batch_plan,
    data_parallel_size,
    derive_deepspeed_config,
    effective_block_size,
    load_config,
    padded_vocab_size,
    resolve_precision,
)
from megabd3.config.deepspeed import STEPS_PER_PRINT


def owt_like() -> Config:
    cfg = Config()
    cfg.training.micro_batch_size = 16
    cfg.training.global_batch_size = 512
    cfg.parallel.zero_stage = 1
    cfg.optim.grad_clip = 1.0
    return cfg


def test_derivation_hand_computed_global_batch() -> None:
    # 8 data-parallel ranks x micro 16 = 128 per micro-step; 512 / 128 = 4 accumulation steps.
    ds = derive_deepspeed_config(owt_like(), dp_size=8, cuda=True)
    assert ds == {
        "train_batch_size": 512,
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 4,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},  # precision=auto with CUDA
        "fp16": {"enabled": False},
        "gradient_clipping": 1.0,
        "wall_clock_breakdown": False,
        "steps_per_print": STEPS_PER_PRINT,
    }
    json.dumps(ds)  # plain JSON, as deepspeed.initialize expects


def test_derivation_from_micro_and_accumulation() -> None:
    # global_batch_size=0: train_batch = micro 3 x accum 5 x dp 2 = 30.
    cfg = Config()
    cfg.training.micro_batch_size, cfg.training.gradient_accumulation = 3, 5
    cfg.parallel.zero_stage, cfg.parallel.precision, cfg.optim.grad_clip = 3, "fp32", 0.0
    ds = derive_deepspeed_config(cfg, dp_size=2, cuda=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (30, 3, 5)
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": False}  # explicit fp32 wins over CUDA
    assert ds["gradient_clipping"] == 0.0


@pytest.mark.parametrize("precision,cuda,expected", [
    ("auto", True, "bf16"), ("auto", False, "fp32"), ("fp32", True, "fp32"), ("bf16", False, "bf16")])
def test_precision(precision: str, cuda: bool, expected: str) -> None:
    cfg = Config()
    cfg.parallel.precision = precision
    assert resolve_precision(cfg, cuda) == expected
    assert derive_deepspeed_config(cfg, 1, cuda=cuda)["bf16"]["enabled"] is (expected == "bf16")


def test_passthrough_merges_and_conflicts_are_reported() -> None:
    cfg = owt_like()
    cfg.deepspeed = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7}, "steps_per_print": 100}
    ds = derive_deepspeed_config(cfg, dp_size=8, cuda=False)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 5e7}
    assert ds["steps_per_print"] == 100  # a plain default, not a derived value: may be overridden
    # Same values as derived are fine; different ones are all reported.
    cfg.deepspeed = {"train_batch_size": 512, "zero_optimization": {"stage": 1}}
    derive_deepspeed_config(cfg, dp_size=8, cuda=False)
    cfg.deepspeed = {"train_batch_size": 256, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
                     "bf16": {"enabled": True}, "gradient_clipping": 0.5, "optimizer": {"type": "Adam"}}
    with pytest.raises(ConfigError) as info:
        derive_deepspeed_config(cfg, dp_size=8, cuda=False)
    probs = info.value.problems
    assert len(probs) == 6
    assert any("deepspeed.train_batch_size=256 conflicts with the derived value 512" in p for p in probs)
    assert any("deepspeed.gradient_accumulation_steps=2" in p for p in probs)
    assert any("deepspeed.zero_optimization.stage=2" in p and "parallel.zero_stage" in p for p in probs)
    assert any("deepspeed.bf16.enabled=True" in p for p in probs)
    assert any("deepspeed.gradient_clipping=0.5" in p for p in probs)
    assert any("deepspeed.optimizer" in p for p in probs)


def test_batch_that_does_not_divide_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"512 is not a multiple of .* 16 x 6 = 96"):
        derive_deepspeed_config(owt_like(), dp_size=6, cuda=False)


def test_loader_reports_passthrough_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"parallel": {"zero_stage": 2}, "deepspeed": {"zero_optimization": {"stage": 3},
                                                                         "train_micro_batch_size_per_gpu": 4}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, cuda=False)  # world size unknown: only the stage conflict is decidable
    assert len(info.value.problems) == 1 and "zero_optimization.stage=3" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        load_config(path, world_size=2, cuda=False)
    assert len(info.value.problems) == 2  # now the micro batch (8 != 4) conflicts too


def test_batch_plan_and_dp() -> None:
    cfg = owt_like()
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = 2, 2
    assert data_parallel_size(cfg, 32) == 8
    with pytest.raises(ConfigError):
        data_parallel_size(cfg, 30)
    plan = batch_plan(cfg, 8)
    assert (plan.micro_batch_size, plan.gradient_accumulation, plan.dp_size, plan.global_batch_size) == (16, 4, 8, 512)


@pytest.mark.parametrize("objective,block,seq_len,expected", [
    ("ar", 16, 128, 1), ("mdlm", 16, 128, 128), ("sedd", 4, 1024, 1024), ("bd3lm", 4, 1024, 4), ("bd3lm", 1, 128, 1)])
def test_effective_block_size(objective: str, block: int, seq_len: int, expected: int) -> None:
    cfg = Config()
    cfg.diffusion.objective, cfg.diffusion.block_size, cfg.data.seq_len = objective, block, seq_len
    assert effective_block_size(cfg) == expected


def test_padded_vocab_and_p2p() -> None:
    cfg = Config()
    assert padded_vocab_size(cfg, 50258) == 50304  # 393 x 128
    assert padded_vocab_size(cfg, 30522) == 30592  # 239 x 128
    cfg.parallel.tensor_parallel = 2
    assert padded_vocab_size(cfg, 50258) == 50432  # 197 x 256
    # batched p2p on NCCL only: gloo reorders same-tag messages between a pair of ranks
    assert p2p_options("nccl", 1).batch_p2p_comm is True
    assert p2p_options("gloo", 1).batch_p2p_comm is False and p2p_options("gloo", 1).overlap_p2p_comm is False
