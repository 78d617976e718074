"""Sample index (wrap/pad) vs a brute-force reference, shuffle determinism, cache, resumable DP sampler."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from megabd3.data.indexed import IndexedDatasetWriter
from megabd3.data.loader import ResumableDistributedSampler
from megabd3.data.samples import SampleDataset

TOK = SimpleNamespace(name="toy", bos_id=1, eos_id=2, pad_id=0, mask_id=99, eod_id=2, vocab_size=99)


@pytest.fixture()
def data(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(3, 99, size=int(rng.integers(0, 30))), 2).astype(np.uint16) for _ in range(50)]
    w = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return str(tmp_path / "d"), docs


def brute_wrap(docs, L, specials):
    stream = [int(t) for d in docs for t in d]  # the reference: concatenate, cut, drop the remainder
    C = L - 2 if specials else L
    chunks = [stream[i:i + C] for i in range(0, len(stream) - C + 1, C)]
    return [[1] + c + [2] if specials else c for c in chunks]


@pytest.mark.parametrize("L,specials", [(16, False), (16, True), (7, False), (3, True)])
def test_wrap_matches_brute_force(data, tmp_path, L, specials):
    prefix, docs = data
    ds = SampleDataset(prefix, L, "wrap", TOK, shuffle=False, chunk_special_tokens=specials, cache_dir=tmp_path / "c")
    ref = brute_wrap(docs, L, specials)
    assert len(ds) == len(ref)
    for i, r in enumerate(ref):
        s = ds[i]
        assert s["input_ids"].tolist() == r and bool(s["attention_mask"].all())


@pytest.mark.parametrize("L,specials", [(8, False), (8, True), (40, False)])
def test_pad_matches_brute_force(data, tmp_path, L, specials):
    prefix, docs = data
    ds = SampleDataset(prefix, L, "pad", TOK, shuffle=False, chunk_special_tokens=specials, cache_dir=tmp_path / "c")
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):
        body = ([1] if specials else []) + d.tolist()
        body = body[:L]
        s = ds[i]
        assert s["input_ids"].tolist() == body + [0] * (L - len(body))
        assert s["attention_mask"].tolist() == [True] * len(body) + [False] * (L - len(body))
        assert 99 not in s["input_ids"].tolist()  # padding never looks like the mask token


def test_shuffle_is_deterministic_and_a_permutation(data, tmp_path):
    prefix, _ = data
    mk = lambda seed, c: SampleDataset(prefix, 8, "wrap", TOK, seed=seed, shuffle=True, cache_dir=tmp_path / c)  # noqa: E731
    plain = SampleDataset(prefix, 8, "wrap", TOK, shuffle=False, cache_dir=tmp_path / "p")
    a, b, c = mk(1, "a"), mk(1, "b"), mk(2, "a")
    rows = lambda ds: [tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))]  # noqa: E731
    assert rows(a) == rows(b) and rows(a) != rows(c)
    assert sorted(rows(a)) == sorted(rows(plain))
    expected = np.random.default_rng(1).permutation(len(plain))
    assert rows(a) == [rows(plain)[j] for j in expected]


def test_cache_written_with_description_and_reused(data, tmp_path):
    prefix, _ = data
    ds = SampleDataset(prefix, 8, "wrap", TOK, seed=3, cache_dir=tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == sorted(f"{ds.key}-{k}" for k in ("index.npy", "order.npy", "description.json"))
    desc = json.loads((tmp_path / "c" / f"{ds.key}-description.json").read_text())
    assert desc["seq_len"] == 8 and desc["mode"] == "wrap" and desc["seed"] == 3
    again = SampleDataset(prefix, 8, "wrap", TOK, seed=3, cache_dir=tmp_path / "c")
    assert isinstance(again.order, np.memmap)  # loaded from the cache, not rebuilt
    assert [again[i]["input_ids"].tolist() for i in range(5)] == [ds[i]["input_ids"].tolist() for i in range(5)]


def _global_stream(n, mbs, dp, steps, consumed=0, shuffle=True):
    """Per micro-step, the concatenation of every rank's batch (rank order)."""
    its = [iter(ResumableDistributedSampler(n, r, dp, mbs, consumed, shuffle=shuffle, seed=7)) for r in range(dp)]
    return [sum((next(it) for it in its), []) for _ in range(steps)]


def test_sampler_resume_equals_uninterrupted_across_epochs():
    full = _global_stream(n=10, mbs=2, dp=2, steps=12)
    resumed = _global_stream(n=10, mbs=2, dp=2, steps=7, consumed=5 * 4)
    assert full[5:] == resumed
    flat = sum(full, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] == list(range(10)) and flat[10:20] != list(range(10))  # epoch 1 reshuffled


def test_dp_size_change_keeps_global_batches():
    G = 8  # global batch size kept fixed: dp 2 x mbs 2 x accum 2  ->  dp 4 x mbs 2 x accum 1
    old = sum(_global_stream(n=13, mbs=2, dp=2, steps=6), [])
    new = sum(_global_stream(n=13, mbs=2, dp=4, steps=3, consumed=2 * G), [])
    ref = sum(_global_stream(n=13, mbs=2, dp=2, steps=10), [])
    assert old == ref[:len(old)]
    assert new == ref[2 * G:5 * G]  # global batches 2..4 hold the same samples in the same order
    with pytest.raises(Exception, match="multiple"):
        ResumableDistributedSampler(13, 0, 4, 2, consumed_samples=12)


def test_eval_sampler_covers_split_once_with_padding():
    batches = [list(ResumableDistributedSampler(7, r, 2, 2, infinite=False)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 2
    seen = [i for r in range(2) for b in batches[r] for i in b if i >= 0]
    assert sorted(seen) == list(range(7)) and sum(i < 0 for r in range(2) for b in batches[r] for i in b) == 1
