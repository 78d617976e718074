"""The DeepSpeed engine and one optimizer step of training.

`build_engine` wraps a model in DeepSpeed with torch AdamW as the client optimizer (fused on GPU; the
DeepSpeed CPU ops JIT-compile for 70-90 s on first use, torch's do not), the warm-up LR schedule, the
derived DeepSpeed config and the megatron mpu adapter. `Stepper.step` runs one optimizer step:

* PP = 1: `engine.backward` / `engine.step` per micro-batch; DeepSpeed accumulates and steps at the
  boundary (ZeRO 0-3).
* PP > 1: megatron's pipeline schedule drives the micro-batches through `engine.module`, then a
  zero-valued `engine.backward` runs DeepSpeed's ZeRO-1 reduction epilogue and `engine.step` updates
  (the "schedmod" recipe of shared/reference/cpu_distributed.md section E).

Noise and dropout are drawn from generators seeded by (seed, global index of the micro-batch's first
sample), so the losses do not depend on how the global batch is split over ranks (invariant 6).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from megabd3.errors import UserError
from megabd3.training.lr import build_lr_scheduler
from megabd3.training.rng import micro_batch_seed


def build_optimizer(params: Sequence[torch.nn.Parameter], optim_cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (fused kernels on GPU, the foreach CPU path otherwise)."""
    kwargs: dict[str, Any] = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                  weight_decay=optim_cfg.weight_decay)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW([p for p in params if p.requires_grad], **kwargs)


def build_engine(model: torch.nn.Module, cfg: Any, ds_config: dict, device: torch.device, mpu: Any = None,
                 total_steps: int | None = None):  # type: ignore[no-untyped-def]
    """deepspeed.initialize with our optimizer, LR schedule and config; returns the engine."""
    import deepspeed

    ds_config = dict(ds_config)
    # A client optimizer under ZeRO needs this flag; torch AdamW is tested equivalent (reference doc D).
    ds_config.setdefault("zero_allow_untested_optimizer", True)
    optimizer = build_optimizer(list(model.parameters()), cfg.optim, device)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps or cfg.training.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu)
    return engine


def inner_optimizer(engine_or_opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (engine -> ZeRO optimizer -> torch AdamW)."""
    obj = engine_or_opt
    for _ in range(4):
        if isinstance(obj, torch.optim.Optimizer):
            return obj
        obj = getattr(obj, "optimizer", None)
    raise TypeError(f"no torch optimizer found under {type(engine_or_opt).__name__}")


@contextlib.contextmanager
def skip_optimizer_step(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block `optimizer.step()` does nothing: no weight, moment or step-count update.

    Used for `training.nan_policy=skip`: DeepSpeed's `engine.step()` still runs (its micro-step and
    boundary bookkeeping, gradient zeroing, ZeRO partition copies must stay in sync across ranks), but
    the update itself is suppressed. The instance attribute is swapped because the LR scheduler has
    already wrapped `optimizer.step` per instance.
    """
    missing = object()
    previous = optimizer.__dict__.get("step", missing)
    optimizer.step = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        if previous is missing:
            del optimizer.step
        else:
            optimizer.step = previous  # type: ignore[method-assign]


FAULT_ENV = "MEGABD3_TEST_NAN_STEPS"


def fault_injection_steps() -> frozenset[int]:
    """TEST-ONLY fault injection: `MEGABD3_TEST_NAN_STEPS=2,5` makes the training loss NaN at those
    (1-based) optimizer steps, so the nan_policy paths can be tested deterministically. Never set it in
    a real run; it is read once when the Stepper is built and is empty when unset."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        return frozenset(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{FAULT_ENV}={raw!r} must be comma-separated step numbers (test-only variable; unset it)") from None


@dataclass
class StepStats:
    """Reduced over all ranks: means over the step's micro-batches and data-parallel ranks."""

    loss: float
    nelbo: float | None
    grad_norm: float
    lr: float
    finite: bool
    skipped: bool = False


def _grad_norm(engine) -> float:  # type: ignore[no-untyped-def]
    """Pre-clip global gradient norm DeepSpeed computed in the last step (ZeRO >= 1)."""
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if torch.is_tensor(g) else g)


def reduced_grad_norm(module: torch.nn.Module, device: torch.device | None = None) -> float:
    """Global norm of the (already data-parallel averaged) `.grad`s, tensor/pipeline-parallel aware.

    Used for ZeRO-0, where DeepSpeed does not record the norm. Tensor-parallel shards are summed over
    the model-parallel group; replicated parameters are counted on tensor-parallel rank 0 only.
    The sum stays on `device` (the communication device; default: where the gradients live): on GPU the
    model-parallel group reduces over NCCL (CPU tensors would need a gloo side, or fail on an NCCL-only
    group), and one read at the end replaces a host sync per parameter.
    """
    tp_rank, mp_group = 0, None
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            tp_rank, mp_group = ps.get_tensor_model_parallel_rank(), ps.get_model_parallel_group()
    except Exception:  # noqa: BLE001 - plain torch model without megatron
        pass
    if device is None:
        device = next((p.grad.device for p in module.parameters() if p.grad is not None), torch.device("cpu"))
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    for p in module.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.detach().double().pow(2).sum().to(device)
    if mp_group is not None and dist.get_world_size(mp_group) > 1:
        dist.all_reduce(sq, group=mp_group)
    return float(sq.sqrt().item())


class Stepper:
    """Runs optimizer steps of an objective on a DeepSpeed engine.

    objective(model_fn, x0, generator, train=True, attention_mask=...) -> ObjectiveOutput (see
    docs/interfaces.md). `pipeline` (PP > 1) is
    `pipeline(engine, objective, micro_batches, make_generator, micro_batch_size) -> list[outputs]` that
    runs the megatron schedule forward+backward (megabd3.training.pipeline_step.run_pipeline); None for
    PP = 1. With a pipeline, `grad_accum` is the number of micro-batches megatron schedules per step
    (DeepSpeed's own accumulation is 1).
    """

    def __init__(self, engine, objective: Any, *, seed: int, micro_batch_size: int, grad_accum: int,  # type: ignore[no-untyped-def]
                 dp_rank: int, dp_size: int, device: torch.device, nan_policy: str = "stop",
                 reports_loss: bool = True, pipeline: Callable | None = None) -> None:
        self.engine, self.objective = engine, objective
        self.seed, self.mb, self.ga = seed, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device
        self.nan_policy = nan_policy
        self.reports_loss = reports_loss  # False on ranks whose loss would double count (TP>0 / non-last PP)
        self.pipeline = pipeline
        self.fault_steps = fault_injection_steps()

    def model_fn(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    def first_sample(self, consumed_samples: int, micro_index: int) -> int:
        """Global index of the first sample of micro-batch `micro_index` of this rank in this step."""
        return consumed_samples + (micro_index * self.dp_size + self.dp_rank) * self.mb

    def generator(self, first_sample: int) -> torch.Generator:
        """Seeds the noise generator and torch's global RNG (dropout) for one micro-batch."""
        torch.manual_seed(micro_batch_seed(self.seed, first_sample, "dropout"))
        if self.device.type == "cuda":
            torch.cuda.manual_seed(micro_batch_seed(self.seed, first_sample, "dropout"))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(micro_batch_seed(self.seed, first_sample, "noise"))
        return gen

    def _objective(self, batch: dict[str, torch.Tensor], gen: torch.Generator, step: int):  # type: ignore[no-untyped-def]
        x0 = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch.get("attention_mask")
        mask = mask.to(self.device, non_blocking=True) if mask is not None else None
        out = self.objective(self.model_fn, x0, gen, train=True, attention_mask=mask)
        if step + 1 in self.fault_steps:  # test-only fault injection, see fault_injection_steps()
            out.loss = out.loss * float("nan")
        return out

    def _all_finite(self, value: torch.Tensor) -> bool:
        """Whether `value` is finite on every rank; the flag is built on the communication device (NCCL
        takes no CPU tensors) and read once, after the reduction."""
        flag = torch.logical_not(torch.isfinite(value).all()).to(device=self.device, dtype=torch.float32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(flag)  # any rank non-finite -> every rank knows, so collectives stay matched
        return flag.item() == 0.0

    def _step_sums(self, out: Any) -> torch.Tensor:
        """(loss, nelbo_sum, token_count, 1) of one micro-batch in float64 on the communication device,
        without a host sync; the same values as float() of each (float32/int -> float64 is exact)."""
        vals = [out.loss, out.nelbo_sum, out.token_count, 1.0]
        return torch.stack([v.detach().to(device=self.device, dtype=torch.float64).reshape(()) if torch.is_tensor(v)
                            else torch.tensor(float(v), dtype=torch.float64, device=self.device) for v in vals])

    def _zero_backward(self) -> None:
        """A zero-valued backward touching every parameter: keeps DeepSpeed's hooks/epilogue in step."""
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        zero = sum(p.reshape(-1)[:1].sum() * 0.0 for p in params)
        self.engine.backward(zero, scale_wrt_gas=False)

    def step(self, micro_batches: Iterator[dict[str, torch.Tensor]], consumed_samples: int, step: int) -> StepStats:
        """One optimizer step over `grad_accum` micro-batches drawn from `micro_batches`."""
        self.engine.train()
        # loss, nelbo_sum, token_count, n_micro: accumulated on the communication device, read once per step
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        skipped = False
        if self.pipeline is not None:
            batches = [next(micro_batches) for _ in range(self.ga)]
            first = [self.first_sample(consumed_samples, i) for i in range(self.ga)]
            outs = self.pipeline(self.engine, self.objective, batches, lambda i: self.generator(first[i]), self.mb)
            for out in outs:
                if out is not None and self.reports_loss:
                    sums += self._step_sums(out)
            self._zero_backward()
        else:
            for i in range(self.ga):
                batch = next(micro_batches)
                out = self._objective(batch, self.generator(self.first_sample(consumed_samples, i)), step)
                loss = out.loss
                # nan_policy=stop needs no per-micro-batch check (a host sync + all-reduce each): a
                # non-finite loss makes the step's reduced sums non-finite, caught below before
                # engine.step(), and the run stops. skip must know now, to keep NaN out of the grads.
                if self.nan_policy == "skip" and not self._all_finite(loss.detach()):
                    # this micro-batch contributes no gradient and the whole optimizer step is
                    # suppressed below; the remaining micro-batches still run so ranks stay in step
                    self._zero_backward()
                    skipped = True
                else:
                    self.engine.backward(loss)
                    if self.reports_loss:
                        sums += self._step_sums(out)
                if i < self.ga - 1:
                    self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        if dist.is_initialized():
            dist.all_reduce(sums)
        s_loss, s_nelbo, s_tokens, s_micro = sums.tolist()  # the step's one host read of the sums
        loss = s_loss / s_micro if s_micro > 0 else float("nan")
        nelbo = s_nelbo / s_tokens if s_tokens > 0 else None
        if self.pipeline is None:
            if self.nan_policy == "stop" and not math.isfinite(loss):  # skip was checked per micro-batch
                return StepStats(loss, nelbo, float("nan"), self._lr(), finite=False)
        elif not math.isfinite(loss):
            if self.nan_policy == "stop":
                return StepStats(loss, nelbo, float("nan"), self._lr(), finite=False)
            raise UserError(f"non-finite loss at step {step} with pipeline parallelism: training.nan_policy=skip "
                            f"is not supported with pipeline_parallel > 1; use nan_policy=stop")
        lr = self._lr()  # the LR this step is applied with (before the scheduler advances)
        zero0_norm = reduced_grad_norm(self.engine.module, self.device) if self.engine.zero_optimization_stage() == 0 else None
        guard = skip_optimizer_step(inner_optimizer(self.engine)) if skipped else contextlib.nullcontext()
        with guard:
            self.engine.step()
        norm = zero0_norm if zero0_norm is not None else _grad_norm(self.engine)
        return StepStats(loss, nelbo, norm, lr, finite=True, skipped=skipped)

    def _lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"]) if hasattr(self.engine.optimizer, "param_groups") \
            else float(self.engine.get_lr()[0])
