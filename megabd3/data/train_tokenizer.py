"""Train a small byte-level BPE tokenizer on a training split (CPU-scale runs).

With GPT-2's 50k vocabulary the output head dominates a CPU training step (a d192 model spends most of
its time in a 50k x 192 matmul) and a few hundred steps cannot even beat a unigram model. The CPU
profiles therefore use a few-thousand-entry BPE trained on the stand-in's own *training* documents
only (never valid/test, so no evaluation text leaks into the vocabulary), saved as a Hugging Face
``PreTrainedTokenizerFast`` directory that :func:`megabd3.data.tokenizers.get_tokenizer` loads like
any local tokenizer. It carries the four specials BD3-LM needs: ``[BOS]`` ``[EOS]`` (also the document
separator), ``[PAD]`` and ``[MASK]`` (ids 0-3). The tokenizer name written into its config says what
it is ("bpe4096-ptb-train"), so reports never confuse it with GPT-2 or BERT.

Training is deterministic for the same input (one thread; documents in file order), and the
directory is written atomically: a killed run leaves no half-written tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

from megabd3.errors import UserError

SPECIALS = ["[BOS]", "[EOS]", "[PAD]", "[MASK]"]
STAMP = "megabd3_tokenizer.json"


def read_jsonl_texts(path: str | Path, text_key: str = "text", start: int = 0, end: Optional[int] = None) -> List[str]:
    """Texts of documents [start, end) of a jsonl file (negative indices count from the end)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} not found; run `python tools/fetch_assets.py text` first")
    with open(p, encoding="utf-8") as f:
        rows = [json.loads(line)[text_key] for line in f if line.strip()]
    return rows[start:end]


def train_bpe(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int, name: str,
              min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir`` (atomic, idempotent by stamp)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    texts = list(texts)
    ident = {"name": name, "vocab_size": vocab_size, "min_frequency": min_frequency, "docs": len(texts),
             "chars": sum(len(t) for t in texts)}
    if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == ident:
        return out
    if vocab_size < 300:
        raise UserError(f"BPE vocab_size must be >= 300 (256 bytes + specials + merges), found {vocab_size}")
    os.environ["RAYON_NUM_THREADS"] = "1"  # deterministic merges regardless of the core count
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_batched(texts), trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   mask_token="[MASK]", name_or_path=name, clean_up_tokenization_spaces=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fast.save_pretrained(str(tmp))
        (tmp / STAMP).write_text(json.dumps(ident, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _batched(texts: List[str], size: int = 1000) -> Iterator[List[str]]:
    for i in range(0, len(texts), size):
        yield texts[i:i + size]
