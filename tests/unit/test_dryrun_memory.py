"""ZeRO accounting of the dry run (megabd3.training.memory_plan) and the live-bytes tracer (memtrace):
pure arithmetic against hand-computed DeepSpeed allocations, and DeepSpeed's own defaults."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megabd3.training.memory_plan import (ALLREDUCE_CHUNK, ZERO_DEFAULTS, Precision, ZeroSettings, zero3_partition,
                                          zero3_persistent, zero12_flat_numel, zero_state_bytes)
from megabd3.training.memtrace import LiveBytes, activation_bytes, ActivationTrace, pipeline_in_flight

NUMELS = [10, 3, 7]  # 20 elements in 3 tensors
FP32, BF16 = Precision(bf16=False), Precision(bf16=True)


def test_defaults_are_deepspeeds() -> None:
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = DeepSpeedZeroConfig()
    assert ds.reduce_bucket_size == ZERO_DEFAULTS["reduce_bucket_size"]
    assert ds.contiguous_gradients == ZERO_DEFAULTS["contiguous_gradients"]
    assert ds.param_persistence_threshold == ZERO_DEFAULTS["stage3_param_persistence_threshold"]
    assert ds.model_persistence_threshold == ZERO_DEFAULTS["stage3_model_persistence_threshold"]
    assert ds.prefetch_bucket_size == ZERO_DEFAULTS["stage3_prefetch_bucket_size"]
    assert ds.sub_group_size == ZERO_DEFAULTS["sub_group_size"]
    assert ds.parameter_alignment == ZERO_DEFAULTS["parameter_alignment"]
    assert MEMORY_OPT_ALLREDUCE_SIZE == ALLREDUCE_CHUNK
    # ZeRO-3 aliases the fp32 master partition to fp32 weights only if a torch.device equals the accelerator's
    # device *name* (a str): never, so memory_plan counts the clone; a DeepSpeed that fixes this fails here
    import inspect

    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert "].device == self.device" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions)
    assert isinstance(get_accelerator().current_device_name(), str)
    for stage in range(4):  # DeepSpeed turns overlap_comm on by default for stage 3 only
        assert ZeroSettings.from_ds_config({"zero_optimization": {"stage": stage}}).overlap_comm == \
            DeepSpeedZeroConfig(stage=stage).overlap_comm


def test_settings_from_ds_config() -> None:
    z = ZeroSettings.from_ds_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 5,
                                                           "reduce_bucket_size": 100, "overlap_comm": False}})
    assert (z.stage, z.param_persistence_threshold, z.reduce_bucket_size, z.overlap_comm) == (3, 5, 100, False)
    assert Precision.from_ds_config({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}) == \
        Precision(bf16=True, grad_fp32=True)


def test_partition_helpers() -> None:
    from megabd3.training.memory_plan import zero12_grad_numel

    assert [zero12_grad_numel(NUMELS, 4, 24), zero12_grad_numel(NUMELS, 1, 20), zero12_grad_numel([8, 8], 2, 16)] \
        == [13, 20, 8]  # straddling params are kept whole; a param on a slice boundary is not shared
    assert [zero3_partition(n, 4) for n in NUMELS] == [3, 1, 2]  # ceil: DeepSpeed pads the last partition
    assert zero12_flat_numel(NUMELS, 4, False, 4) == 24  # 20 rounded up to 2 x dp = 8
    assert zero12_flat_numel(NUMELS, 4, True, 2) == 32  # params aligned to 8 bf16 elements: 10->16, +3->19->24, +7
    z = ZeroSettings(stage=3, param_persistence_threshold=4, model_persistence_threshold=9)
    assert zero3_persistent([4, 4, 4, 9], z) == [True, True, False, False]  # model threshold caps the sum


def test_zero0() -> None:
    s = zero_state_bytes(NUMELS, dp=4, zero=ZeroSettings(stage=0), precision=FP32, ema=True)
    assert (s.params, s.grads, s.optimizer, s.ema, s.buffers) == (80, 80, 8 * 20 + 4 * 3, 80, 80)
    s = zero_state_bytes(NUMELS, dp=1, zero=ZeroSettings(stage=0), precision=BF16, ema=False)
    # bf16 weights/grads; FP16_UnfusedOptimizer keeps an fp32 copy next to the AdamW moments
    assert (s.params, s.grads, s.optimizer, s.ema, s.buffers) == (40, 40, 12 * 20 + 12, 0, 0)


def test_zero1_and_2() -> None:
    z1 = ZeroSettings(stage=1, reduce_bucket_size=100)
    s = zero_state_bytes(NUMELS, dp=4, zero=z1, precision=FP32, ema=False)
    # flat 24 (6 per rank); rank 1's slice [6, 12) touches params [0, 10) and [10, 13): their whole grads
    # (13 elements, the most of any rank); fp32 master + moments of the slice
    assert (s.params, s.grads, s.optimizer, s.buffers) == (96, 13 * 4, 12 * 6 + 4, 400)
    s = zero_state_bytes(NUMELS, dp=4, zero=ZeroSettings(stage=2, reduce_bucket_size=100), precision=BF16, ema=True)
    assert (s.params, s.grads, s.optimizer, s.ema, s.buffers) == (48, 26, 76, 24, 200)  # bf16: EMA of the fragment
    s = zero_state_bytes(NUMELS, dp=4, zero=ZeroSettings(stage=2, reduce_bucket_size=100, overlap_comm=True),
                         precision=BF16, ema=False)
    assert s.buffers == 400  # double buffering with overlap_comm


def test_zero3() -> None:
    z = ZeroSettings(stage=3, reduce_bucket_size=100, prefetch_bucket_size=0)
    s = zero_state_bytes(NUMELS, dp=4, zero=z, precision=FP32, ema=True, largest_gather=10)
    # partitions 3+1+2 = 6; everything is below the persistence threshold, so it is also held whole;
    # DeepSpeed 0.19 clones the fp32 master partition even under fp32
    assert (s.params, s.grads, s.optimizer, s.ema) == (6 * 4 + 20 * 4, 24, 24 + 48 + 4, 24)
    assert s.buffers == 0 + 400  # nothing left to gather; the reduction bucket
    z = ZeroSettings(stage=3, reduce_bucket_size=100, prefetch_bucket_size=0, param_persistence_threshold=5)
    s = zero_state_bytes(NUMELS, dp=4, zero=z, precision=BF16, ema=False, largest_gather=10)
    assert (s.params, s.grads, s.optimizer) == (6 * 2 + 3 * 2, 12, 4 * 6 + 48 + 4)
    assert s.buffers == 10 * 2 + 200
    assert s.model_states == s.params + s.grads + s.optimizer
    # bf16: the step casts the grad partition to fp32 (6 elements x 4 bytes), like ZeRO-0/1/2
    assert [n for n in s.notes if "transient fp32 gradient partition" in n] == \
        ["optimizer step: +24 B transient fp32 gradient partition"]
    assert not zero_state_bytes(NUMELS, dp=4, zero=z, precision=FP32, ema=False).notes


def test_human_bytes() -> None:
    from megabd3.training.memory_plan import human_bytes

    assert [human_bytes(n) for n in (24, 3 * 2**20 // 2, 1234 * 2**20, 3 * 2**30)] == \
        ["24 B", "1.5 MiB", "1.21 GiB", "3 GiB"]


def test_live_bytes_counts_fake_storages_and_excludes_grads() -> None:
    mode = FakeTensorMode()
    with mode:
        w = torch.nn.Parameter(torch.empty(1000))
    tracker = LiveBytes()
    h = w.register_post_accumulate_grad_hook(lambda p: tracker.exclude(p.grad))
    with mode, tracker:
        a = w * 2  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = (b * b).sum()  # 4000 transient + 4 bytes
        assert tracker.live == 4000 + 4
        del a, b
        c.backward()  # the grad (4000 bytes) is excluded once accumulated
        assert w.grad is not None and w.grad.shape == (1000,)
    h.remove()
    assert tracker.peak >= 8000 and tracker.peak < 16000
    del c
    assert tracker.live <= 4000  # only storages kept alive by autograd remnants, never the grad


def test_pipeline_in_flight() -> None:
    assert [pipeline_in_flight(s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert pipeline_in_flight(0, 4, 2) == 2
    assert activation_bytes(ActivationTrace(peak=10, saved=3), 3) == 16


def test_tensor_parallel_trace_classes() -> None:
    from megabd3.training.dryrun import _tp_class

    # vocabulary 10 padded to 12 over 3 ranks (shards of 4), mask id 9: only the last rank pads and owns the mask
    assert [_tp_class(t, 4, 10, 9) for t in range(3)] == [(False, False), (False, False), (True, True)]
    assert [_tp_class(t, 5, 10, 2) for t in range(2)] == [(False, True), (False, False)]
