"""MMIDIDX v1: byte compatibility with megatron-core both ways, corrupt files, atomic publication."""
import os
import struct
import warnings

import numpy as np
import pytest
import torch

from megabd3.data.indexed import IndexedDataset, IndexedDatasetWriter
from megabd3.errors import UserError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def _docs(dtype=np.uint16, n=60, seed=0, high=50000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 40))).astype(dtype) for _ in range(n)]


def _write_ours(prefix, docs, dtype):
    w = IndexedDatasetWriter(prefix, dtype)
    # half one by one, half vectorised: both paths must give the same file
    for d in docs[:30]:
        w.add_document(d)
    rest = docs[30:]
    w.add_documents(np.concatenate(rest), np.array([len(d) for d in rest]))
    w.finalize()


def _write_megatron(prefix, docs, dtype):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        b.add_item(torch.tensor(d.astype(np.int64)))
        b.end_document()
    b.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_ours_and_golden_bytes(tmp_path, dtype):
    docs = _docs(dtype)
    _write_ours(tmp_path / "ours", docs, dtype)
    m = MegatronDataset(str(tmp_path / "ours"))
    assert len(m) == len(docs) and m.index.dtype == dtype
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(m[i], d)
    _write_megatron(tmp_path / "meg", docs, dtype)
    for ext in (".idx", ".bin"):  # identical bytes to megatron-core's own writer
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"meg{ext}").read_bytes()


def test_ours_reads_megatron_with_multi_sequence_documents(tmp_path):
    docs = _docs(np.int32, n=20, seed=1)
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for k in range(0, 20, 4):  # documents of 4 sequences each (sentence-split style)
        b.add_document(torch.tensor(np.concatenate(docs[k:k + 4])), [len(d) for d in docs[k:k + 4]])
    b.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32 and len(ds) == 20 and ds.num_documents == 5
    np.testing.assert_array_equal(ds.doc_idx, [0, 4, 8, 12, 16, 20])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.get(i, 1, 3), d[1:4])


def _valid_pair(tmp_path):
    _write_ours(tmp_path / "d", _docs(), np.uint16)
    return tmp_path / "d"


@pytest.mark.parametrize("corrupt,needle", [
    (lambda b: b"XXXXXXXXX" + b[9:], "not a Megatron MMIDIDX"),
    (lambda b: b"TNTIDX\x00\x00" + b[8:], "legacy"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
    (lambda b: b[:17] + bytes([9]) + b[18:], "dtype code 9"),
    (lambda b: b[:40], "truncated"),
])
def test_corrupt_idx_is_one_line_error(tmp_path, corrupt, needle):
    p = _valid_pair(tmp_path)
    idx = tmp_path / "d.idx"
    idx.write_bytes(corrupt(idx.read_bytes()))
    with pytest.raises(UserError) as e:
        IndexedDataset(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_truncated_or_foreign_bin(tmp_path):
    p = _valid_pair(tmp_path)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    with pytest.raises(UserError, match="truncated"):
        IndexedDataset(p)
    (tmp_path / "d.bin").write_bytes(data + b"\x00\x00")
    with pytest.raises(UserError, match="longer than its index"):
        IndexedDataset(p)
    os.remove(tmp_path / "d.bin")
    with pytest.raises(UserError, match="not found"):
        IndexedDataset(p)


def test_interrupted_publication_never_leaves_a_valid_pair(tmp_path):
    p = _valid_pair(tmp_path)  # an old, valid dataset at the same prefix
    w = IndexedDatasetWriter(p, np.uint16)
    w.add_documents(np.arange(100, dtype=np.uint16), np.array([100]))
    w.finalize(commit=False)

    def crash():
        raise KeyboardInterrupt("killed between .bin and .idx")

    with pytest.raises(KeyboardInterrupt):
        w.commit(before_idx=crash)
    assert not (tmp_path / "d.idx").exists()  # the old index is gone before the new .bin lands
    with pytest.raises(UserError):
        IndexedDataset(p)
    # an exception inside the writer removes its temporary files and publishes nothing
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "e", np.uint16) as w2:
            w2.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith("e")) == []


def test_writer_rejects_ids_out_of_dtype(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    with pytest.raises(UserError, match="does not fit"):
        w.add_document(np.array([70000]))
    w.abort()
