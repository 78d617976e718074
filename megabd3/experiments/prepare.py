"""The data stage of the cpu/smoke profiles: stand-in corpora, their tokenizers, datasets and baselines.

For each dataset role (``lm1b``, ``owt``) of a profile with stand-ins:

1. the text asset (``tools/fetch_assets.py text``) is cut into train/valid/test documents (PTB: its
   Mikolov splits; BBC: documents 90% / 5% / 5% in the asset's category-interleaved order) and
   written as jsonl under ``<root>/text/``;
2. a byte-level BPE is trained on the *training* documents only (:mod:`megabd3.data.train_tokenizer`);
3. every split is preprocessed into Megatron ``.bin/.idx`` with that tokenizer (the same code path as
   ``tools/preprocess_data.py``);
4. the statistics the report prints beside the models: the unigram cross-entropy of the test split
   under add-one-smoothed training-split frequencies (a model that learned nothing scores about
   this), and document lengths of the training split (Table 6's "train set" row).

The owt role also gets zero-shot targets tokenized with *its* tokenizer: PTB test (stand-in for LM1B)
and a Wikipedia excerpt (stand-in for WikiText). There is no offline LAMBADA; that cell says so.
Finally the Gen PPL judge: SmolLM2-135M (``tools/fetch_assets.py judge``) or, for smoke, a tiny random
GPT-2 saved with the owt stand-in's tokenizer. Everything is idempotent (existing outputs are kept).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from megabd3.errors import UserError
from megabd3.eval.baselines import unigram_cross_entropy
from megabd3.experiments.profiles import Profile, StandIn
from megabd3.io import atomic_write_text

SPLITS = ("train", "valid", "test")
ZERO_SHOT_SOURCES = {"lm1b": "ptb_test", "wikitext": "wiki_excerpt"}


def data_root(root: Path) -> Path:
    return root / "data"


def paths(root: Path, role: str) -> Dict[str, str]:
    """Where the role's tokenizer and datasets live (what the training stages' --set points at)."""
    d = data_root(root)
    out = {"tokenizer": str(d / f"tok_{role}"), **{s: str(d / f"{role}_{s}") for s in SPLITS}}
    if role == "owt":
        out.update({f"zs_{k}": str(d / f"owt_zs_{k}") for k in ZERO_SHOT_SOURCES})
    return out


def stats_path(root: Path) -> Path:
    return data_root(root) / "stats.json"


def judge_path(root: Path, profile: Profile) -> str:
    if profile.judge == "tiny":
        return str(data_root(root) / "judge_tiny")
    if profile.judge == "smollm2-135m":
        from megabd3.eval.judge_assets import judge_dir

        return str(judge_dir())
    return profile.judge


def _read_jsonl(path: Path) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _documents(standin: StandIn, text: Path) -> Dict[str, List[str]]:
    if standin.source == "ptb":
        docs = {s: _read_jsonl(text / f"ptb_{s}.jsonl") for s in SPLITS}
    elif standin.source == "bbc":
        allx = _read_jsonl(text / "bbc.jsonl")
        a, b = int(0.9 * len(allx)), int(0.95 * len(allx))
        docs = {"train": allx[:a], "valid": allx[a:b], "test": allx[b:]}
    else:
        raise UserError(f"stand-in source {standin.source!r}: expected ptb or bbc")
    if standin.max_docs:
        keep = {"train": standin.max_docs, "valid": max(standin.max_docs // 10, 8), "test": max(standin.max_docs // 10, 8)}
        docs = {s: d[: keep[s]] for s, d in docs.items()}
    return docs


def _write_docs(path: Path, docs: List[str]) -> None:
    atomic_write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))


def _preprocess(jsonl: Path, tokenizer: str, prefix: str) -> None:
    from megabd3.data.indexed import exists
    from megabd3.data.preprocess import Job, run

    if exists(prefix) and Path(prefix + ".manifest.json").is_file():
        from megabd3.data.manifest import check_manifest
        from megabd3.data.tokenizers import get_tokenizer

        try:  # keep it only if it was made with this very tokenizer (name and hash)
            check_manifest(prefix, get_tokenizer(tokenizer), check_max_id_samples=0)
            return
        except UserError:
            pass
    run(Job(inputs=[str(jsonl)], tokenizer=tokenizer, workers=1), prefix, progress=False, log=lambda *a, **k: None)


def _stats(p: Dict[str, str], vocab: int) -> Dict[str, float]:
    from megabd3.data.indexed import IndexedDataset

    train, test = IndexedDataset(p["train"]), IndexedDataset(p["test"])
    ce = unigram_cross_entropy(np.asarray(train.stream), np.asarray(test.stream), vocab)
    lengths = np.asarray(train.sizes)  # one sequence per document (EOD included)
    return {"unigram_nelbo": ce, "unigram_ppl": math.exp(ce), "median_doc_tokens": float(np.median(lengths)),
            "max_doc_tokens": float(lengths.max()), "train_tokens": train.num_tokens, "test_tokens": test.num_tokens}


def _tiny_judge(out: Path, tokenizer_dir: str) -> None:
    if (out / "config.json").is_file():
        return
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)


def prepare(profile: Profile, root: Path) -> Dict[str, object]:
    """Build everything the profile's stages read; returns the statistics (also written to stats.json)."""
    from megabd3.data.assets import fetch_text
    from megabd3.data.tokenizers import get_tokenizer
    from megabd3.data.train_tokenizer import train_bpe

    if profile.standins is None:
        raise UserError(f"profile {profile.name} uses the configs' own data paths; preprocess them with tools/preprocess_data.py")
    text = fetch_text()
    out = data_root(root)
    out.mkdir(parents=True, exist_ok=True)
    stats: Dict[str, object] = {}
    for role, standin in profile.standins.items():
        p = paths(root, role)
        docs = _documents(standin, text)
        for split in SPLITS:
            _write_docs(out / f"{role}_{split}.jsonl", docs[split])
        train_bpe(docs["train"], p["tokenizer"], vocab_size=profile.bpe_vocab,
                  name=f"bpe{profile.bpe_vocab}-{standin.source}-train")
        for split in SPLITS:
            _preprocess(out / f"{role}_{split}.jsonl", p["tokenizer"], p[split])
        tok = get_tokenizer(p["tokenizer"])
        stats[role] = {"label": standin.label, "tokenizer": f"bpe{profile.bpe_vocab}-{standin.source}-train",
                       **_stats(p, tok.model_vocab_size)}
        if role == "owt":
            for target, src in ZERO_SHOT_SOURCES.items():
                docs_zs = _read_jsonl(text / f"{src}.jsonl")[: (standin.max_docs or 400)]
                _write_docs(out / f"owt_zs_{target}.jsonl", docs_zs)
                _preprocess(out / f"owt_zs_{target}.jsonl", p["tokenizer"], p[f"zs_{target}"])
    if profile.judge == "tiny":
        _tiny_judge(Path(judge_path(root, profile)), paths(root, "owt")["tokenizer"])
    elif profile.judge == "smollm2-135m":
        from megabd3.eval.judge_assets import fetch_judge

        fetch_judge()
    stats["judge"] = judge_path(root, profile)
    atomic_write_text(stats_path(root), json.dumps(stats, indent=1) + "\n")
    return stats


def zero_shot_labels() -> Dict[str, Tuple[str, str]]:
    """Target -> (source description, why) for the report."""
    return {"lm1b": ("PTB test (stand-in for LM1B)", ""), "wikitext": ("Wikipedia excerpt (stand-in for WikiText)", ""),
            "lambada": ("", "no offline LAMBADA: no package on the registries ships it")}
