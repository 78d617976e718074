"""A quiet console: drop the KNOWN third-party start-up noise, say once what it meant.

A plain training run printed ~30 warnings from megatron-core, torch and DeepSpeed, most of them the same
"Transformer Engine and Apex are not installed" fallback notice from different megatron modules, on every
rank. They hide the warnings that matter. `install()` (first thing in every launcher, before megatron or
DeepSpeed is imported) adds one `ignore` filter per known message, scoped to the category and to the
module that emits it, so a new or different warning -- ours or theirs -- still shows. `extras_line()`
is the one rank-0 start-up line that replaces the fallback notices.

Set MEGABD3_SHOW_WARNINGS=1 to see everything again.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from dataclasses import dataclass

SHOW_ENV = "MEGABD3_SHOW_WARNINGS"


@dataclass(frozen=True)
class Noise:
    """One known warning: `message` is matched (re.match, case-insensitive) against the start of the text,
    `module` against the module the warning is attributed to ("" = any)."""

    message: str
    category: type[Warning]
    module: str = ""
    why: str = ""


KNOWN_NOISE: tuple[Noise, ...] = (
    Noise(r"(Transformer Engine and Apex are|Apex is|Transformer Engine is) not installed", UserWarning, r"megatron",
          "megatron-core's import-time fallbacks; summarised once by extras_line()"),
    Noise(r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer",
          "TransformerConfig's cuda_graph_scope default; we never capture CUDA graphs"),
    Noise(r"(Warning: )?tp_group is None, using default tp group", DeprecationWarning, "",
          "megatron's own layers call their helpers without tp_group"),
    Noise(r"The following imports from `dynamic_context\.py` will be removed", DeprecationWarning, r"megatron",
          "megatron's inference package import shim"),
    Noise(r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|_reduce_scatter_base)` "
          r"is deprecated", FutureWarning, r"torch\.distributed",
          "DeepSpeed ZeRO's collectives (not ours); torch renamed them"),
)

# Only meaningless without CUDA: on a GPU with tensor parallelism it is real advice, so it stays visible.
CPU_ONLY_NOISE: tuple[Noise, ...] = (
    Noise(r"When using async grad allreduce it is recommended to set the environment variable "
          r"CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, r"megatron", "a CUDA stream setting"),
)

# DeepSpeed logs through its "DeepSpeed" logger, not the warnings module.
KNOWN_LOG_NOISE: tuple[str, ...] = (
    r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it",
)


class _DropKnownLogs(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.search(text) for p in self.patterns)


def enabled() -> bool:
    return os.environ.get(SHOW_ENV, "") in ("", "0")


def _add(noise: tuple[Noise, ...]) -> None:
    for n in noise:
        # filterwarnings drops an identical earlier entry before inserting, so repeated installs do not pile up
        warnings.filterwarnings("ignore", message=n.message, category=n.category, module=n.module)


def install() -> None:
    """Filter the known noise (idempotent). Call before megatron-core or DeepSpeed is imported: their
    fallback warnings fire at import time."""
    if not enabled():
        return
    _add(KNOWN_NOISE)
    logger = logging.getLogger("DeepSpeed")  # the same object DeepSpeed configures later
    if not any(isinstance(f, _DropKnownLogs) for f in logger.filters):
        logger.addFilter(_DropKnownLogs(KNOWN_LOG_NOISE))


def install_cpu_only() -> None:
    """The filters that are only noise when no GPU is present (call once CUDA is known to be absent)."""
    if enabled():
        _add(CPU_ONLY_NOISE)


def missing_extras() -> list[str]:
    """The optional GPU extras megatron-core would use that are not importable here."""
    names = {"Transformer Engine": "transformer_engine", "apex": "apex"}
    return [label for label, mod in names.items() if importlib.util.find_spec(mod) is None]


def extras_line(cuda: bool, missing: list[str] | None = None) -> str | None:
    """One line saying which GPU extras are missing and what that costs; None when nothing is missing."""
    missing = missing_extras() if missing is None else missing
    if not missing:
        return None
    what = " and ".join(missing) + (" are" if len(missing) > 1 else " is") + " not installed"
    if not cuda:
        return (f"note: {what} (GPU-only fused kernels; a CPU run does not use them). megatron-core's fallback "
                f"warnings are hidden; {SHOW_ENV}=1 shows them")
    return (f"note: {what}: megatron-core runs its local torch kernels (unfused LayerNorm and bias/GeLU, no FP8, "
            f"parallel.sequence_parallel unavailable); megabd3's attention and AdamW are unaffected. "
            f"{SHOW_ENV}=1 shows the fallback warnings")
