"""Graceful stop on SIGTERM/SIGUSR1 (SLURM preemption, `scancel --signal`, time limits).

The handler only sets a flag; the loop polls it at optimizer-step boundaries, agrees across ranks
(any rank signalled -> all stop, so no rank waits in a collective), saves a checkpoint and exits 0.
SLURM then requeues the job and auto-resume continues from that checkpoint.
"""
from __future__ import annotations

import signal
import types

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for `STOP_SIGNALS`; `.requested` becomes the signal name once one arrives."""

    def __init__(self, enabled: bool = True) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        if enabled:
            for sig in STOP_SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread (e.g. inside some test harnesses)
                    pass

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
