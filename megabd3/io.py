"""Atomic file writes, used for every dataset, checkpoint, config and report file megabd3 writes.

A write goes to a temp file in the target's directory (same filesystem, so the rename is atomic),
is flushed and fsynced, then ``os.replace``d over the target. A crash at any point leaves either the
old file or the new one, never a torn one; the temp file is removed when the write fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def atomic_save_with(path: str | os.PathLike, save: Callable[[IO[bytes]], None]) -> None:
    """Atomic write through a serializer that takes a binary file (``torch.save``, ``np.save``, ...)."""
    with atomic_open(path, "wb") as fh:
        save(fh)
