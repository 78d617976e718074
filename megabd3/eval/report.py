"""Evaluation results as JSON (atomic) and a markdown table."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List

from megabd3.io import atomic_write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (missing cells shown as –)."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c, "–")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def results_markdown(results: Dict[str, Any]) -> str:
    """Markdown report of a ``launchers/evaluate.py`` results dict."""
    parts = [f"# Evaluation of {results.get('checkpoint', '?')}", ""]
    if results.get("weights"):
        parts += [f"weights: {results['weights']}" + (f" ({results['weights_note']})" if results.get("weights_note") else ""), ""]
    ppl_rows = []
    for name, m in results.get("perplexity", {}).items():
        ppl_rows.append({"dataset": name, **m})
    if ppl_rows:
        parts += ["## Perplexity (NELBO bound; exact NLL for AR)", "",
                  markdown_table(ppl_rows, ["dataset", "likelihood", "t_range", "ppl", "ppl_se", "nelbo", "bpd", "var_nelbo",
                                             "var_nelbo_train", "tokens", "forward_passes", "framing"]), ""]
    g = results.get("gen_ppl")
    if g:
        row = {k: v for k, v in g.items() if not isinstance(v, list)}
        parts += [f"## Generative perplexity (judge {g.get('judge', '?')})", "",
                  markdown_table([row], ["num_samples", "mean_ppl", "pooled_ppl", "mean_entropy", "median_length",
                                         "max_length", "mean_nfe"]), ""]
    return "\n".join(parts)


def write_results(results: Dict[str, Any], json_path: str | os.PathLike) -> Path:
    """Write results JSON and the markdown beside it (``.md``), both atomically; returns the JSON path."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in [(path, json.dumps(results, indent=2, sort_keys=True, default=str)),
                         (path.with_suffix(".md"), results_markdown(results))]:
        atomic_write_text(target, text + "\n")
    return path
