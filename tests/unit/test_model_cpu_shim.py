"""megabd3.parallel.cpu: the CPU RNG tracker, the device-rewrite mode and the patched megatron spots."""
from __future__ import annotations

import pytest
import torch

from megabd3.parallel import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op with CUDA")


def test_tracker_fork_uses_named_stream_and_restores_default() -> None:
    tr = cpu.CPURNGStatesTracker()
    tr.add("mp", 123)
    torch.manual_seed(7)
    expected_default = torch.rand(3)
    torch.manual_seed(7)
    with tr.fork("mp"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected_default)  # default stream untouched by the fork
    torch.manual_seed(123)
    assert torch.equal(inside, torch.rand(3))  # the fork drew from the named seed
    with tr.fork("mp"):
        second = torch.rand(3)
    assert not torch.equal(second, inside)  # the named stream advanced
    with pytest.raises(Exception):
        tr.add("other", 123)  # duplicate seed


def test_device_mode_rewrites_cuda_literals() -> None:
    with cpu.CPUDeviceMode():
        t = torch.zeros([], device="cuda")
        u = torch.ones(2, device=torch.device("cuda"))
    assert t.device.type == "cpu" and u.device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros([], device="cuda")  # only inside the mode


def test_apply_patches_megatron() -> None:
    assert cpu.apply() is True and cpu.is_applied()
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()  # no-op instead of an error
    assert tensor_parallel.model_parallel_cuda_manual_seed is cpu.cpu_model_parallel_seed
    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert isinstance(mrandom.get_cuda_rng_tracker(), cpu.CPURNGStatesTracker)
