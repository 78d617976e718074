"""Generate many samples in batches, with per-sample records, a summary, and jsonl I/O."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from megabd3.errors import UserError
from megabd3.io import atomic_open
from megabd3.sampling.registry import build_sampler
from megabd3.sampling.stopping import unigram_entropy


def generate_samples(cfg: Any, model: Any, tokenizer: Any, progress: bool = True, decode: bool = True) -> List[Dict[str, Any]]:
    """``cfg.sampling.num_samples`` samples in batches of ``cfg.sampling.batch_size`` -> jsonl rows."""
    from tqdm import tqdm

    s = cfg.sampling
    if s.num_samples < 1 or s.batch_size < 1:
        raise UserError(f"sampling.num_samples={s.num_samples} and sampling.batch_size={s.batch_size} must be >= 1")
    sampler = build_sampler(cfg, model, tokenizer)
    device = sampler.backend.device
    # the block update rule (NFE depends on it); AR and SEDD have one rule each
    strategy = sampler.opts.rule if sampler.name in ("bd3lm", "mdlm") else sampler.name
    gen = torch.Generator(device=device).manual_seed(s.seed)
    rows: List[Dict[str, Any]] = []
    bar = tqdm(total=s.num_samples, desc=f"sampling {cfg.diffusion.objective}", unit="sample", disable=not progress)
    t0 = time.perf_counter()
    tokens = 0
    while len(rows) < s.num_samples:
        n = min(s.batch_size, s.num_samples - len(rows))
        for r in sampler.sample(n, gen):
            row = {
                "index": len(rows),
                "length": r.length,
                "nfe": r.nfe,
                "cache_forwards": r.cache_forwards,
                "entropy": unigram_entropy(r.tokens),
                "stop_reason": r.stop_reason,
                "tries": r.tries,
                "wall_s": r.wall_s,
                "tokens_per_s": r.batch_tokens_per_s,
                "seed": s.seed,
                "strategy": strategy,
                "tokenizer": getattr(tokenizer, "name", ""),
                "tokens": r.tokens,
            }
            if decode:
                row["text"] = tokenizer.decode(r.tokens)
            rows.append(row)
            tokens += r.length - 1
        bar.update(n)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    return rows


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    lengths = [r["length"] for r in rows]
    return {
        "num_samples": len(rows),
        "mean_length": sum(lengths) / len(rows),
        "median_length": float(statistics.median(lengths)),
        "max_length": max(lengths),
        "mean_nfe": sum(r["nfe"] for r in rows) / len(rows),
        "mean_cache_forwards": sum(r["cache_forwards"] for r in rows) / len(rows),
        "mean_entropy": sum(r["entropy"] for r in rows) / len(rows),
        "tokens_per_s": sum(r["length"] - 1 for r in rows) / max(sum_batch_walls(rows), 1e-9),
    }


def sum_batch_walls(rows: List[Dict[str, Any]]) -> float:
    """Total wall time: each batch's wall time once (rows of a batch share it)."""
    seen, total = set(), 0.0
    for r in rows:
        key = (r["wall_s"], r["tokens_per_s"])
        if key not in seen:
            seen.add(key)
            total += r["wall_s"]
    return total


def write_jsonl(rows: List[Dict[str, Any]], path: str | os.PathLike) -> Path:
    """Atomic jsonl write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def read_samples(path: str | os.PathLike) -> List[Dict[str, Any]]:
    """Rows of a samples jsonl (each must have ``tokens``); one-line errors on bad files."""
    if not os.path.isfile(path):
        raise UserError(f"samples file {path} does not exist: write one with launchers/sample.py")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{i} is not valid JSON; expected one sample object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("tokens"), list):
                raise UserError(f"{path}:{i} has no 'tokens' list; expected rows written by launchers/sample.py")
            rows.append(row)
    if not rows:
        raise UserError(f"samples file {path} is empty")
    return rows
