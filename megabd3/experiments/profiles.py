"""Scale profiles: how big each stage of the suite is.

paper   the committed recipes (configs/lm1b.json, configs/owt.json: small model, batch 512, 850K steps of
        pretraining + 150K of fine-tuning); data must already be preprocessed at the configs' paths.
report  the reproduction report's step counts (400 + 100 on LM1B, 3000 + 3000 on OWT, ...; section 4.2
        and the table captions) with the tiny model; same data as ``paper``.
cpu     the whole suite on 2 CPU cores in about 2 hours. Stand-ins, named as such everywhere: PTB for
        LM1B (sentences, chunk BOS/EOS, ignore_bos, like lm1b.json) and BBC News for OWT. Each stand-in
        gets a 2048-entry byte-level BPE trained on its own training split (a 50k vocabulary would make
        the output head dominate every CPU step). Every pretraining stage sees >= 500k tokens. All step
        groups share one budget, so identical stages are shared across tables.
smoke   1-2 steps per stage on a few hundred documents, a tiny model and a tiny random judge (CI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megabd3.errors import UserError


@dataclass(frozen=True)
class StandIn:
    """A dataset role (lm1b / owt) at a scale: what text plays it and how it is cut."""

    label: str                  # shown in every table header, e.g. "PTB (stand-in for LM1B)"
    source: str                 # text asset: ptb | bbc
    seq_len: int
    chunk_special_tokens: bool
    ignore_bos: bool
    max_docs: int = 0           # 0 = all (smoke uses a few hundred)


@dataclass
class Profile:
    name: str
    description: str
    #: (pretrain steps, fine-tune steps) per protocol of :data:`megabd3.experiments.tables.PROTOCOLS`.
    steps: Dict[str, Tuple[int, int]]
    #: --set overrides applied to every training stage (model size, batch, lr, logging, ...).
    train_sets: List[str] = field(default_factory=list)
    finetune_sets: List[str] = field(default_factory=list)
    eval_sets: List[str] = field(default_factory=list)
    #: stand-in data (cpu/smoke); None = the committed configs' own data paths (paper/report).
    standins: Optional[Dict[str, StandIn]] = None
    bpe_vocab: int = 2048
    samples_fixed: int = 8
    samples_varlen: int = 4
    varlen_length: int = 1024
    sampling_steps: int = 128
    judge: str = "gpt2-large"    # "tiny" = a random GPT-2 the prepare stage makes
    executor_jobs: int = 1


_CPU_TRAIN = [
    "model.hidden_size=128", "model.num_heads=4", "model.num_layers=3", "model.cond_dim=64", "model.dropout=0.0",
    "training.micro_batch_size=16", "training.global_batch_size=16", "training.ema=0.995",
    "optim.lr=1e-3", "optim.warmup_steps=20", "optim.schedule=constant",
    "training.eval_interval=0", "training.log_interval=10", "eval.batch_size=16", "eval.max_batches=4",
    "checkpoint.save_interval=100", "checkpoint.keep_last_n=1", "parallel.zero_stage=0",
    "logging.wandb_mode=disabled", "logging.progress_bar=false", "logging.plot=false",
    "diffusion.clip_search.num_batches=4",
]

_SMOKE_TRAIN = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=1", "model.cond_dim=16", "model.dropout=0.0",
    "training.micro_batch_size=4", "training.global_batch_size=4", "training.ema=0.9",
    "optim.lr=1e-3", "optim.warmup_steps=1", "training.eval_interval=0", "training.log_interval=1",
    "eval.batch_size=4", "eval.max_batches=2", "checkpoint.save_interval=1", "checkpoint.keep_last_n=1",
    "parallel.zero_stage=0", "logging.wandb_mode=disabled", "logging.progress_bar=false", "logging.plot=false",
    "diffusion.clip_search.num_batches=2",
]


def _uniform(p: int, f: int) -> Dict[str, Tuple[int, int]]:
    from megabd3.experiments.tables import PROTOCOLS

    return {k: (p + f, 0) if k == "t1" else (p, f) for k in PROTOCOLS}


PROFILES: Dict[str, Profile] = {
    "paper": Profile(
        "paper", "the committed OWT/LM1B recipes (small model, global batch 512, 850K + 150K steps)",
        steps={k: ((1_000_000, 0) if k == "t1" else (850_000, 150_000)) for k in (
            "t1", "ablation", "owt", "transfer", "varlen", "owt_short", "schedules", "weighting")},
        finetune_sets=["optim.warmup_steps=2500"], samples_fixed=300, samples_varlen=500, varlen_length=131072,
        sampling_steps=5000, judge="gpt2-large"),
    "report": Profile(
        "report", "the reproduction report's step counts with the tiny model",
        steps={"t1": (800, 0), "ablation": (400, 100), "owt": (3000, 3000), "transfer": (800, 800),
               "varlen": (800, 500), "owt_short": (400, 100), "schedules": (5000, 3000), "weighting": (800, 800)},
        train_sets=["model.hidden_size=256", "model.num_heads=8", "model.num_layers=8", "model.cond_dim=64",
                    "optim.warmup_steps=100", "training.eval_interval=100"],
        finetune_sets=["optim.warmup_steps=20"], samples_fixed=300, samples_varlen=10, varlen_length=16384,
        sampling_steps=1000, judge="gpt2-large"),
    "cpu": Profile(
        "cpu", "2 CPU cores, ~2 hours: PTB for LM1B, BBC News for OWT, 2048-entry BPE per stand-in, d128/4h/3L, "
               "L=128, batch 16; 250 pretraining + 60 fine-tuning steps (Table 4: 600 + 200), >= 512k pretraining tokens",
        # Table 4 is the report's long run (3000 + 3000 vs 400 + 100): here too it gets the longer budget, which
        # BBC needs for the diffusion models to clear its unigram baseline.
        steps={**_uniform(250, 60), "owt": (600, 200)},
        train_sets=_CPU_TRAIN, finetune_sets=["optim.warmup_steps=10"],
        eval_sets=["eval.batch_size=32", "eval.max_batches=0"],
        standins={"lm1b": StandIn("PTB (stand-in for LM1B)", "ptb", 128, True, True),
                  "owt": StandIn("BBC News (stand-in for OWT)", "bbc", 128, False, False)},
        bpe_vocab=2048, samples_fixed=8, samples_varlen=4, varlen_length=1024, sampling_steps=128,
        judge="smollm2-135m", executor_jobs=2),
    "smoke": Profile(
        "smoke", "1-2 steps per stage on a few hundred documents (CI)",
        steps=_uniform(2, 1), train_sets=_SMOKE_TRAIN, finetune_sets=[],
        eval_sets=["eval.batch_size=4", "eval.max_batches=2"],
        standins={"lm1b": StandIn("PTB (stand-in for LM1B)", "ptb", 128, True, True, max_docs=600),
                  "owt": StandIn("BBC News (stand-in for OWT)", "bbc", 128, False, False, max_docs=60)},
        bpe_vocab=400, samples_fixed=1, samples_varlen=1, varlen_length=256, sampling_steps=8, judge="tiny",
        executor_jobs=1),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UserError(f"--scale: expected one of {sorted(PROFILES)}, found {name!r}")
    return PROFILES[name]
