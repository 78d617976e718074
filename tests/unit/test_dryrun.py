"""`--dry-run`: the real model of every rank role built on a fake process group, a fake-tensor trace of
one forward+backward, the per-rank table and the problems list (megabd3.training.dryrun)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

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
    assert not rep.failures, rep.failures
    assert [r.trace_tokens for r in rep.roles] == [64] * 4  # bd3lm: x_t and x_0 side by side, 2 x seq_len 32
    assert "trace: one micro-batch of 2 sequences x 64 = 2 x 32 tokens" in rep.render()
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


def _launcher():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(REPO / "launchers"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    return pretrain


def test_distributed_debug_detail_and_torchrun_env_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_DISTRIBUTED_DEBUG=DETAIL wraps new groups in a ProcessGroupWrapper that cannot be built on the
    fake store; RANK/MASTER_ADDR from a job script must not make the dry run rendezvous."""
    dist = torch.distributed
    for k, v in {"TORCH_DISTRIBUTED_DEBUG": "DETAIL", "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16",
                 "MASTER_ADDR": "10.255.255.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    before = dist.get_debug_level()
    dist.set_debug_level(dist.DebugLevel.DETAIL)  # what torch sets at import from the variable
    try:
        rep = plan(_cfg("parallel.tensor_parallel=2", "parallel.zero_stage=3"), 4, target_cuda=False, trace=False)
        assert dist.get_debug_level() == dist.DebugLevel.DETAIL  # restored for the rest of the process
    finally:
        dist.set_debug_level(before)
    assert not rep.failures, rep.failures
    assert [r.rank for r in rep.roles] == [0, 1] and rep.header[0].startswith("world 4 = tp 2 x pp 1 x dp 2")


def test_a_failing_role_is_an_na_row_and_the_others_are_planned(monkeypatch: pytest.MonkeyPatch) -> None:
    from megabd3.model import transformer

    real_build = transformer.build_model

    def build(cfg, vocab, pre_process=True, post_process=True):  # type: ignore[no-untyped-def]
        if not pre_process:
            raise RuntimeError("stage 1 exploded\nsecond line")
        return real_build(cfg, vocab, pre_process=pre_process, post_process=post_process)

    monkeypatch.setattr(transformer, "build_model", build)
    rep = plan(_cfg("parallel.pipeline_parallel=2", "parallel.zero_stage=1"), 2, target_cuda=False, trace=False)
    assert [(r.pp_rank, r.params is None) for r in rep.roles] == [(0, False), (1, True)]
    assert rep.failures == ["pp 1 tp 0 (rank 1) could not be planned: RuntimeError: stage 1 exploded"]
    assert rep.exit_code == 2
    text = rep.render()
    row = next(line for line in text.splitlines() if line.startswith("pp 1 tp 0"))
    assert row.split()[6:] == ["n/a"] * 8  # #params and every column
    assert "planner failures (1" in text and "exit status 2" in text


def test_exit_codes(capsys: pytest.CaptureFixture) -> None:
    from megabd3.training.dryrun import DryRunReport

    assert [DryRunReport().exit_code, DryRunReport(problems=["x"]).exit_code,
            DryRunReport(problems=["x"], failures=["y"]).exit_code] == [0, 1, 2]
    pretrain = _launcher()
    with pytest.raises(SystemExit) as exc:  # tp 2 does not divide 3 ranks: a config error
        pretrain.main(["--config", DEMO, "--dry-run", "--world-size", "3", "--set", *SMALL, "parallel.tensor_parallel=2"])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--config", DEMO, "--dry-run", "--set", "no.such_key=1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--help"])
    assert "2 = config error or internal failure" in capsys.readouterr().out


def test_copied_tp_ranks_and_small_numbers_are_readable() -> None:
    # gpt2: vocabulary 50258 padded over 4 shards, the mask id is the last real id -> only rank 3 differs
    rep = plan(_cfg("parallel.tensor_parallel=4", "parallel.zero_stage=3"), 8, target_cuda=False, trace=False)
    rows = rep.table().splitlines()[2:]
    assert [r.same_as for r in rep.roles] == [None, 0, 0, None]
    assert rows[1].endswith("(same as rank 0)") and rows[2].endswith("(same as rank 0)")
    assert "(same as" not in rows[0] + rows[3]
    assert rep.unit()[0] == "GiB" and "per-rank memory (GiB" in rep.render()  # the 1.9 GiB reduce bucket
    # a ZeRO-3 partition of a small model is ~1e-3 GiB: three significant figures, never 0.00
    assert all(v not in ("0.00", "0") and len(v.strip("0.")) >= 2 for r in rows for v in r.split()[6:9])
    assert "ZeRO-3: reduce_bucket_size" in rep.render()
    z0 = plan(_cfg("parallel.zero_stage=0"), 2, target_cuda=False, trace=False).render()
    assert "reduce_bucket_size" not in z0 and "ZeRO-0: gradients all-reduced" in z0


def test_fake_world_never_takes_megatrons_cuda_seed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a login node with a GPU, model_parallel_cuda_manual_seed would create a CUDA context."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from megabd3.parallel import cpu
    from megabd3.parallel.fake import fake_world

    def cuda_seed(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the CUDA seed path ran")

    cpu.apply()  # what fake_world does first on CPU; it must not re-patch what the test replaces
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", cuda_seed)
    monkeypatch.setattr(mrandom, "model_parallel_cuda_manual_seed", cuda_seed)
    before = mrandom._CUDA_RNG_STATE_TRACKER
    with fake_world(1, 2, 2, 1, seed=5):
        tracker = mrandom._CUDA_RNG_STATE_TRACKER
        assert isinstance(tracker, cpu.CPURNGStatesTracker) and tracker.is_initialized() and tracker is not before
    assert mrandom._CUDA_RNG_STATE_TRACKER is before  # the process's own tracker is back


def test_cleanup_after_an_error_inside_the_fake_world() -> None:
    from megatron.core import parallel_state as ps

    from megabd3.model.transformer import build_model
    from megabd3.parallel.fake import fake_world
    from megabd3.parallel.init import init_distributed

    with pytest.raises(RuntimeError, match="boom"):
        with fake_world(1, 4, 2, 1) as fr:
            assert fr.tp_rank == 1 and torch.distributed.get_world_size() == 4
            raise RuntimeError("boom")
    assert not torch.distributed.is_initialized() and not ps.model_parallel_is_initialized()
    cfg = _cfg()
    layout = init_distributed(cfg)  # a real gloo group of one rank, megatron groups of tp 1
    assert layout.world_size == 1 and torch.distributed.get_backend() == "gloo"
    from megabd3.diffusion.objectives import build_objective

    model = build_model(cfg, 50258)
    assert not any(isinstance(p, FakeTensor) for p in model.parameters())
    x0 = torch.randint(0, 1000, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    loss = build_objective(cfg, 50257, 50258)(model, x0, torch.Generator().manual_seed(0), train=True).loss
    loss.backward()  # real values and real gradients: nothing of the fake world is left in megatron or torch
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
