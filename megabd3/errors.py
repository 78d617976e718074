"""User-facing errors: one line naming the cause and the fix, printed without a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Something the user can fix (bad file, key, path, combination). The message is one line."""


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a CLI entry point: UserError (and ConfigError) become `error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper
