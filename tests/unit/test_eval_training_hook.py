"""The training-time evaluation reports both Var. NELBOs: the honest one and the one under the live
training interval (the paper's), through the real launcher, engine and loop (one process)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _training_run import make_dataset, ok, pretrain, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow
CLIP = [0.3, 0.8]


def test_training_eval_reports_var_nelbo_under_the_training_interval(tmp_path):
    prefix = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path / "cfg.json", prefix, tmp_path / "run", training={"steps": 2},
                      diffusion={"objective": "bd3lm", "block_size": 4, "clip_min": CLIP[0], "clip_max": CLIP[1]},
                      eval={"batch_size": 2, "max_batches": 2, "var_nelbo": True})
    ok(pretrain(cfg))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
    assert evals, "the run evaluated nothing"
    last = evals[-1]
    assert last["var_nelbo_train_interval"] == pytest.approx(CLIP)
    assert last["var_nelbo_train"] > 0 and last["var_nelbo"] > 0
    assert last["var_nelbo_train"] != pytest.approx(last["var_nelbo"], rel=1e-3)
