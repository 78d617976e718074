"""The DeepSpeed config dict, derived from the megabd3 config.

The batch math, ZeRO stage, precision and clipping come from the main config so there is one source
of truth; the ``deepspeed`` block of the config is merged on top for everything else (bucket sizes,
overlap_comm, offload, ...). A pass-through value that contradicts a derived one is a problem, not a
silent override: a run whose DeepSpeed batch differs from the sampler's batch trains on the wrong data.
"""
from __future__ import annotations

from typing import Any, Optional

from megabd3.config.derived import batch_plan, batch_plan_problems, resolve_precision
from megabd3.config.errors import Problem, raise_if
from megabd3.config.merge import deep_merge
from megabd3.config.schema import Config

# DeepSpeed prints every `steps_per_print` steps; megabd3 does its own logging.
STEPS_PER_PRINT = 10**9

# Pass-through keys megabd3 owns elsewhere: the optimizer and LR schedule are built from `optim`
# (torch AdamW as a client optimizer) and fp16 loss scaling is not supported.
FORBIDDEN = {
    "optimizer": "megabd3 builds AdamW from optim.*; remove deepspeed.optimizer",
    "scheduler": "megabd3 builds the LR schedule from optim.*; remove deepspeed.scheduler",
    "amp": "apex AMP is not supported; use parallel.precision",
}

# Which config keys each derived DeepSpeed value comes from (for the conflict message).
_DERIVED_FROM = {
    "train_batch_size": "training.global_batch_size (micro x accumulation x dp)",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation / global_batch_size",
    "zero_optimization.stage": "parallel.zero_stage",
    "bf16.enabled": "parallel.precision",
    "fp16.enabled": "parallel.precision (fp16 is not supported)",
    "gradient_clipping": "optim.grad_clip",
}
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _derived(cfg: Config, dp_size: Optional[int], cuda: Optional[bool]) -> dict[str, Any]:
    """The derived values; the batch keys only when ``dp_size`` is known and consistent."""
    precision = resolve_precision(cfg, cuda)
    out: dict[str, Any] = {}
    if dp_size is not None and not batch_plan_problems(cfg, dp_size):
        plan = batch_plan(cfg, dp_size)
        out.update(
            train_batch_size=plan.global_batch_size,
            train_micro_batch_size_per_gpu=plan.micro_batch_size,
            gradient_accumulation_steps=plan.gradient_accumulation,
        )
    out.update(
        zero_optimization={"stage": cfg.parallel.zero_stage},
        bf16={"enabled": precision == "bf16"},
        fp16={"enabled": False},
        gradient_clipping=float(cfg.optim.grad_clip),
        wall_clock_breakdown=False,
        steps_per_print=STEPS_PER_PRINT,
    )
    return out


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, path + "."))
        else:
            out[path] = v
    return out



def deepspeed_problems(cfg: Config, dp_size: Optional[int] = None, *, cuda: Optional[bool] = None) -> list[Problem]:
    """Conflicts between the ``deepspeed`` pass-through block and the derived values.

    Batch keys are compared only when ``dp_size`` is known. Precision is resolved (and CUDA
    detected) only if the pass-through sets a derived key, so plain loads never import torch.
    """
    block = cfg.deepspeed
    problems: list[Problem] = []
    if not isinstance(block, dict):
        return [Problem(("deepspeed",), f"deepspeed must be an object, found {type(block).__name__}")]
    for key, why in FORBIDDEN.items():
        if key in block:
            problems.append(Problem((f"deepspeed.{key}",), f"deepspeed.{key}: {why}"))
    passthrough = _leaves({k: v for k, v in block.items() if k not in FORBIDDEN})
    # Batch keys can only be compared once the data-parallel size is known.
    contested = [k for k in passthrough if k in _DERIVED_FROM and (dp_size is not None or k not in _BATCH_KEYS)]
    if contested:
        derived = _leaves(_derived(cfg, dp_size, cuda))  # resolves precision=auto only here
        for key in contested:
            if key in derived and derived[key] != passthrough[key]:
                problems.append(Problem(
                    (f"deepspeed.{key}", _DERIVED_FROM[key].split(" ")[0]),
                    f"deepspeed.{key}={passthrough[key]!r} conflicts with the derived value {derived[key]!r} from "
                    f"{_DERIVED_FROM[key]}; remove it from the deepspeed block and set the megabd3 key instead"))
    for section in ("zero_optimization", "bf16", "fp16"):
        if section in block and not isinstance(block[section], dict):
            problems.append(Problem((f"deepspeed.{section}",),
                                    f"deepspeed.{section} must be an object, found {block[section]!r}"))
    return problems


def derive_deepspeed_config(cfg: Config, dp_size: int, *, cuda: Optional[bool] = None) -> dict[str, Any]:
    """The dict to pass to ``deepspeed.initialize(config=...)`` for ``dp_size`` data-parallel ranks.

    Derived: train_batch_size = micro x accumulation x dp, train_micro_batch_size_per_gpu,
    gradient_accumulation_steps, zero_optimization.stage, bf16 (precision; auto = bf16 iff CUDA),
    gradient_clipping, wall_clock_breakdown=False, a large steps_per_print. Then the ``deepspeed``
    block is merged on top. Raises ConfigError listing every batch problem and every conflict.
    """
    problems: list[Any] = list(batch_plan_problems(cfg, dp_size))
    problems += deepspeed_problems(cfg, dp_size, cuda=cuda)
    raise_if(problems, "the DeepSpeed configuration")
    return deep_merge(_derived(cfg, dp_size, cuda), cfg.deepspeed)
