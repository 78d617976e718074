"""`python -m megabd3.config`: JSON on success; every problem, exit 1 and no traceback on failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megabd3.config", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_three_mistakes_one_message_exit_1_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({
        "base": [str(ROOT / "configs" / "demo.json")],
        "model": {"hiden_size": 128},  # 1. unknown key
        "training": {"steps": "100"},  # 2. wrong type
        "parallel": {"pipeline_parallel": 2, "zero_stage": 3, "precision": "fp32"},  # 3. PP=2 with ZeRO-3
    }))
    # demo's 3 layers do not split over 2 stages: use 4 layers so exactly the three mistakes remain
    proc = run(str(bad), "--set", "model.num_layers=4")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: 3 problems in config")
    body = "\n".join(lines[1:])
    assert "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?" in body
    assert "training.steps: expected int, found \"100\"" in body
    assert "parallel.pipeline_parallel=2 supports only parallel.zero_stage=1, found zero_stage=3" in body
    assert all(str(bad.name) in line for line in lines[1:])  # each names the file


def test_success_prints_resolved_and_deepspeed_json() -> None:
    proc = run("configs/demo.json", "--set", "training.steps=7", "diffusion.block_size=8", "--world-size", "2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["config"]["training"]["steps"] == 7
    assert out["config"]["diffusion"]["block_size"] == 8
    assert out["effective_block_size"] == 8
    assert (out["world_size"], out["dp_size"]) == (2, 2)
    assert out["deepspeed"]["train_batch_size"] == 8 * 1 * 2
    assert out["deepspeed"]["zero_optimization"] == {"stage": 3}
    assert len(out["config_hash"]) == 16


def test_missing_file_and_bad_world_size() -> None:
    proc = run("configs/nope.json")
    assert proc.returncode == 1 and "config file not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("configs/owt.json", "--world-size", "6")
    assert proc.returncode == 1 and "512 is not a multiple" in proc.stderr and "Traceback" not in proc.stderr
