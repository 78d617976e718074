"""Per-rank bytes of parameters, gradients, optimizer state, EMA and ZeRO buffers, as DeepSpeed allocates them.

Input: the trainable parameters one rank holds (their element counts, in ``named_parameters`` order,
already tensor/pipeline-sharded: the dry run takes them from the real model built for that rank), the
ZeRO stage and settings of the derived DeepSpeed config, the data-parallel size and the precision. The
rules follow DeepSpeed 0.19's allocations (torch AdamW as the client optimizer, as megabd3 builds it):

ZeRO-0, fp32  the torch optimizer is used unwrapped: weights, ``p.grad`` and AdamW's exp_avg/exp_avg_sq
              (+ a 4-byte ``step`` per tensor), all full size.
ZeRO-0, bf16  ``FP16_UnfusedOptimizer``: bf16 weights and grads, an fp32 master copy of every weight.
ZeRO-1/2      ``DeepSpeedZeroOptimizer``: the weights are flattened into one buffer padded to a multiple
              of 2 x dp elements (``nccl_start_alignment_factor``); each rank keeps an fp32 master copy of
              its 1/dp partition (a separate clone, also under fp32) and AdamW moments for it. Both stages
              reduce gradients in backward hooks and free those of parameters outside the rank's
              partition; each rank keeps the whole gradients of the parameters its partition touches (the
              two straddling the partition's ends included: measured by benchmarks/bench_memory.py).
              ``contiguous_gradients`` allocates ``reduce_bucket_size`` elements of reduction buffer
              (twice with ``overlap_comm``).
ZeRO-3        each parameter is split into dp partitions of ceil(numel / dp) elements (DeepSpeed pads the
              last); parameters with numel <= ``stage3_param_persistence_threshold`` (while the running
              total stays under ``stage3_model_persistence_threshold``) also stay whole on every rank.
              Grads live in one flat partition buffer; the fp32 master partition is a separate copy also
              under fp32 (DeepSpeed 0.19 would alias it only if ``tensor.device == accelerator
              .current_device_name()``, a torch.device compared with a str, which is never equal). ``contiguous_gradients`` adds a ``reduce_bucket_size``
              reduction bucket; forward/backward gather up to ``stage3_prefetch_bucket_size`` elements
              ahead of the layer that runs.

The EMA (megabd3.training.ema) keeps an fp32 shadow of what the rank owns: the ZeRO-3 partition; under
bf16 with ZeRO-1/2 the rank's fragment of the fp32 master partition; otherwise the full local tensor. Buffers and the activation peak are counted as if they coexisted with
everything else, so the total is an upper bound. The step-time fp32 gradient copies of bf16 runs (freed
before the next forward, when activations are gone) are reported as notes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

ADAM_STEP_BYTES = 4  # torch AdamW keeps `step` as a float32 scalar tensor per parameter tensor
NCCL_START_ALIGNMENT = 2  # DeepSpeedZeroOptimizer.nccl_start_alignment_factor
ALLREDUCE_CHUNK = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE (ZeRO-0 gradient allreduce)

# DeepSpeed 0.19's DeepSpeedZeroConfig defaults (tests/unit/test_dryrun_memory.py checks them against
# DeepSpeed itself, so a DeepSpeed upgrade that changes one fails a test instead of the estimate).
ZERO_DEFAULTS: dict[str, Any] = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "contiguous_gradients": True,
    "overlap_comm": None,  # None = True for stage 3, False otherwise (DeepSpeed's validator)
    "stage3_param_persistence_threshold": 100_000,
    "stage3_model_persistence_threshold": 2**63 - 1,
    "stage3_prefetch_bucket_size": 50_000_000,
    "sub_group_size": 1_000_000_000,
    "parameter_alignment": False,
}


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO knobs that change memory, resolved from a DeepSpeed config dict."""

    stage: int
    reduce_bucket_size: int = ZERO_DEFAULTS["reduce_bucket_size"]
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    param_persistence_threshold: int = ZERO_DEFAULTS["stage3_param_persistence_threshold"]
    model_persistence_threshold: int = ZERO_DEFAULTS["stage3_model_persistence_threshold"]
    prefetch_bucket_size: int = ZERO_DEFAULTS["stage3_prefetch_bucket_size"]
    sub_group_size: int = ZERO_DEFAULTS["sub_group_size"]
    parameter_alignment: bool = False

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any]) -> "ZeroSettings":
        z = dict(ds_config.get("zero_optimization") or {})
        stage = int(z.get("stage", 0))

        def get(key: str, alias: str | None = None) -> Any:
            for k in (key, alias):
                if k is not None and k in z:
                    return z[k]
            return ZERO_DEFAULTS[key if key in ZERO_DEFAULTS else alias]  # type: ignore[index]

        overlap = z.get("overlap_comm")
        return cls(
            stage=stage,
            reduce_bucket_size=int(get("reduce_bucket_size")),
            contiguous_gradients=bool(get("contiguous_gradients")),
            overlap_comm=bool(stage == 3 if overlap is None else overlap),
            param_persistence_threshold=int(get("stage3_param_persistence_threshold", "param_persistence_threshold")),
            model_persistence_threshold=int(get("stage3_model_persistence_threshold", "model_persistence_threshold")),
            prefetch_bucket_size=int(get("stage3_prefetch_bucket_size", "prefetch_bucket_size")),
            sub_group_size=int(get("sub_group_size")),
            parameter_alignment=bool(get("parameter_alignment")),
        )


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the module's weights, its gradients (``data_types.grad_accum_dtype``)."""

    bf16: bool
    grad_fp32: bool = False

    @property
    def weight_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def grad_bytes(self) -> int:
        return 4 if self.grad_fp32 else self.weight_bytes

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any]) -> "Precision":
        bf16 = bool((ds_config.get("bf16") or {}).get("enabled", False))
        acc = str((ds_config.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
        return cls(bf16=bf16, grad_fp32=bf16 and acc in ("fp32", "float32", "float"))


@dataclass
class StateBytes:
    """Bytes one rank holds outside the activations."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    ema: int = 0
    buffers: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> int:
        """params + grads + optimizer: what benchmarks/bench_memory.py measures."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.ema + self.buffers


def zero3_partition(numel: int, dp: int) -> int:
    """Elements of one ZeRO-3 partition of a parameter (DeepSpeed pads numel up to a multiple of dp)."""
    return -(-numel // dp)


def zero3_persistent(numels: Sequence[int], settings: ZeroSettings) -> list[bool]:
    """Which parameters ZeRO-3 keeps whole (DeepSpeedZeRoOffload.mark_persistent_parameters, in order)."""
    out, total = [], 0
    for n in numels:
        keep = n <= settings.param_persistence_threshold and n + total <= settings.model_persistence_threshold
        total += n if keep else 0
        out.append(keep)
    return out


def zero12_flat_numel(numels: Sequence[int], dp: int, parameter_alignment: bool, weight_bytes: int) -> int:
    """Elements of ZeRO-1/2's flat weight buffer: per-parameter alignment padding (off by default), then
    rounded up to a multiple of nccl_start_alignment_factor x dp so it splits into equal partitions."""
    param_alignment = 16 // math.gcd(16, weight_bytes) if parameter_alignment else 1
    offset = 0
    for i, n in enumerate(numels):
        offset += n
        if i < len(numels) - 1:
            offset += (-offset) % param_alignment
    align = NCCL_START_ALIGNMENT * dp
    return -(-offset // align) * align


def zero12_grad_numel(numels: Sequence[int], dp: int, flat: int) -> int:
    """Most gradient elements a ZeRO-1/2 rank keeps: the whole gradients of the parameters that intersect
    its 1/dp slice of the flat buffer (the largest over ranks)."""
    part = flat // dp
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    best = 0
    for r in range(dp):
        lo, hi = r * part, (r + 1) * part
        best = max(best, sum(n for n, a in zip(numels, starts) if n and a < hi and a + n > lo))
    return best


def zero_state_bytes(numels: Sequence[int], *, dp: int, zero: ZeroSettings, precision: Precision,
                     ema: bool, largest_gather: int = 0) -> StateBytes:
    """Bytes of weights, grads, optimizer state, EMA and ZeRO buffers on one rank (module docstring).

    ``numels``: trainable parameters of this rank (TP/PP-local) in ``named_parameters`` order;
    ``largest_gather``: elements ZeRO-3 must gather at once for the largest module (a transformer layer).
    """
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1, found {dp}")
    w, g = precision.weight_bytes, precision.grad_bytes
    psi, n_tensors = sum(numels), len(numels)
    out = StateBytes()
    stage = zero.stage
    if stage == 0:
        out.params, out.grads = psi * w, psi * g
        out.optimizer = 8 * psi + ADAM_STEP_BYTES * n_tensors
        if precision.bf16:
            out.optimizer += 4 * psi  # FP16_UnfusedOptimizer's fp32 copy of every weight
            out.notes.append(f"optimizer step: +{human_bytes(4 * psi)} transient fp32 gradient copies")
        if dp > 1:  # DeepSpeed's allreduce fallback flattens gradients in chunks of up to 5e8 elements
            out.buffers = min(psi, ALLREDUCE_CHUNK) * g
        out.ema = 4 * psi if ema else 0
        return out
    if stage in (1, 2):
        flat = zero12_flat_numel(numels, dp, zero.parameter_alignment, w)
        part = flat // dp
        out.params = flat * w
        # ZeRO-1 + bf16 + fp32 grad accumulation runs DeepSpeed's BF16_Optimizer (full fp32 grads)
        bf16_optimizer = stage == 1 and precision.bf16 and precision.grad_fp32
        if bf16_optimizer:
            out.grads = 4 * flat
        else:
            out.grads = zero12_grad_numel(numels, dp, flat) * g
        out.optimizer = 4 * part + 8 * part + ADAM_STEP_BYTES  # fp32 master partition + AdamW moments
        if zero.contiguous_gradients and not bf16_optimizer:
            # ZeRO-1 stages the reduction in the accumulation dtype, ZeRO-2 in the weight dtype
            out.buffers = zero.reduce_bucket_size * (g if stage == 1 else w) * (2 if zero.overlap_comm else 1)
        if precision.bf16 and not bf16_optimizer:
            out.notes.append(f"optimizer step: +{human_bytes(4 * part)} transient fp32 gradient partition")
        # bf16: the EMA shadows the rank's fp32 fragment of the flat master partition; fp32: the weights
        out.ema = (4 * part if precision.bf16 else 4 * psi) if ema else 0
        return out
    if stage == 3:
        parts = [zero3_partition(n, dp) for n in numels]
        persist = zero3_persistent(numels, zero)
        psum = sum(parts)
        out.params = psum * w + sum(n for n, keep in zip(numels, persist) if keep) * w
        out.grads = psum * g
        n_groups = max(1, -(-psum // max(1, zero.sub_group_size)))
        # fp32 master partition: a clone even under fp32 (module docstring; measured by bench_memory.py)
        out.optimizer = 4 * psum + 8 * psum + ADAM_STEP_BYTES * n_groups
        gathered = sum(n for n, keep in zip(numels, persist) if not keep)
        live = min(gathered, zero.prefetch_bucket_size + largest_gather)
        out.buffers = live * w + (zero.reduce_bucket_size * w if zero.contiguous_gradients else 0)
        if precision.bf16 and not precision.grad_fp32:  # the step casts the bf16 partition to fp32 for AdamW
            out.notes.append(f"optimizer step: +{human_bytes(4 * psum)} transient fp32 gradient partition")
        out.ema = 4 * psum if ema else 0
        return out
    raise ValueError(f"ZeRO stage must be 0-3, found {stage}")


def human_bytes(n: float) -> str:
    """Three significant figures in the largest unit that keeps the number >= 1 (small states never read 0.00)."""
    for unit, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.3g} {name}"
    return f"{n:.0f} B"
