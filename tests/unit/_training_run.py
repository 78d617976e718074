"""Helpers for the training tests: a tiny real dataset (tools/preprocess_data.py), a tiny BD3 config
(hidden 64, 2 layers, 4 heads, L=32, block 4, dropout 0), and running `launchers/pretrain.py` under
plain python or torchrun, returning its per-step losses from metrics.jsonl."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launchers" / "pretrain.py"
WORDS = ("the quick brown fox jumps over a lazy dog while market news report said people government year "
         "time world city water music school river garden train light").split()


def make_dataset(out_dir: Path, tokenizer: str = "gpt2", docs: int = 200) -> str:
    """Preprocess a small synthetic jsonl with the real tool; returns the prefix (<p>_train/<p>_valid exist)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    src = out_dir / "tiny.jsonl"
    with open(src, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(20, 60)))}) + "\n")
    prefix = out_dir / tokenizer.replace("/", "_")
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(src), "--tokenizer", tokenizer,
           "--output-prefix", str(prefix), "--split", "train:0.9", "--split", "valid:0.1", "--workers", "1",
           "--no-progress"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(prefix)


def tiny_config(path: Path, prefix: str, run_dir: Path, **overrides: dict) -> Path:
    cfg = {
        "model": {"hidden_size": 64, "num_heads": 4, "num_layers": 2, "cond_dim": 32, "dropout": 0.0},
        "data": {"tokenizer": "gpt2", "train_prefix": prefix + "_train", "valid_prefix": prefix + "_valid",
                 "seq_len": 32, "mode": "wrap"},
        "diffusion": {"objective": "bd3lm", "block_size": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "training": {"steps": 3, "micro_batch_size": 2, "gradient_accumulation": 1, "seed": 1, "ema": 0.999,
                     "eval_interval": 0, "log_interval": 1, "run_dir": str(run_dir)},
        "parallel": {"precision": "fp32", "zero_stage": 0},
        "checkpoint": {"save_interval": 0, "keep_last_n": 5},
        "logging": {"wandb_mode": "disabled", "progress_bar": False, "plot": False},
        "eval": {"batch_size": 2, "max_batches": 1},
    }
    for section, values in overrides.items():
        cfg[section].update(values)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def env(**extra: str) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             WANDB_MODE="disabled", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_PROCID"):
        e.pop(k, None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(config: Path, *sets: str, world: int = 1, timeout: float = 300,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real launcher; world > 1 goes through torchrun. Does not assert on the exit status."""
    args: list[str] = ["--config", str(config)]
    for s in sets:
        args += ["--set", s]
    if world == 1:
        cmd: Sequence[str] = [sys.executable, str(PRETRAIN), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(PRETRAIN), *args]
    return subprocess.run(cmd, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-5000:]
    return proc


def train_records(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]
