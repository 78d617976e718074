"""Fixed-length training samples cut from an indexed dataset: ``wrap`` and ``pad`` modes.

* ``wrap`` (OWT/bd3lms default): the documents (each already ending in EOD) are laid end to end in
  dataset order and cut into windows of C tokens, C = L, or C = L-2 with ``chunk_special_tokens``, in
  which case each sample is ``[BOS] + window + [EOS]`` (the reference's ``insert_*_special``). The
  remainder after the last full window is dropped. The reference packs within each 1,000-document
  ``map`` batch (dropping a remainder every 1,000 documents); here packing is global, a documented and
  deliberate difference (megatron_format.md §8.2).
* ``pad`` (LM1B no-wrap): one document per sample, truncated to L (after a leading [BOS] with
  ``chunk_special_tokens``) and right-padded with ``tokenizer.pad_id`` (never the mask id); the attention
  mask is False on padding.

Sample order: identity, or a permutation drawn from ``numpy.random.default_rng(seed)`` when ``shuffle``.
The index (window starts as (document, offset) pairs, and the permutation) is cached as ``.npy`` files
named by the MD5 of a JSON description, which is written beside them (``<hash>-description.json``).
Writes are atomic; with torch.distributed initialised, rank 0 builds and the others wait, then load
(and build themselves if the cache directory is not shared).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from megabd3.data.indexed import IndexedDataset
from megabd3.errors import UserError
from megabd3.io import atomic_save_with, atomic_write_text

MODES = ("wrap", "pad")


def wrap_sample_starts(sizes: np.ndarray, content_len: int) -> np.ndarray:
    """[N, 2] (document, offset) of the first token of every full ``content_len`` window (numpy only)."""
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    n = int(cum[-1]) // content_len
    starts = np.arange(n, dtype=np.int64) * content_len
    doc = np.searchsorted(cum, starts, side="right") - 1
    return np.stack([doc, starts - cum[doc]], axis=1)


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    atomic_save_with(path, lambda fh: np.save(fh, arr))


def _dist_info() -> tuple[bool, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank()
    return False, 0


class SampleDataset(torch.utils.data.Dataset):
    """``len`` samples; ``ds[i] -> {"input_ids": LongTensor[L], "attention_mask": BoolTensor[L]}``."""

    def __init__(self, prefix: str, seq_len: int, mode: str, tokenizer, seed: int = 1, shuffle: bool = True,
                 chunk_special_tokens: bool = False, cache_dir: Optional[str] = None) -> None:
        if mode not in MODES:
            raise UserError(f"data.mode must be one of {MODES}, found {mode!r}")
        if seq_len < (3 if chunk_special_tokens else 1):
            raise UserError(f"data.seq_len {seq_len} is too short (needs >= 3 with chunk_special_tokens)")
        self.prefix = str(prefix)
        self.seq_len = seq_len
        self.mode = mode
        self.specials = chunk_special_tokens
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        if self.pad_id == tokenizer.mask_id:
            raise UserError(f"tokenizer {tokenizer.name}: pad id equals the mask id {tokenizer.mask_id}")
        self.seed, self.shuffle = seed, shuffle
        self.data = IndexedDataset(prefix)
        self.content_len = seq_len - 2 if (mode == "wrap" and chunk_special_tokens) else seq_len
        self.cache_dir = Path(cache_dir) if cache_dir else Path(f"{self.prefix}_cache")
        self.description = {
            "class": "megabd3.SampleDataset", "version": 1, "prefix": os.path.abspath(self.prefix),
            "idx_bytes": os.path.getsize(f"{self.prefix}.idx"), "num_sequences": len(self.data),
            "num_tokens": self.data.num_tokens, "seq_len": seq_len, "mode": mode,
            "chunk_special_tokens": chunk_special_tokens, "seed": seed, "shuffle": shuffle,
        }
        self.key = hashlib.md5(json.dumps(self.description, sort_keys=True).encode()).hexdigest()
        self.index, self.order = self._load_or_build()
        if len(self.order) == 0:
            raise UserError(f"{prefix}: {self.data.num_tokens} tokens make no {mode} sample of length {seq_len}; "
                            "use more data or a shorter data.seq_len")
        self._offsets = self.data.token_offsets()

    # -- index -----------------------------------------------------------------------------------------
    def _build(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "wrap":
            index = wrap_sample_starts(self.data.sizes, self.content_len)
        else:
            index = np.arange(len(self.data), dtype=np.int64)[:, None]
        n = len(index)
        order = np.random.default_rng(self.seed).permutation(n) if self.shuffle else np.arange(n, dtype=np.int64)
        return index, order.astype(np.int64)

    def _paths(self) -> Dict[str, Path]:
        return {k: self.cache_dir / f"{self.key}-{k}" for k in ("index.npy", "order.npy", "description.json")}

    def _save(self, index: np.ndarray, order: np.ndarray) -> None:
        p = self._paths()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            _atomic_save(p["index.npy"], index)
            _atomic_save(p["order.npy"], order)
            # written last: marks the cache complete
            atomic_write_text(p["description.json"], json.dumps(self.description, indent=1, sort_keys=True))
        except OSError as exc:
            raise UserError(f"cannot write the sample-index cache in {self.cache_dir} ({exc.strerror}); set data.cache_dir to a writable directory") from None

    def _try_load(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        p = self._paths()
        if not p["description.json"].is_file():
            return None
        try:
            if json.loads(p["description.json"].read_text()) != json.loads(json.dumps(self.description)):
                return None
            return np.load(p["index.npy"], mmap_mode="r"), np.load(p["order.npy"], mmap_mode="r")
        except (OSError, ValueError):
            return None

    def _load_or_build(self) -> tuple[np.ndarray, np.ndarray]:
        distributed, rank = _dist_info()
        got = self._try_load()
        if got is not None:
            if distributed:
                torch.distributed.barrier()  # rank 0 also waits here in the build branch below
            return got
        if distributed and rank != 0:
            torch.distributed.barrier()  # let rank 0 build and publish
            got = self._try_load()
            if got is not None:
                return got
            index, order = self._build()  # cache dir not shared with rank 0: build locally
            self._save(index, order)
            return index, order
        index, order = self._build()
        self._save(index, order)
        if distributed:
            torch.distributed.barrier()
        return index, order

    # -- access ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.order)

    def tokens_of(self, j: int) -> np.ndarray:
        """Unshuffled sample ``j`` as int64 tokens (before padding)."""
        if self.mode == "wrap":
            doc, off = (int(v) for v in self.index[j])
            start = int(self._offsets[doc]) + off  # documents are contiguous in .bin (MMIDIDX pointers)
            body = np.asarray(self.data.tokens(start, start + self.content_len), dtype=np.int64)
            if self.specials:
                body = np.concatenate([[self.bos_id], body, [self.eos_id]])
            return body
        seq = np.asarray(self.data[int(self.index[j, 0])], dtype=np.int64)
        if self.specials:
            seq = np.concatenate([[self.bos_id], seq])
        return seq[: self.seq_len]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        toks = self.tokens_of(int(self.order[i]))
        L = self.seq_len
        ids = np.full(L, self.pad_id, dtype=np.int64)
        ids[: toks.size] = toks
        mask = np.zeros(L, dtype=bool)
        mask[: toks.size] = True
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
