"""Cells -> a deduplicated stage graph.

A stage is one command of the real tool chain (``launchers/pretrain.py``, ``launchers/evaluate.py``,
``launchers/sample.py``) or the profile's data preparation. Its directory is keyed by the hash of
what determines its output: for training, the *resolved* config (every field, after base composition
and the profile's ``--set`` overrides; the run directory and the parent's path are replaced by the
parent's key); for measurements, the kind, arguments and the trained stage's key. Two cells that need
the same model therefore share one stage, whichever table asks for it, and a changed config gets a
new directory instead of silently reusing an old result.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megabd3.experiments import prepare as prep
from megabd3.experiments.profiles import Profile
from megabd3.experiments.tables import Measure, Run, Table, t11_candidates

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "experiments"


@dataclass
class Stage:
    key: str
    kind: str                     # prepare | train | eval | zeroshot | sample
    title: str
    deps: List[str] = field(default_factory=list)
    spec: Dict[str, object] = field(default_factory=dict)

    def dir(self, root: Path) -> Path:
        return root / "stages" / self.key


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Graph:
    profile: Profile
    root: Path
    stages: Dict[str, Stage] = field(default_factory=dict)
    #: Run/Measure -> stage key (what the report reads).
    by_run: Dict[Run, str] = field(default_factory=dict)
    by_measure: Dict[Measure, str] = field(default_factory=dict)
    errors: Dict[object, str] = field(default_factory=dict)   # cell sources that could not even be built
    prepare_key: Optional[str] = None

    def add(self, stage: Stage) -> str:
        self.stages.setdefault(stage.key, stage)
        return stage.key

    def order(self) -> List[Stage]:
        """Topological order (dependencies first), stable in insertion order."""
        seen: Dict[str, None] = {}

        def visit(k: str) -> None:
            if k in seen:
                return
            for d in self.stages[k].deps:
                visit(d)
            seen[k] = None

        for k in self.stages:
            visit(k)
        return [self.stages[k] for k in seen]


# ---- training stages -----------------------------------------------------------------------------

def data_sets(profile: Profile, root: Path, dataset: str) -> List[str]:
    """--set overrides that point a committed config at the profile's stand-in data."""
    if profile.standins is None:
        return []
    s = profile.standins[dataset]
    p = prep.paths(root, dataset)
    return [f"data.tokenizer={p['tokenizer']}", f"data.train_prefix={p['train']}", f"data.valid_prefix={p['valid']}",
            f"data.test_prefix={p['test']}", f"data.seq_len={s.seq_len}",
            f"data.chunk_special_tokens={str(s.chunk_special_tokens).lower()}",
            f"diffusion.ignore_bos={str(s.ignore_bos).lower()}", f"sampling.length={s.seq_len}",
            f"sampling.cache_window={s.seq_len}"]


def seq_len(profile: Profile, dataset: str) -> int:
    if profile.standins is not None:
        return profile.standins[dataset].seq_len
    from megabd3.config.load import load_config

    return load_config(CONFIGS / dataset / "ar.json", validate=False).data.seq_len


def train_overrides(profile: Profile, root: Path, run: Run) -> List[str]:
    p_steps, f_steps = profile.steps[run.protocol]
    steps = {"pretrain": p_steps, "finetune": f_steps, "full": p_steps + f_steps}[run.phase]
    sets = data_sets(profile, root, run.dataset) + list(profile.train_sets)
    if run.phase == "finetune":
        sets += list(profile.finetune_sets)
    if run.block_size is not None:
        b = seq_len(profile, run.dataset) if run.block_size == -1 else run.block_size
        sets.append(f"diffusion.block_size={b}")
    sets += list(run.extra_sets)
    if any("clip_search.enabled=true" in x for x in run.extra_sets):
        sets.append(f"training.eval_interval={max(steps // 2, 1)}")  # search halfway, train on the result
    sets.append(f"training.steps={max(steps, 1)}")
    return sets


def resolved_train_config(profile: Profile, root: Path, run: Run) -> Tuple[str, List[str], dict]:
    """(config path, overrides, resolved config dict without paths that depend on the stage directory)."""
    from megabd3.config.load import config_to_dict, load_config

    path = CONFIGS / run.dataset / f"{run.config}.json"
    sets = train_overrides(profile, root, run)
    cfg = load_config(path, sets, validate=True)
    d = config_to_dict(cfg)
    d["training"].pop("run_dir", None)
    d["training"].pop("init_from", None)
    d.pop("description", None)
    return str(path), sets, d


def add_run(g: Graph, run: Run) -> str:
    if run in g.by_run:
        return g.by_run[run]
    parent_key = add_run(g, run.parent) if run.parent is not None else None
    path, sets, resolved = resolved_train_config(g.profile, g.root, run)
    key = "train-" + _hash({"config": resolved, "parent": parent_key})
    deps = [k for k in (g.prepare_key, parent_key) if k]
    spec = {"config": path, "sets": sets, "parent": parent_key, "dataset": run.dataset, "label": run.label,
            "objective": resolved["diffusion"]["objective"], "block_size": resolved["diffusion"]["block_size"],
            "seq_len": resolved["data"]["seq_len"], "weighting": resolved["diffusion"]["weighting"]}
    g.add(Stage(key, "train", run.label, deps, spec))
    g.by_run[run] = key
    return key


# ---- measurement stages --------------------------------------------------------------------------

def add_measure(g: Graph, m: Measure) -> Optional[str]:
    if m in g.by_measure:
        return g.by_measure[m]
    if m.kind in ("data", "check", "best"):
        return None  # read from the prepare stage's stats / computed in-process / resolved over candidates
    train = add_run(g, m.run)  # type: ignore[arg-type]
    deps = [train] + ([g.prepare_key] if g.prepare_key else [])
    prof = g.profile
    if m.kind == "eval":
        spec = {"train": train, "sets": list(prof.eval_sets)}
    elif m.kind == "zeroshot":
        if prof.standins is None:
            prefix = {"lm1b": "data/zero_shot/lm1b_test", "wikitext": "data/zero_shot/wikitext2_valid",
                      "lambada": "data/zero_shot/lambada_test"}[m.target]
        else:
            prefix = prep.paths(g.root, "owt").get(f"zs_{m.target}", "")
        spec = {"train": train, "sets": list(prof.eval_sets), "prefix": prefix, "target": m.target}
    elif m.kind == "sample":
        objective = g.stages[train].spec["objective"]
        L = int(g.stages[train].spec["seq_len"])
        varlen = m.target == "varlen"
        # MDLM and SEDD generate exactly L tokens: that is the limitation Table 6 shows.
        length = prof.varlen_length if (varlen and objective in ("ar", "bd3lm")) else L
        sets = [f"sampling.num_samples={prof.samples_varlen if varlen else prof.samples_fixed}",
                f"sampling.length={length}", f"sampling.var_length={str(varlen).lower()}",
                f"sampling.steps={prof.sampling_steps}", "sampling.batch_size=1", "sampling.seed=1"]
        spec = {"train": train, "sets": sets, "genppl": not varlen, "judge": prep.judge_path(g.root, prof)
                if prof.standins is not None else prof.judge}
    else:
        raise ValueError(f"unknown measure kind {m.kind}")
    key = f"{m.kind}-" + _hash({"kind": m.kind, **spec})
    g.add(Stage(key, m.kind, f"{m.kind} {m.target} of {m.run.label}".replace("  ", " "), deps, spec))  # type: ignore[union-attr]
    g.by_measure[m] = key
    return key


def build_graph(tables: List[Table], profile: Profile, root: Path) -> Graph:
    g = Graph(profile, root)
    if profile.standins is not None:
        g.prepare_key = g.add(Stage("prepare-" + _hash({"profile": profile.name, "standins": repr(profile.standins),
                                                        "bpe": profile.bpe_vocab, "judge": profile.judge}),
                                    "prepare", f"prepare {profile.name} data", spec={"profile": profile.name}))
    for t in tables:
        for c in t.cells:
            try:
                if c.measure.kind == "best":
                    b, pre = c.measure.target.split(":")
                    for _, _, run in t11_candidates(int(b), pre):
                        add_measure(g, Measure("eval", run))
                else:
                    add_measure(g, c.measure)
            except Exception as exc:  # a cell whose config cannot even be resolved fails alone
                g.errors[c.measure] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return g
