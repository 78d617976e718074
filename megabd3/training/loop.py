"""The training loop: steps, logging, periodic evaluation with EMA weights, checkpoints, signals, NaN.

`Trainer` is layout-agnostic and takes its collaborators ready-made (engine, stepper, EMA, a loader
factory, an evaluator), so the same loop runs the real BD3-LM and the tiny models of the tests.
`megabd3.training.run.run_training` builds the real collaborators from a config.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from megabd3.errors import UserError
from megabd3.training import checkpoint as ckpt
from megabd3.training.engine import Stepper
from megabd3.training.logging import RunLogger, peak_flops_per_device, peak_memory_gib, plot_curves
from megabd3.training.rng import capture_rng_state, restore_rng_state
from megabd3.training.signals import StopRequest


@dataclass
class TrainerParts:
    """Everything the loop drives. `make_loader(consumed_samples)` yields this rank's micro-batches
    from that global position; `evaluate(step)` returns metrics (with "nelbo") or None."""

    engine: Any
    stepper: Stepper
    ema: Any
    make_loader: Callable[[int], Iterator[dict[str, torch.Tensor]]]
    evaluate: Callable[[int], dict[str, float] | None] | None
    write_config: Callable[[Path], None]
    config_dict: dict
    layout: dict
    tokens_per_sample: int
    flops_per_sample: float = 0.0
    after_step: Callable[[int, Any], None] | None = None  # e.g. bimodal schedule progress
    on_eval: Callable[[dict], None] | None = None  # e.g. clip search updates the training interval
    module: torch.nn.Module | None = None


@dataclass
class LoopResult:
    step: int
    consumed_samples: int
    last_eval: dict | None
    stopped_by: str | None
    losses: list[float] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Any, parts: TrainerParts, state: ckpt.TrainState, *, rank: int, world_size: int,
                 dp_size: int, last_checkpoint: Path | None = None) -> None:
        self.cfg, self.p, self.state = cfg, parts, state
        self.rank, self.world_size, self.dp_size = rank, world_size, dp_size
        self.global_batch = cfg.training.micro_batch_size * parts.stepper.ga * dp_size
        self.last_checkpoint = last_checkpoint
        self.run_dir = Path(cfg.training.run_dir)

    # ------------------------------------------------------------------------------------ helpers
    def save(self) -> Path:
        rank_state = {"rng": capture_rng_state(), "step": self.state.step}
        path = ckpt.save_checkpoint(self.p.engine, self.p.ema, self.state, rank_state, self.run_dir,
                                    self.cfg.checkpoint.keep_last_n, self.p.write_config, module=self.p.module,
                                    config_dict=self.p.config_dict)
        self.last_checkpoint = path
        return path

    def _agree_stop(self, stop: StopRequest) -> str | None:
        """Any rank signalled -> every rank stops at this step boundary. The flag lives on the stepper's
        (communication) device: an NCCL group takes no CPU tensors."""
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.p.stepper.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (stop.requested or "signal") if flag.item() > 0 else None

    def _evaluate(self, logger: RunLogger) -> dict | None:
        if self.p.evaluate is None:
            return None
        t0 = time.time()
        metrics = self.p.evaluate(self.state.step)
        if metrics is None:
            return None
        metrics = dict(metrics)
        if self.p.on_eval is not None:
            self.p.on_eval(metrics)
        # the clip search may have moved the training interval: checkpoints must carry the new one
        self.state.clip_interval = tuple(metrics.get("clip_interval", self.state.clip_interval))
        metrics.update(step=self.state.step, seconds=time.time() - t0)
        logger.record("eval", {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list, tuple))})
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
        logger.write(f"eval step {self.state.step} | {shown}")
        return metrics

    # --------------------------------------------------------------------------------------- loop
    def train(self, logger: RunLogger, rng_to_restore: dict | None = None) -> LoopResult:
        cfg = self.cfg
        total = cfg.training.steps
        stop = StopRequest(enabled=cfg.checkpoint.save_on_signal)
        loader = self.p.make_loader(self.state.consumed_samples)
        if rng_to_restore is not None:  # last thing before the first step: nothing may draw in between
            restore_rng_state(rng_to_restore)
        peak = peak_flops_per_device()
        result = LoopResult(self.state.step, self.state.consumed_samples, None, None)
        t_last, steps_since = time.time(), 0
        try:
            while self.state.step < total:
                stats = self.p.stepper.step(loader, self.state.consumed_samples, self.state.step)
                if not stats.finite:
                    where = str(self.last_checkpoint) if self.last_checkpoint else "none (no checkpoint saved yet)"
                    raise UserError(
                        f"loss became non-finite ({stats.loss}) at step {self.state.step + 1}; last good checkpoint: "
                        f"{where}; lower optim.lr, raise optim.warmup_steps or set training.nan_policy=skip")
                self.state.step += 1
                self.state.consumed_samples += self.global_batch
                steps_since += 1
                if stats.skipped:  # nan_policy=skip: the weights did not move, so neither does the EMA
                    self.state.skipped_steps += 1
                    logger.write(f"warning: non-finite loss at step {self.state.step}: optimizer step skipped "
                                 f"({self.state.skipped_steps} skipped so far)")
                elif self.p.ema is not None:
                    self.p.ema.update()
                if self.p.after_step is not None:
                    self.p.after_step(self.state.step, stats)
                result.losses.append(stats.loss)
                log_now = self.state.step % max(1, cfg.training.log_interval) == 0 or self.state.step == total
                if logger.enabled:
                    dt = max(time.time() - t_last, 1e-9)
                    tok_s = steps_since * self.global_batch * self.p.tokens_per_sample / dt
                    flops = steps_since * self.global_batch * self.p.flops_per_sample / dt / self.world_size
                    rec = dict(step=self.state.step, loss=stats.loss, nelbo=stats.nelbo, grad_norm=stats.grad_norm,
                               lr=stats.lr, tokens_per_s=tok_s, tokens_per_s_per_rank=tok_s / self.world_size,
                               flops_per_s_per_rank=flops if self.p.flops_per_sample else None,
                               mfu=(flops / peak) if (peak and self.p.flops_per_sample) else None,
                               peak_mem_gib=peak_memory_gib(),
                               consumed_tokens=self.state.consumed_samples * self.p.tokens_per_sample,
                               consumed_samples=self.state.consumed_samples, skipped=stats.skipped,
                               skipped_steps=self.state.skipped_steps)
                    logger.train_step(rec, print_line=log_now or stats.skipped)
                if log_now:
                    t_last, steps_since = time.time(), 0
                ei = cfg.training.eval_interval
                if ei > 0 and self.state.step % ei == 0 and self.state.step < total:
                    result.last_eval = self._evaluate(logger)
                si = cfg.checkpoint.save_interval
                if si > 0 and self.state.step % si == 0 and self.state.step < total:
                    self.save()
                signalled = self._agree_stop(stop)
                if signalled:
                    path = self.save()
                    logger.write(f"received {signalled}: saved {path} at step {self.state.step}; exiting 0")
                    result.stopped_by = signalled
                    break
            else:
                result.last_eval = self._evaluate(logger)
                self.save()
        finally:
            stop.uninstall()
        result.step, result.consumed_samples = self.state.step, self.state.consumed_samples
        if logger.enabled and cfg.logging.plot:
            plot_curves(self.run_dir)
        return result
