"""Refuse, with the reason, to resume a checkpoint under a config it cannot be loaded into.

Resuming a run directory after changing, say, `model.hidden_size` used to die on rank 0 inside DeepSpeed's
load ("The size of tensor a (...) must match the size of tensor b (...)"), and the config-hash check in
run.py only runs after that load. `check_resume_compatible` runs before it: it diffs the checkpoint's
`config.json` (written into every step directory) against the current resolved config and names the
differing keys, old -> new, and the two ways out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megabd3.errors import UserError
from megabd3.training.logging import flatten

# Labels that change neither the model nor the data stream: a moved/copied run directory, a reworded
# description, the fine-tune source (the checkpoint's weights supersede it on resume).
COSMETIC_KEYS = ("description", "training.run_dir", "training.init_from")
SHOWN = 6  # differing keys spelled out in the one-line message


def ignored_keys() -> tuple[str, ...]:
    """Keys (exact, or a section when ending in '.') allowed to differ on resume."""
    from megabd3.training.run import RESUMABLE_CHANGES  # lazy: run.py imports this module

    return tuple(RESUMABLE_CHANGES) + COSMETIC_KEYS


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return any(key.startswith(i) if i.endswith(".") else (key == i or key.startswith(i + ".")) for i in ignore)


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs and is not ignored ('<absent>' if missing)."""
    a, b = flatten(old), flatten(new)
    absent = "<absent>"
    return {k: (a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
            if not _ignored(k, ignore) and a.get(k, absent) != b.get(k, absent)}


def check_resume_compatible(step_dir: Path | None, cfg: Any) -> None:
    """Raise UserError if `cfg` differs from the config `step_dir` was trained with in anything but the
    resumable keys (run.RESUMABLE_CHANGES) and labels. None (nothing to resume) and a checkpoint without
    config.json are let through (the config-hash check after the load still guards the latter). Every
    rank reads the same file and reaches the same verdict, so all ranks exit together (no hang)."""
    from megabd3.config.load import config_to_dict
    from megabd3.training.checkpoint import CONFIG_FILE

    if step_dir is None:
        return
    path = Path(step_dir) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); the checkpoint is damaged: point checkpoints/latest at an older "
                        f"step_* directory, or set checkpoint.resume=false") from None
    # a JSON round trip gives the current config the same types as the file (tuples -> lists)
    new = json.loads(json.dumps(config_to_dict(cfg)))
    diff = config_differences(old, new, ignored_keys())
    if not diff:
        return
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:SHOWN])
    more = f" and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    raise UserError(f"cannot resume {step_dir}: the config differs from the checkpoint's in {shown}{more}; "
                    f"use a new training.run_dir, set checkpoint.resume=false to start over in this one, or undo the change")
