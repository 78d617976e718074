"""Worker for tests/dist/test_resume_reshard.py::test_failed_universal_conversion_reaches_every_rank:
2 gloo ranks call `checkpoint._universal_dir` while rank 0's conversion fails, (a) as a failing
subprocess that leaves its temp directory behind, (b) as a KeyboardInterrupt before any subprocess.
Every rank must raise (none may wait in the broadcast) and the temp directory must be gone.
Usage: torchrun --nproc-per-node 2 ... <out_dir>; rank 0 writes result.json, rank 1 rank1.json.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch.distributed as dist

from megabd3.errors import UserError
from megabd3.training import checkpoint as ckpt


def attempt(step_dir: Path) -> str:
    try:
        ckpt._universal_dir(None, step_dir)
    except UserError as e:
        return "UserError: " + str(e)
    except KeyboardInterrupt:
        return "KeyboardInterrupt"
    return "no error"


def main() -> None:
    out = Path(sys.argv[1])
    # a short timeout: a rank left waiting in the broadcast fails the test in seconds, not minutes
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    step_dir = out / "step_00000002"
    step_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {}

    def failing_command(_step: Path, tmp: Path) -> list[str]:  # writes into its output, then fails
        return [sys.executable, "-c", f"import os, sys; os.makedirs({str(tmp)!r}); "
                                      f"open(os.path.join({str(tmp)!r}, 'x'), 'w').close(); "
                                      "sys.stderr.write('boom: no zero shards'); sys.exit(3)"]

    real_command = ckpt.universal_command
    ckpt.universal_command = lambda s, o: failing_command(s, o) if o.name.startswith(ckpt.TMP_PREFIX) \
        else real_command(s, o)
    res["subprocess"] = attempt(step_dir)
    res["tmp_left"] = [p.name for p in step_dir.iterdir()]
    ckpt.universal_command = real_command

    def interrupted(_step: Path, _out: Path) -> None:
        raise KeyboardInterrupt
    ckpt._convert_universal = interrupted
    res["interrupt"] = attempt(step_dir)
    dist.barrier()
    (out / ("result.json" if rank == 0 else "rank1.json")).write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
