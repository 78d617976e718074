"""Megatron MMIDIDX v1 indexed datasets: a memory-mapped reader and an atomic streaming writer.

Byte layout (little-endian; megatron_format.md §8.1)::

    0   9    magic b"MMIDIDX\\x00\\x00"
    9   8    uint64 version = 1
    17  1    uint8 dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    18  8    uint64 N = sequence count
    26  8    uint64 D = document count + 1 (entries of document_indices)
    34       int32[N] sequence lengths | int64[N] byte pointers into .bin | int64[D] document_indices

``.bin`` is the headerless concatenation of the token arrays. Files written here are read by
megatron-core's ``IndexedDataset`` and vice versa (tests/unit/test_data_indexed.py).

Writers never leave a valid-looking pair behind when killed: both files are written under temporary
names, then any old ``.idx`` is removed, ``.bin`` renamed, and ``.idx`` renamed last (the commit point).
The reader also checks that ``.bin`` is exactly as long as the index says, so a pair from two different
runs is rejected.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megabd3.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"
HEADER_SIZE = 34
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def optimal_dtype(vocab_size: int) -> type:
    """uint16 when every id fits with margin (Megatron's rule: vocab < 65500), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def exists(prefix: str | os.PathLike) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


class IndexedDataset:
    """Read-only MMIDIDX v1 dataset. ``ds[i]`` is sequence ``i`` as a numpy view of the memory map.

    Attributes: ``sizes`` (int32 tokens per sequence), ``pointers`` (int64 byte offsets), ``doc_idx``
    (int64 sequence boundaries of documents), ``dtype``. With one sequence per document (what
    ``tools/preprocess_data.py`` writes) sequences and documents coincide.
    """

    def __init__(self, prefix: str | os.PathLike, check_bin: bool = True) -> None:
        self.prefix = str(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise UserError(f"dataset file {p} not found; check the prefix (without .bin/.idx) or run tools/preprocess_data.py")
        idx_size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:len(LEGACY_MAGIC)] == LEGACY_MAGIC:
            raise UserError(f"{ipath} is a legacy fairseq/Megatron 'TNTIDX' index, not MMIDIDX; re-run tools/preprocess_data.py on the source text")
        if len(header) < HEADER_SIZE or header[:9] != MAGIC:
            raise UserError(f"{ipath} is not a Megatron MMIDIDX index (magic {header[:9]!r}, expected {MAGIC!r}); the file is corrupt or not an index")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != 1:
            raise UserError(f"{ipath} has MMIDIDX version {version}, only version 1 is supported; re-run tools/preprocess_data.py")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPES:
            raise UserError(f"{ipath} has unknown dtype code {code} (expected one of {sorted(DTYPES)}); the index is corrupt")
        self.dtype = np.dtype(DTYPES[code])
        n, d = struct.unpack("<QQ", header[18:34])
        need = HEADER_SIZE + 12 * n + 8 * d
        if idx_size < need:
            raise UserError(f"{ipath} is truncated ({idx_size} bytes, the header promises {need}); re-run tools/preprocess_data.py")
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        self.sizes = np.frombuffer(self._idx, dtype=np.int32, count=n, offset=off)
        off += 4 * n
        self.pointers = np.frombuffer(self._idx, dtype=np.int64, count=n, offset=off)
        off += 8 * n
        self.doc_idx = np.frombuffer(self._idx, dtype=np.int64, count=d, offset=off)
        if d == 0 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n:
            raise UserError(f"{ipath}: document_indices must run from 0 to the sequence count {n}; the index is corrupt")
        bin_size = os.path.getsize(bpath)
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if check_bin and bin_size != expected:
            what = "truncated" if bin_size < expected else "longer than its index"
            raise UserError(f"{bpath} is {what} ({bin_size} bytes, {ipath} describes {expected}); "
                            "the pair is from an interrupted or different run: re-run tools/preprocess_data.py")
        self._bin = np.memmap(bpath, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    # -- access ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def token_offsets(self) -> np.ndarray:
        """Element (not byte) offset of each sequence in the token stream."""
        return self.pointers // self.dtype.itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i = i % len(self)
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of sequence ``i`` (Megatron's ``IndexedDataset.get``)."""
        seq = self[i]
        return seq[offset:] if length is None else seq[offset:offset + length]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the whole concatenated stream (sequences laid end to end in .bin)."""
        return self._bin[start:stop]

    @property
    def stream(self) -> np.ndarray:
        return self._bin


class IndexedDatasetWriter:
    """Streaming MMIDIDX v1 writer. Indices are kept as numpy chunks, never per-document Python lists.

    ``add_document(tokens)`` or ``add_documents(flat, lengths)`` (vectorised), then ``finalize()``, which
    publishes ``<prefix>.bin`` / ``<prefix>.idx`` atomically. ``abort()`` (or an exception inside a
    ``with`` block) removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.uint16) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise UserError(f"token dtype {self.dtype} has no MMIDIDX code; use uint16 or int32")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        self._tmp_bin = bin_path(self.prefix) + tag
        self._tmp_idx = idx_path(self.prefix) + tag
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self._count = 0
        self._done = False

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        self.add_documents(arr, np.array([arr.size], dtype=np.int64))

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: ``flat`` is their concatenation, ``lengths`` their sizes."""
        flat = np.asarray(flat)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum {int(lengths.sum())} != {flat.size} tokens")
        if flat.size and (flat.min() < np.iinfo(self.dtype).min or flat.max() > np.iinfo(self.dtype).max):
            raise UserError(f"token id {int(flat.max())} does not fit the dataset dtype {self.dtype}; use int32 (a vocab >= 65500)")
        if lengths.size and lengths.max() >= 2**31:
            raise UserError("a document has >= 2^31 tokens, more than MMIDIDX can index; split it")
        self._bin.write(flat.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths.astype(np.int32))
        self._count += lengths.size

    def append_dataset(self, ds: IndexedDataset, first: int = 0, last: Optional[int] = None) -> None:
        """Byte-copy sequences ``first:last`` of another dataset (same dtype), like Megatron's ``add_index``."""
        last = len(ds) if last is None else last
        if ds.dtype != self.dtype:
            raise ValueError(f"cannot merge {ds.dtype} into {self.dtype}")
        if last <= first:
            return
        start = int(ds.pointers[first]) // ds.dtype.itemsize
        stop = int(ds.pointers[last - 1]) // ds.dtype.itemsize + int(ds.sizes[last - 1])
        stream = ds.stream
        step = 1 << 24  # copy in 16M-token pieces: bounded memory for large shards
        for s in range(start, stop, step):
            self._bin.write(np.asarray(stream[s:min(stop, s + step)]).tobytes())
        self._lengths.append(np.array(ds.sizes[first:last], dtype=np.int32))
        self._count += last - first

    def __len__(self) -> int:
        return self._count

    def finalize(self, commit: bool = True) -> None:
        """Write the index, then publish. With ``commit=False`` leave the temporary pair for :meth:`commit`."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(lengths.size + 1, dtype=np.int64)  # one sequence per document
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", doc_idx.size))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._done = True
        if commit:
            self.commit()

    def commit(self, before_idx=None) -> None:
        """Publish: drop any old .idx first, then rename .bin, (run ``before_idx``), and .idx last."""
        final_idx = idx_path(self.prefix)
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        if before_idx is not None:
            before_idx()
        os.replace(self._tmp_idx, final_idx)

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()
