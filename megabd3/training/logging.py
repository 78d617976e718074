"""Run logging: console line, JSONL metrics, wandb (never blocking), tqdm bar, banner, curves plot.

Only global rank 0 writes. Every record goes to `<run_dir>/metrics.jsonl` (one JSON object per line,
flushed immediately, appended across restarts); `plot_curves` keeps the last record per (kind, step) so
a resumed run's re-done steps replace the interrupted ones.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# Dense bf16 peak FLOP/s per device for MFU; override with MEGABD3_PEAK_FLOPS.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A6000": 155e12, "A5000": 111e12, "V100": 125e12, "L40": 181e12}


def peak_flops_per_device() -> float | None:
    """Peak FLOP/s of this GPU (None on CPU or unknown devices, where MFU is not reported)."""
    if os.environ.get("MEGABD3_PEAK_FLOPS"):
        return float(os.environ["MEGABD3_PEAK_FLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gib() -> float:
    """Peak memory of this process: allocated GPU memory, or the max resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dataclass/dict tree -> {"a.b.c": value}."""
    if is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in fields(obj)}
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_diff(cfg: Any, defaults: Any) -> dict[str, tuple[Any, Any]]:
    """{key: (default, value)} for every leaf where `cfg` differs from `defaults`."""
    a, b = flatten(defaults), flatten(cfg)
    return {k: (a.get(k), b[k]) for k in sorted(b) if a.get(k) != b[k]}


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    ax = abs(x)
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if ax >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.1f}"


def format_line(rec: dict[str, Any], total_steps: int) -> str:
    """One torchtitan-style console line for a training record."""
    parts = [f"step {rec['step']:>{len(str(total_steps))}}/{total_steps}", f"loss {rec['loss']:.4f}"]
    if rec.get("nelbo") is not None:
        parts.append(f"nelbo {rec['nelbo']:.4f}")
    parts += [f"gnorm {rec.get('grad_norm', float('nan')):.3f}", f"lr {rec['lr']:.2e}",
              f"{_fmt(rec['tokens_per_s'])} tok/s", f"{_fmt(rec['tokens_per_s_per_rank'])} tok/s/rank"]
    if rec.get("flops_per_s_per_rank") is not None:
        parts.append(f"{_fmt(rec['flops_per_s_per_rank'])}FLOP/s/rank")
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    parts += [f"mem {rec['peak_mem_gib']:.2f}GiB", f"tokens {_fmt(rec['consumed_tokens'])}"]
    return " | ".join(parts)


class RunLogger:
    """Rank-0 sink for metrics: console, JSONL, wandb and a tqdm bar (all no-ops on other ranks)."""

    def __init__(self, cfg: Any, run_dir: Path, rank: int, start_step: int, total_steps: int) -> None:
        self.rank, self.total = rank, total_steps
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self._jsonl = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        self._wandb = self._init_wandb(cfg)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc="train", file=sys.stderr, smoothing=0.1)

    def _init_wandb(self, cfg: Any):  # type: ignore[no-untyped-def]
        """wandb in the configured mode; any failure (no network, no login) degrades to no wandb."""
        mode = cfg.logging.wandb_mode
        if mode == "disabled":
            return None
        try:
            import wandb

            from megabd3.config.load import config_to_dict

            settings = wandb.Settings(init_timeout=60, silent=True)
            return wandb.init(project=cfg.logging.wandb_project, dir=str(self.run_dir), mode=mode,
                              config=config_to_dict(cfg), resume="allow",
                              id=_stable_run_id(self.run_dir), settings=settings)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            self.write(f"warning: wandb ({mode}) unavailable, continuing without it: {type(exc).__name__}: {exc}")
            return None

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def record(self, kind: str, rec: dict[str, Any]) -> None:
        """Append a record to the JSONL file and wandb."""
        if not self.enabled:
            return
        rec = {"kind": kind, "time": time.time(), **rec}
        self._jsonl.write(json.dumps(rec, default=float) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({f"{kind}/{k}": v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                                step=int(rec["step"]))
            except Exception:  # noqa: BLE001
                pass

    def train_step(self, rec: dict[str, Any], print_line: bool) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=_fmt(rec["tokens_per_s"]), refresh=False)
        if print_line:
            self.record("train", rec)
            self.write(format_line(rec, self.total))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def _stable_run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def banner(title: str, sections: dict[str, dict[str, Any]]) -> str:
    """A boxed multi-section start-up banner."""
    lines = [f"==== {title} " + "=" * max(0, 70 - len(title))]
    for name, items in sections.items():
        lines.append(f"-- {name}")
        if not items:
            lines.append("   (none)")
        for k, v in items.items():
            lines.append(f"   {k:<32} {v}")
    lines.append("=" * 76)
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill -9
            continue
    return out


def plot_curves(run_dir: Path) -> Path | None:
    """Training loss and validation NELBO against step -> <run_dir>/curves.png (matplotlib Agg)."""
    records = read_metrics(run_dir)
    series: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
    for r in records:  # later records win: a resumed run overwrites re-done steps
        if r.get("kind") == "train" and "loss" in r:
            series["train"][int(r["step"])] = float(r["loss"])
        elif r.get("kind") == "eval" and "nelbo" in r:
            series["eval"][int(r["step"])] = float(r["nelbo"])
    if not series["train"] and not series["eval"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for kind, label, style in (("train", "train loss", "-"), ("eval", "valid NELBO (EMA)", "o-")):
        if series[kind]:
            steps = sorted(series[kind])
            ax.plot(steps, [series[kind][s] for s in steps], style, label=label, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / CURVES_FILE
    tmp = out.with_name(CURVES_FILE + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
