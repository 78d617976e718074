"""`--dry-run`: the real model of every rank role built on a fake process group, a fake-tensor trace of
one forward+backward, the per-rank table and the problems list (megabd3.training.dryrun)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megabd3.config.load import load_config
from megabd3.errors import UserError
from megabd3.training.dryrun import plan

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.json")
SMALL = ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=4", "model.cond_dim=16",
         "model.make_vocab_size_divisible_by=64", "data.seq_len=32", "diffusion.block_size=4", "data.tokenizer=gpt2",
         "sampling.length=32", "sampling.cache_window=32", "training.micro_batch_size=2",
         "training.gradient_accumulation=1", "data.train_prefix=/nonexistent/megabd3/train",
         "data.valid_prefix=/nonexistent/megabd3/valid"]


@pytest.fixture(autouse=True)
def _no_process_group():  # type: ignore[no-untyped-def]
    """Other test modules leave a one-rank group behind; the dry run needs a process without one."""
    from megabd3.parallel.init import destroy_distributed

    destroy_distributed()
    yield
    destroy_distributed()


def _cfg(*sets: str):  # type: ignore[no-untyped-def]
    return load_config(DEMO, [*SMALL, *sets])


def test_parameter_count_is_the_real_models() -> None:
    cfg = _cfg("parallel.zero_stage=0")
    rep = plan(cfg, 2, target_cuda=False, trace=False)
    from megabd3.model.transformer import build_model
    from megabd3.parallel.init import init_distributed

    init_distributed(cfg)
    real = build_model(cfg, rep.vocab)
    n = sum(p.numel() for p in real.parameters())
    assert [r.params for r in rep.roles] == [n]
    assert rep.total_params == n
    # the ZeRO accounting ran on the real parameter list: ZeRO-0 fp32 weights are 4 bytes each
    assert rep.roles[0].state.params == 4 * n


def test_tp2_pp2_plan_traces_every_role() -> None:
    sets = ("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.zero_stage=1",
            "training.global_batch_size=8")  # dp 2 x micro 2 x 2 micro-batches per step
    rep = plan(_cfg(*sets), 8)
    assert [(r.pp_rank, r.tp_rank) for r in rep.roles] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.rank for r in rep.roles] == [0, 1, 4, 5]  # megatron's order: tp fastest, then dp, then pp
    assert not [p for p in rep.problems if "trace" in p], rep.problems
    assert all(r.activations and r.activations > 0 for r in rep.roles)
    assert [r.in_flight for r in rep.roles] == [2, 2, 1, 1]  # 1F1B: stage 0 holds both micro-batches
    # the same global parameters as the unsharded model (the vocabulary padding is equal here)
    assert rep.total_params == plan(_cfg(), 1, target_cuda=False, trace=False).total_params
    stage0, stage1 = rep.roles[0].params, rep.roles[2].params
    assert stage0 + stage1 < rep.total_params  # TP shards: each rank holds about half of its stage
    text = rep.render()
    assert "tp 2 x pp 2 x dp 2" in text and "pp 1 tp 1 (rank 5)" in text


def test_activation_trace_scales_with_the_micro_batch() -> None:
    # the dense backend runs for real on the fake tensors (and memoises its mask)
    one = plan(_cfg("training.micro_batch_size=2", "model.attention_backend=dense"), 1).roles[0].activations
    two = plan(_cfg("training.micro_batch_size=4", "model.attention_backend=dense"), 1).roles[0].activations
    assert one and two and 1.6 < two / one < 2.1
    from megabd3.model import attention

    # masks memoised during a trace may be fake: they must not outlive it (a later real forward would use them)
    assert all(f.cache_info().currsize == 0 for f in vars(attention).values() if hasattr(f, "cache_info"))


def test_missing_dataset_is_a_problem_and_the_table_still_prints(capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(REPO / "launchers"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    sets = [s for s in SMALL if not s.startswith("data.train_prefix")] + ["data.train_prefix=/nonexistent/owt/train"]
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--config", DEMO, "--dry-run", "--world-size", "4", "--set", *sets])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "world 4 = tp 1 x pp 1 x dp 4" in out and "global batch" in out
    assert "rank role" in out and "pp 0 tp 0 (rank 0)" in out  # the memory table
    assert "/nonexistent/owt/train.idx not found" in out.split("problems (")[1]


def test_refuses_inside_a_real_process_group() -> None:
    from megabd3.parallel.fake import fake_world
    from megabd3.parallel.init import init_distributed

    init_distributed(_cfg())
    with pytest.raises(UserError, match="without torch.distributed"):
        with fake_world(0, 2, 1, 1):
            pass
    assert torch.distributed.is_initialized()  # the real group is left alone
