"""benchmarks/gpu_acceptance.py: its criteria, and the whole `--cpu` run (table, JSON, exit status).

The CPU run trains the demo model through the real launcher (24 steps), resumes it in a fresh process,
and runs the attention, throughput and sampling rows (~60-80 s on 2 cores, plus ~50 s the first time
to build data/demo/ from the cached PTB text).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.py"


def _module():  # noqa: ANN202
    if "gpu_acceptance" in sys.modules:
        return sys.modules["gpu_acceptance"]
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, timeout: float, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(extra_env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_loss_falls_criterion() -> None:
    m = _module()
    assert m.loss_falls([8.0] * 5 + [6.0] * 5, k=5, margin=0.5)[0]
    assert not m.loss_falls([8.0] * 5 + [7.8] * 5, k=5, margin=0.5)[0]  # fell, but by less than the margin
    assert not m.loss_falls([8.0] * 5 + [6.0] * 4 + [float("nan")], k=5, margin=0.5)[0]  # NaN fails
    assert not m.loss_falls([8.0, 6.0], k=5, margin=0.5)[0]  # too few steps to judge


def test_resume_criterion_exact_and_tolerant() -> None:
    m = _module()
    ref = {1: 7.0, 2: 6.5, 3: 6.0}
    assert m.resume_matches(ref, {2: 6.5, 3: 6.0}, 0.0, 0.0)[0]
    assert not m.resume_matches(ref, {2: 6.5, 3: 6.0 + 1e-7}, 0.0, 0.0)[0]  # exact means exact
    assert m.resume_matches(ref, {2: 6.5, 3: 6.06}, 0.02, 0.006)[0]
    assert not m.resume_matches(ref, {2: 6.5, 3: 6.3}, 0.02, 0.006)[0]
    assert not m.resume_matches(ref, {4: 5.0}, 0.02, 0.006)[0]  # a step the reference never ran
    assert not m.resume_matches(ref, {}, 0.02, 0.006)[0]


def test_table_and_exit_status() -> None:
    m = _module()
    rows = [m.Row("a", "1", "x > 0", True), m.Row("b", "0", "x > 0", False)]
    table = m.format_table(rows)
    assert table.splitlines()[0].startswith("| check") and "| FAIL   |" in table and "| PASS   |" in table
    assert m.exit_status(rows) == 1 and m.exit_status(rows[:1]) == 0 and m.exit_status([]) == 1


@pytest.mark.slow
def test_cpu_run_passes_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "acceptance.json"
    proc = _run("--cpu", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    checks = [r["check"] for r in result["rows"]]
    assert result["passed"] and all(r["passed"] for r in result["rows"])
    for prefix in ("train demo", "resume", "attn tiled vs dense", "speed", "sample bd3 KV-cached",
                   "sample fixed-shape (graph) cache"):
        assert any(c.startswith(prefix) for c in checks), (prefix, checks)
    assert len(checks) == 7
    table = proc.stdout[proc.stdout.index("== megabd3 acceptance"):]
    assert table.count("| PASS   |") == 7 and "criterion" in table
    resume = next(r for r in result["rows"] if r["check"].startswith("resume"))
    assert resume["detail"]["resumed"] and all(  # bit-exact on CPU
        resume["detail"]["reference"][s] == v for s, v in resume["detail"]["resumed"].items())


def test_a_failing_check_exits_nonzero(tmp_path: Path) -> None:
    out = tmp_path / "acceptance.json"
    proc = _run("--cpu", "--only", "attn", "--attn-goal", "1e9", "--out", str(out), timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["passed"] and len(result["rows"]) == 2
    assert all(not r["passed"] and r["detail"]["errors"] for r in result["rows"])
    assert "| FAIL   |" in proc.stdout and ">= 1e+09x" in proc.stdout


def test_bad_only_is_rejected() -> None:
    m = _module()
    assert m.main(["--cpu", "--only", "nope"]) == 2


def test_missing_data_without_registry_is_one_line(tmp_path: Path) -> None:
    """A GPU box with no internet and no data/demo: one line naming the command to run, exit 2."""
    offline = {"MEGABD3_HOME": str(tmp_path / "home"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
               "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
    proc = _run("--cpu", "--only", "train", "--data-dir", str(tmp_path / "data"), timeout=300, extra_env=offline)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "demo data missing" in errors[0] and "tools/quickstart.sh" in errors[0]
    assert "Traceback" not in proc.stderr
