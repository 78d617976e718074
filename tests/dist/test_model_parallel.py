"""TP=2 and PP=2 give the same logits, loss, grad norm and gradients as one process (DESIGN.md
invariant 6) for the same full weights; 2 gloo ranks, OMP_NUM_THREADS=1."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sys

sys.path.insert(0, str(Path(__file__).parent))
from _launch import launch  # noqa: E402

pytestmark = pytest.mark.dist
WORKER = Path(__file__).with_name("_model_worker.py")


def _run(tmp: Path, tp: int, pp: int) -> dict:
    out = tmp / f"tp{tp}_pp{pp}.pt"
    launch(WORKER, tp * pp, str(tp), str(pp), str(out))
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:  # noqa: ANN001
    return _run(tmp_path_factory.mktemp("ref"), 1, 1)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_layout_matches_single_process(reference: dict, tmp_path: Path, tp: int, pp: int) -> None:
    got = _run(tmp_path, tp, pp)
    assert reference["loss"] > 0 and reference["grad_norm"] > 0
    torch.testing.assert_close(got["logits"], reference["logits"], atol=2e-5, rtol=1e-5)
    assert abs(got["loss"] - reference["loss"]) < 1e-5
    assert abs(got["grad_norm"] - reference["grad_norm"]) < 1e-4 * reference["grad_norm"]
    assert got["grads"].keys() == reference["grads"].keys()
    for name, g in reference["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, atol=2e-5, rtol=1e-4, msg=name)
