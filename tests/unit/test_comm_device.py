"""NCCL readiness on a CPU-only machine (issue 11, item 1).

* `init_distributed` on CUDA must create a default group that also carries CPU tensors
  ("cpu:gloo,cuda:nccl"), for one rank (HashStore) and for several; torch and megatron are mocked.
* The per-step collectives (`Stepper._all_finite`, the step sums, `reduced_grad_norm`,
  `Trainer._agree_stop`) must build their tensors on the communication device, never on the CPU by
  default: megatron's groups are NCCL-only on GPU. The device here is "meta" and a mocked all_reduce
  records where its tensor lives, then stops the call (nothing can be read back from meta tensors).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megabd3.config.schema import Config
from megabd3.parallel import init as pinit
from megabd3.training.engine import Stepper, reduced_grad_norm
from megabd3.training.loop import Trainer
from megabd3.training.signals import StopRequest

META = torch.device("meta")


# ---------------------------------------------------------------------------------- init_distributed
def _fake_cuda_world(monkeypatch: pytest.MonkeyPatch, world: int) -> dict:
    """CUDA 'available', torch.distributed and megatron's parallel_state mocked; returns the call log."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    calls: dict = {"set_device": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls["set_device"][-1])
    monkeypatch.setattr(pinit.cpu, "apply", lambda: pytest.fail("the CPU compatibility layer must not load on CUDA"))
    monkeypatch.setattr(dist, "is_initialized", lambda: "backend" in calls)

    def init_process_group(backend, **kwargs):  # noqa: ANN001, ANN003
        calls["backend"], calls["kwargs"] = backend, kwargs

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: int(calls["kwargs"]["rank"]))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: int(calls["kwargs"]["world_size"]))
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda **kw: calls.setdefault("mp", kw))
    monkeypatch.setattr(ps, "get_data_parallel_rank", lambda: int(calls["kwargs"]["rank"]))
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed: calls.setdefault("seed", seed))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    if world > 1:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29999")
    return calls


@pytest.mark.parametrize("world", [1, 2])
def test_init_distributed_on_cuda_asks_for_a_group_that_carries_cpu_tensors(monkeypatch, world):
    calls = _fake_cuda_world(monkeypatch, world)
    layout = pinit.init_distributed(Config())
    assert calls["backend"] == "cpu:gloo,cuda:nccl"
    if world == 1:  # the single-GPU path still creates a group (HashStore): it must be the mixed one too
        assert isinstance(calls["kwargs"]["store"], dist.HashStore)
    else:
        assert calls["kwargs"]["world_size"] == world and calls["set_device"] == [1]
    assert layout.device == torch.device("cuda", calls["set_device"][-1])
    assert layout.backend == "nccl" and layout.world_size == world


def test_forced_gloo_backend_is_left_alone(monkeypatch):
    calls = _fake_cuda_world(monkeypatch, 1)
    cfg = Config()
    cfg.parallel.backend = "gloo"
    pinit.init_distributed(cfg)
    assert calls["backend"] == "gloo"


# ----------------------------------------------------------------------------- per-step collectives
class _Stop(Exception):
    """Raised by the mocked all_reduce once it has recorded the tensor's device."""


@pytest.fixture
def reduce_log(monkeypatch):
    log: list[torch.device] = []

    def all_reduce(tensor, op=None, group=None):  # noqa: ANN001
        log.append(tensor.device)
        raise _Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return log


def _stepper(device: torch.device, engine=None, pipeline=None) -> Stepper:  # noqa: ANN001
    return Stepper(engine, objective=None, seed=1, micro_batch_size=1, grad_accum=2, dp_rank=0, dp_size=1,
                   device=device, pipeline=pipeline)


def test_all_finite_flag_is_on_the_comm_device(reduce_log):
    with pytest.raises(_Stop):
        _stepper(META)._all_finite(torch.zeros(3))  # a CPU value: the flag still goes to the comm device
    assert reduce_log == [META]


def test_step_sums_are_on_the_comm_device(reduce_log):
    module = torch.nn.Linear(2, 2)
    engine = SimpleNamespace(train=lambda: None, module=module, backward=lambda loss, **kw: None)
    out = SimpleNamespace(loss=torch.tensor(1.5), nelbo_sum=torch.tensor(3.0), token_count=torch.tensor(4), )
    with pytest.raises(_Stop):  # PP path: the sums are the step's first collective
        _stepper(META, engine, pipeline=lambda *a: [out, out]).step(iter([{}, {}]), 0, 0)
    assert reduce_log == [META]


def test_step_sums_match_float_conversion_bit_exactly():
    st = _stepper(torch.device("cpu"))
    out = SimpleNamespace(loss=torch.tensor(0.1, dtype=torch.float32), nelbo_sum=torch.tensor(7.3e5), token_count=torch.tensor(123))
    got = st._step_sums(out).tolist()
    assert got == [float(out.loss), float(out.nelbo_sum), float(out.token_count), 1.0]


def test_zero0_grad_norm_reduces_on_the_comm_device(reduce_log, monkeypatch):
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(ps, "get_model_parallel_group", lambda: "mp-group")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    module = torch.nn.Linear(2, 2, device=META)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(_Stop):
        reduced_grad_norm(module, META)
    assert reduce_log == [META]


def test_zero0_grad_norm_value_on_cpu():
    module = torch.nn.Linear(3, 2)
    for p in module.parameters():
        p.grad = torch.full_like(p, 2.0)
    assert reduced_grad_norm(module) == pytest.approx(2.0 * (3 * 2 + 2) ** 0.5)


def test_agree_stop_flag_is_on_the_comm_device(reduce_log):
    trainer = SimpleNamespace(p=SimpleNamespace(stepper=_stepper(META)))
    with pytest.raises(_Stop):
        Trainer._agree_stop(trainer, StopRequest(enabled=False))
    assert reduce_log == [META]
