"""`launchers/pretrain.py`, unchanged, with a test gate that parks the run at a known step.

Usage (exactly like the launcher; under torchrun or srun-style env):
    MEGABD3_TEST_GATE_STEP=5 [MEGABD3_TEST_GATE_RELEASE=/path/file] python resume_gated_pretrain.py --config ...

Right after rank 0 has logged step GATE_STEP (its metrics line is written), rank 0 waits until the file
GATE_RELEASE exists (if unset: until killed, or exit 97 after MEGABD3_TEST_GATE_TIMEOUT s, default
900, so a dead test leaves no parked job behind). The other ranks block in the next collective. The tests then
kill -9 or SIGTERM the job at a known point instead of racing a run that may already have finished.
Waiting changes no numbers: nothing is drawn or computed while parked.
"""
from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launchers" / "pretrain.py"


def install_gate(step: int, release: Path | None) -> None:
    from megabd3.training.logging import RunLogger

    real = RunLogger.train_step

    def gated(self: RunLogger, rec: dict, print_line: bool) -> None:
        real(self, rec, print_line)
        if self.enabled and int(rec["step"]) == step:
            # time.sleep is interrupted by signals and their Python handlers run here, so a SIGTERM
            # received while parked is seen by the trainer's StopRequest before the gate opens.
            give_up = time.monotonic() + float(os.environ.get("MEGABD3_TEST_GATE_TIMEOUT", "900"))
            while release is None or not release.exists():
                if time.monotonic() > give_up:  # the test died without ending us: do not linger
                    os._exit(97)
                time.sleep(0.02)

    RunLogger.train_step = gated  # type: ignore[method-assign]


def main() -> None:
    sys.path.insert(0, str(REPO))
    from megabd3.training.launch import prepare_environment

    prepare_environment()  # before the heavy imports, as the launcher does (it is idempotent)
    gate = os.environ.get("MEGABD3_TEST_GATE_STEP")
    if gate:
        release = os.environ.get("MEGABD3_TEST_GATE_RELEASE")
        install_gate(int(gate), Path(release) if release else None)
    sys.argv = [str(PRETRAIN), *sys.argv[1:]]
    runpy.run_path(str(PRETRAIN), run_name="__main__")


if __name__ == "__main__":
    main()
