#!/usr/bin/env python3
"""Generate configs/experiments/: one file per dataset x block size x noise schedule or loss weighting.

The grid covers every schedule, clipped range and weighting the reproduction report
(shared/reference/reproduction_report.md) trains with, for every block size it uses (LM1B: 1, 4, 8,
16, 128; OWT: 4, 8, 16), plus the AR/MDLM/SEDD baselines, the L'=1 tuned U[1,1] schedule and the
cosine-clipped cells of its Table 10. Each file inherits from configs/lm1b.json or configs/owt.json
through "base" and only states what the experiment varies; its "description" names the report
tables it appears in.

    python tools/gen_configs.py           # (re)write the files, delete stale ones
    python tools/gen_configs.py --check   # exit 1 if the committed files differ (a test runs this)

Scale: these are the paper-scale recipes (small model, global batch 512, 1M steps). The report ran
them with the tiny model for a few hundred steps; reproduce that with a two-line file such as
``{"base": ["experiments/lm1b/bd3lm_bs4_cosine.json", "model/tiny.json"], "training": {"steps": 500}}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
OUT_DIR = "experiments"

# Noise schedules: name -> (diffusion.noise block, words for the description).
SCHEDULES: dict[str, tuple[dict[str, Any], str]] = {
    "loglinear": ({"type": "loglinear"}, "loglinear p(t)=t, t~U[1e-3,1]"),
    "square": ({"type": "square"}, "square p(t)=t^2"),
    "square_root": ({"type": "square_root"}, "square-root p(t)=sqrt(t)"),
    "log": ({"type": "log"}, "logarithmic p(t)=log(1+t)/log 2"),
    "cosine": ({"type": "cosine"}, "cosine p(t)=1-(1-eps)cos(pi t/2)"),
}
# Truncated Gaussian (fork defaults sigma=0.1, a standard deviation); the report varies mu.
for _mu in (0.5, 0.6, 0.7):
    SCHEDULES[f"gaussian_mu{_mu}"] = ({"type": "gaussian", "mu": _mu, "sigma": 0.1},
                                      f"truncated Gaussian mask rate, mu={_mu}, sigma=0.1")
# Bimodal Gaussian (fork defaults for the second component); the report varies mu1 with w1=0.6.
for _mu1 in (0.1, 0.3):
    SCHEDULES[f"bimodal_mu{_mu1}_w0.6"] = (
        {"type": "bimodal_gaussian", "mu1": _mu1, "sigma1": 0.02, "w1": 0.6, "mu2": 0.4, "mu2_end": 0.85,
         "tau_scale": 3.0, "sigma2": 0.08},
        f"bimodal Gaussian mask rate, mu1={_mu1}, w1=0.6, sigma1=0.02, mu2 0.4->0.85, sigma2=0.08")

# Clipped loglinear ranges t ~ U[beta, omega]; the report's "U[0, x]" is the reference's [1e-3, x].
CLIPS: dict[str, tuple[float, float]] = {
    "clip_0.45-0.95": (0.45, 0.95),
    "clip_0.3-0.8": (0.3, 0.8),
    "clip_0.5-1": (0.5, 1.0),
    "clip_0-0.5": (1e-3, 0.5),
}
# Cosine with the clipped range its block size used in Table 10.
COSINE_CLIPS: dict[int, str] = {128: "clip_0-0.5", 16: "clip_0.3-0.8", 4: "clip_0.5-1"}

WEIGHTINGS = ("edm", "iddpm", "sigmoid", "fm", "simple")
BLOCK_SIZES = {"lm1b": (1, 4, 8, 16, 128), "owt": (4, 8, 16)}

# Where each experiment appears in the reproduction report: (dataset, name) -> tables.
_T = {
    "lm1b": {
        "Table 1": ["ar", "bd3lm_bs1_loglinear", "bd3lm_bs1_tuned"],
        "Table 2": ["bd3lm_bs128_clip_0-0.5", "bd3lm_bs128_loglinear", "bd3lm_bs16_clip_0.3-0.8",
                    "bd3lm_bs16_loglinear", "bd3lm_bs4_clip_0.5-1", "bd3lm_bs4_loglinear"],
        "Table 3": ["ar", "sedd", "mdlm", "bd3lm_bs16_loglinear", "bd3lm_bs8_loglinear", "bd3lm_bs4_loglinear"],
        "Table 8": ["bd3lm_bs4_clip_0.45-0.95", "bd3lm_bs4_clip_0.3-0.8", "bd3lm_bs4_loglinear", "bd3lm_bs4_log",
                    "bd3lm_bs4_square_root", "bd3lm_bs16_clip_0.45-0.95", "bd3lm_bs16_clip_0.3-0.8",
                    "bd3lm_bs16_loglinear", "bd3lm_bs16_square", "bd3lm_bs16_cosine"],
        "Tables 10-11": [f"bd3lm_bs{b}_{s}" for b, mus in ((128, (0.5, 0.6)), (16, (0.5, 0.6)), (4, (0.5, 0.7)))
                         for s in ["loglinear", "cosine", COSINE_CLIPS[b], f"cosine_{COSINE_CLIPS[b]}"]
                         + [f"gaussian_mu{m}" for m in mus] + ["bimodal_mu0.1_w0.6", "bimodal_mu0.3_w0.6"]],
        "Table 13 (dataset not stated)": ["ar", "sedd", "mdlm"] + [
            f"bd3lm_bs{b}_{w}" for b in (4, 8, 16) for w in ["loglinear"] + [f"weighting_{x}" for x in WEIGHTINGS]],
    },
    "owt": {
        "Table 4": ["ar", "sedd", "mdlm", "bd3lm_bs16_loglinear", "bd3lm_bs8_loglinear", "bd3lm_bs4_loglinear"],
        "Table 5": ["ar", "sedd", "mdlm", "bd3lm_bs4_loglinear"],
        "Table 6": ["ar", "sedd", "bd3lm_bs16_loglinear"],
        "Table 7": ["ar", "sedd", "mdlm", "bd3lm_bs16_loglinear", "bd3lm_bs8_loglinear", "bd3lm_bs4_loglinear"],
        "Table 13 (dataset not stated)": ["ar", "sedd", "mdlm"] + [
            f"bd3lm_bs{b}_{w}" for b in (4, 8, 16) for w in ["loglinear"] + [f"weighting_{x}" for x in WEIGHTINGS]],
    },
}


def _tables(dataset: str, name: str) -> str:
    found = [t for t, names in _T[dataset].items() if name in names]
    if not found:
        return "Grid completion (not a cell of the reproduction report)."
    return f"Reproduction report {', '.join(found)}."


def _experiment(dataset: str, name: str, what: str, diffusion: dict[str, Any], extra: dict[str, Any] | None = None
                ) -> tuple[str, dict[str, Any]]:
    label = {"lm1b": "LM1B", "owt": "OWT"}[dataset]
    body: dict[str, Any] = {
        "description": f"{label}, {what}. {_tables(dataset, name)}",
        "base": [f"../../{dataset}.json"],
        "diffusion": diffusion,
    }
    body.update(extra or {})
    body.setdefault("training", {})["run_dir"] = f"runs/{dataset}/{name}"
    return f"{OUT_DIR}/{dataset}/{name}.json", body


# Block size 1 turns the base configs' resampling off: a 1-token block's realised masked fraction is 0
# or 1, so resampling to a clip interval either never masks anything (upper bound < 1: loss identically
# 0), cannot be satisfied (neither 0 nor 1 inside), or just forces every token masked.
NO_RESAMPLE_L1 = ("no resampling (a 1-token block's masked fraction is 0 or 1, so resampling to a clip would "
                  "give a zero loss or never finish)")


def _bd3(block: int, noise: dict[str, Any], clip: tuple[float, float] = (1e-3, 1.0), weighting: str = "none",
         time_mode: str = "uniform") -> dict[str, Any]:
    # Fixed-schedule experiments: the data-driven clip search of the base config would overwrite them.
    out = {"objective": "bd3lm", "block_size": block, "noise": noise, "clip_min": clip[0], "clip_max": clip[1],
           "time_mode": time_mode, "weighting": weighting, "clip_search": {"enabled": False}}
    if block == 1:
        out["resample"] = False
    return out


def _words(block: int, what: str) -> str:
    """The description's "what", with the L'=1 resampling note."""
    return f"{what}, {NO_RESAMPLE_L1}" if block == 1 else what


def generate() -> dict[str, dict[str, Any]]:
    """Every experiment config: path relative to configs/ -> JSON content."""
    out: dict[str, dict[str, Any]] = {}

    def put(item: tuple[str, dict[str, Any]]) -> None:
        out[item[0]] = item[1]

    for dataset, blocks in BLOCK_SIZES.items():
        no_search = {"resample": False, "clip_search": {"enabled": False}, "weighting": "none"}
        put(_experiment(dataset, "ar", "autoregressive baseline (causal, no adaLN, exact NLL)",
                        {"objective": "ar", **no_search}, {"model": {"adaln": False, "time_conditioning": False}}))
        put(_experiment(dataset, "mdlm", "MDLM baseline (one block of length L, loglinear, unclipped)",
                        {"objective": "mdlm", "noise": {"type": "loglinear"}, "clip_min": 1e-3, "clip_max": 1.0,
                         **no_search}))
        put(_experiment(dataset, "sedd", "SEDD baseline (absorbing score entropy, time-conditioned)",
                        {"objective": "sedd", "noise": {"type": "loglinear"}, **no_search},
                        {"model": {"time_conditioning": True}}))
        for b in blocks:
            for sname, (noise, words) in SCHEDULES.items():
                put(_experiment(dataset, f"bd3lm_bs{b}_{sname}", _words(b, f"BD3-LM L'={b}, {words}"), _bd3(b, noise)))
            for cname, clip in CLIPS.items():
                put(_experiment(dataset, f"bd3lm_bs{b}_{cname}",
                                _words(b, f"BD3-LM L'={b}, loglinear clipped to t~U[{clip[0]:g},{clip[1]:g}]"),
                                _bd3(b, {"type": "loglinear"}, clip)))
            for w in WEIGHTINGS:
                put(_experiment(dataset, f"bd3lm_bs{b}_weighting_{w}",
                                _words(b, f"BD3-LM L'={b}, loglinear with the training-only {w} loss weighting"
                                       + (" (k=0)" if w == "sigmoid" else "")),
                                _bd3(b, {"type": "loglinear"}, weighting=w)))
            if dataset == "lm1b" and b in COSINE_CLIPS:
                cname = COSINE_CLIPS[b]
                clip = CLIPS[cname]
                put(_experiment(dataset, f"bd3lm_bs{b}_cosine_{cname}",
                                f"BD3-LM L'={b}, cosine clipped to t~U[{clip[0]:g},{clip[1]:g}]",
                                _bd3(b, {"type": "cosine"}, clip)))
        if 1 in blocks:
            put(_experiment(dataset, "bd3lm_bs1_tuned",
                            "BD3-LM L'=1 with the tuned U[1,1] schedule (all positions masked, weight 1 = AR NLL)",
                            _bd3(1, {"type": "loglinear"}, (1.0, 1.0), time_mode="tuned")))
    return out


def render(content: dict[str, Any]) -> str:
    """The exact text committed for one config (stable key order, 2-space indent, final newline)."""
    return json.dumps(content, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when files are stale")
    args = parser.parse_args(argv)
    wanted = {CONFIGS / rel: render(content) for rel, content in generate().items()}
    existing = set((CONFIGS / OUT_DIR).rglob("*.json")) if (CONFIGS / OUT_DIR).exists() else set()
    stale = sorted(p for p in existing if p not in wanted)
    changed = sorted(p for p, text in wanted.items() if not p.exists() or p.read_text(encoding="utf-8") != text)
    if args.check:
        for p in changed:
            print(f"stale or missing: {p.relative_to(ROOT)}")
        for p in stale:
            print(f"not generated: {p.relative_to(ROOT)}")
        if changed or stale:
            print("run: python tools/gen_configs.py", file=sys.stderr)
            return 1
        print(f"{len(wanted)} experiment configs up to date")
        return 0
    for p in changed:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(wanted[p], encoding="utf-8")
        tmp.replace(p)
    for p in stale:
        p.unlink()
    print(f"wrote {len(changed)} of {len(wanted)} experiment configs, removed {len(stale)} stale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
