"""Tokenizers with the special ids BD3-LM needs: mask, BOS/EOS, the per-document EOD and a safe pad.

``get_tokenizer(name)`` resolves, in order:

1. ``gpt2`` / ``bert-base-uncased`` from the offline cache ``$MEGABD3_HOME/tokenizers/<name>`` (built by
   ``tools/fetch_assets.py tokenizers``);
2. a local Hugging Face tokenizer directory;
3. a Hub name through ``AutoTokenizer.from_pretrained`` (connected clusters; fails fast offline).

Special ids (bd3lms_spec.md §7):

* GPT-2: vocab 50257; ``<|endoftext|>`` 50256 is BOS = EOS = EOD; the mask token is *appended* as id 50257,
  so the model vocabulary is 50258. Padding uses 50256 (with an attention mask) — never the mask id (the
  reference's ``[PAD]`` == mask trap).
* bert-base-uncased: vocab 30522, [MASK] 103, pad 0, BOS = [CLS] 101. The reference resolves its EOS
  with ``tokenizer.encode(eos_token)[0]``, which for BERT yields **[CLS] (101), not [SEP]**, so LM1B
  documents are separated by 101. That is the default here (``reference_separator=True``); pass
  ``reference_separator=False`` to use [SEP] 102 as EOS/EOD instead. The choice is recorded in the
  tokenizer hash, so a dataset built one way cannot be trained with the other by accident.

GPT-2 batch encoding uses tiktoken (same ids as the HF tokenizer; a test checks this on real text); all
other tokenizers use the Rust ``tokenizers`` backend in batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, List, Optional, Sequence

from megabd3.data.assets import GPT2_RANKS_SHA256, tokenizer_dir
from megabd3.errors import UserError

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
KNOWN = ("gpt2", "bert-base-uncased")


def _load_hf(path_or_name: str):
    from transformers import AutoTokenizer

    # never run repository code for a tokenizer: an exported HF model directory carries an auto_map for
    # the model classes, and transformers 5 would otherwise ask to run it on an interactive terminal
    return AutoTokenizer.from_pretrained(path_or_name, trust_remote_code=False)


class Tokenizer:
    """A text tokenizer plus the special ids of a BD3 model (see the module docstring)."""

    def __init__(self, name: str, *, hf_source: str, vocab_size: int, mask_id: int, bos_id: int, eos_id: int,
                 eod_id: int, pad_id: int, model_vocab_size: int, tiktoken_ranks: Optional[Path] = None,
                 hf: Any = None, extra_identity: Optional[dict] = None,
                 vocab_file: Optional[Path] = None) -> None:
        if pad_id == mask_id:
            raise UserError(f"tokenizer {name}: pad id {pad_id} equals the mask id; padding must never look like a masked token")
        self.name = name
        self.vocab_size = vocab_size
        self.model_vocab_size = model_vocab_size
        self.mask_id = mask_id
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eod_id = eod_id
        self.pad_id = pad_id
        self._hf_source = hf_source
        self._hf = hf
        self._ranks_path = tiktoken_ranks
        self._tiktoken = None
        self._extra_identity = extra_identity or {}
        self._vocab_file = vocab_file

    # -- backends (lazy: preprocessing workers need only the fast encoder) -----------------------------
    @property
    def hf(self):
        """The Hugging Face tokenizer (loaded on first use)."""
        if self._hf is None:
            self._hf = _load_hf(self._hf_source)
        return self._hf

    @property
    def tiktoken(self):
        """A ``tiktoken.Encoding`` for GPT-2, or None for other tokenizers."""
        if self._tiktoken is None and self._ranks_path is not None:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe

            ranks = load_tiktoken_bpe(str(self._ranks_path), expected_hash=GPT2_RANKS_SHA256)
            self._tiktoken = tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=GPT2_PAT,
                                               mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
        return self._tiktoken

    def __getstate__(self) -> dict:  # picklable for DataLoader workers / spawn: drop the live backends
        state = dict(self.__dict__)
        state["_hf"] = None
        state["_tiktoken"] = None
        state.pop("hash", None)
        return state

    # -- encoding --------------------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        """Token ids of each text, without special tokens (EOD is appended by the caller)."""
        enc = self.tiktoken
        if enc is not None:
            # a literal "<|endoftext|>" in the text becomes id 50256, exactly as the HF GPT-2 tokenizer does
            # (its added special tokens are matched even with add_special_tokens=False)
            return enc.encode_batch(list(texts), num_threads=num_threads, allowed_special="all")
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.hf.encode(t, add_special_tokens=False) for t in texts]

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def _decode_plain(self, ids: List[int]) -> str:
        enc = self.tiktoken
        if enc is not None:  # same text as the HF GPT-2 decode (bytes joined, errors="replace")
            return enc.decode(ids, errors="replace")
        return self.hf.decode(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the appended mask id (not in the tokenizer) is shown as ``[MASK]``."""
        ids = [int(i) for i in ids]
        if self.mask_id >= self.vocab_size:
            out, run = [], []
            for i in ids:
                if i == self.mask_id:
                    out.append(self._decode_plain(run) if run else "")
                    out.append("[MASK]")
                    run = []
                else:
                    run.append(i)
            out.append(self._decode_plain(run) if run else "")
            return "".join(out)
        return self._decode_plain(ids)

    def vocab(self) -> dict:
        """token -> id (read straight from the cached vocab.json when there is one: no transformers import)."""
        if self._vocab_file is not None:
            with open(self._vocab_file, encoding="utf-8") as f:
                if self._vocab_file.suffix == ".txt":  # WordPiece vocab.txt: one token per line, id = line number
                    return {tok: i for i, tok in enumerate(f.read().splitlines())}
                return json.load(f)
        return self.hf.get_vocab()

    # -- identity --------------------------------------------------------------------------------------
    @cached_property
    def hash(self) -> str:
        """sha256 of the vocabulary (token -> id) and the special ids: the identity stored in manifests."""
        vocab = self.vocab()
        h = hashlib.sha256()
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
        h.update(json.dumps(self.special_ids(), sort_keys=True).encode())
        h.update(json.dumps(self._extra_identity, sort_keys=True).encode())
        return h.hexdigest()

    def special_ids(self) -> dict:
        return {"vocab_size": self.vocab_size, "model_vocab_size": self.model_vocab_size, "mask_id": self.mask_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "eod_id": self.eod_id, "pad_id": self.pad_id}

    def describe(self) -> dict:
        """What a manifest records about the tokenizer."""
        return {"name": self.name, "hash": self.hash, **self.special_ids()}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab={self.vocab_size}, model_vocab={self.model_vocab_size}, mask={self.mask_id}, eod={self.eod_id})"


def _gpt2(hf_source: str, hf: Any = None, ranks: Optional[Path] = None, vocab_file: Optional[Path] = None) -> Tokenizer:
    return Tokenizer("gpt2", hf_source=hf_source, hf=hf, vocab_size=50257, mask_id=50257, bos_id=50256, eos_id=50256,
                     eod_id=50256, pad_id=50256, model_vocab_size=50258, tiktoken_ranks=ranks, vocab_file=vocab_file)


def _bert(hf_source: str, reference_separator: bool, hf: Any = None, vocab_file: Optional[Path] = None) -> Tokenizer:
    sep = 101 if reference_separator else 102
    return Tokenizer("bert-base-uncased", hf_source=hf_source, hf=hf, vocab_size=30522, mask_id=103, bos_id=101,
                     eos_id=sep, eod_id=sep, pad_id=0, model_vocab_size=30522,
                     extra_identity={"reference_separator": reference_separator}, vocab_file=vocab_file)


def _generic(name: str, hf: Any) -> Tokenizer:
    """Any HF tokenizer: reuse its mask token if it has one, else append one (like GPT-2)."""
    vocab = len(hf)
    if hf.mask_token_id is not None:
        mask, model_vocab = hf.mask_token_id, vocab
    else:
        mask, model_vocab = vocab, vocab + 1
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    bos = hf.bos_token_id if hf.bos_token_id is not None else (hf.cls_token_id if hf.cls_token_id is not None else eos)
    if eos is None:
        raise UserError(f"tokenizer {name} has no eos/sep token to separate documents; use a tokenizer that defines eos_token")
    pad = hf.pad_token_id if hf.pad_token_id is not None and hf.pad_token_id != mask else eos
    return Tokenizer(name, hf_source=name, hf=hf, vocab_size=vocab, mask_id=mask, bos_id=bos if bos is not None else eos,
                     eos_id=eos, eod_id=eos, pad_id=pad, model_vocab_size=model_vocab)


def _cache_complete(folder: Path, files: Sequence[str]) -> bool:
    return all((folder / f).is_file() for f in files)


_CACHE: dict = {}


def get_tokenizer(name: str, reference_separator: bool = True) -> Tokenizer:
    """The tokenizer ``name``: gpt2, bert-base-uncased, a local HF tokenizer directory or a Hub name.

    Instances are cached per process (loading the HF files takes ~0.3 s).
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"data.tokenizer must be a tokenizer name or directory, found {name!r}")
    key = (name, reference_separator)
    if key not in _CACHE:
        _CACHE[key] = _resolve(name, reference_separator)
    return _CACHE[key]


def _resolve(name: str, reference_separator: bool) -> Tokenizer:
    if name == "gpt2":
        d = tokenizer_dir("gpt2")
        if _cache_complete(d, ["vocab.json", "merges.txt", "tokenizer_config.json", "gpt2.tiktoken"]):
            return _gpt2(str(d), ranks=d / "gpt2.tiktoken", vocab_file=d / "vocab.json")
        return _gpt2("gpt2", hf=_from_hub(name))
    if name == "bert-base-uncased":
        d = tokenizer_dir(name)
        if _cache_complete(d, ["vocab.txt", "tokenizer_config.json"]):
            return _bert(str(d), reference_separator, vocab_file=d / "vocab.txt")
        return _bert(name, reference_separator, hf=_from_hub(name))
    if os.path.isdir(name):
        try:
            hf = _load_hf(name)
        except Exception as exc:  # transformers raises many types for a bad directory
            raise UserError(f"cannot load a tokenizer from directory {name} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                            "it needs tokenizer_config.json plus the vocab files") from None
        return _generic(os.path.abspath(name), hf)
    return _generic(name, _from_hub(name))


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hub cache holds tokenizer files for ``name`` (True when it cannot tell)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True
    for f in ("tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt"):
        try:
            if isinstance(try_to_load_from_cache(name, f), str):
                return True
        except Exception:  # an invalid repo id: certainly not cached
            return False
    return False


def _unknown(name: str, why: str) -> UserError:
    return UserError(f"unknown tokenizer {name!r} (not in $MEGABD3_HOME/tokenizers, not a directory, {why}); "
                     f"run `python tools/fetch_assets.py tokenizers` for {' / '.join(KNOWN)}, or pass a local tokenizer directory")


def _from_hub(name: str):
    # offline and not cached: fail at once instead of importing transformers (seconds) to learn the same
    if _hub_offline() and not _in_hub_cache(name):
        raise _unknown(name, "Hub offline and not in its cache")
    try:
        return _load_hf(name)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise _unknown(name, f"Hub load failed: {first}") from None
