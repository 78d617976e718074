"""Stop rules when the EOS and the entropy rule fire at the same check: the reference's order wins.

``reference_check_stop_conds`` transcribes ``_check_stop_conds`` (spec 5.4) for one sample: the
entropy flag first, then (variable length) the EOS truncation after the second EOS id, then the
entropy truncation ``len - 256`` that overwrites it.
"""
from __future__ import annotations

import pytest
import torch

from megabd3.sampling.common import SamplerOptions, StopTracker
from megabd3.sampling.stopping import check_stop

EOD = 0  # GPT-2: BOS == EOS, so position 0 is the first EOS id


def reference_check_stop_conds(x: list, eos: int, var_length: bool) -> tuple:
    t = torch.tensor([x])
    _, counts = torch.unique(t[:, -256:], return_counts=True, sorted=False)
    entropy = torch.special.entr(counts.float() / counts.sum()).sum()
    stop, truncate_idx = False, None
    if entropy < 4:
        stop = True
    if var_length:
        if len(torch.where(t == eos)[0]) > 1:
            stop = True
            eos_idx = torch.where(t == eos)
            if len(eos_idx[0]) > 1:
                truncate_idx = min(int(eos_idx[1][1]) + 1, t.shape[1])
        if entropy < 4:
            stop = True
            truncate_idx = t.shape[1] - 256
    if truncate_idx is not None:
        t = t[:, :truncate_idx]
    return stop, t[0].tolist()


def diverse(n: int, start: int = 1) -> list:
    return [start + (i % 300) for i in range(n)]


STREAMS = {
    "eos early, low-entropy tail": [EOD] + diverse(100) + [EOD] + diverse(200) + [3, 4] * 128,
    "eos inside the low-entropy tail": [EOD] + diverse(300) + [3, 4] * 60 + [EOD] + [3, 4] * 70,
    "eos only": [EOD] + diverse(299) + [EOD] + diverse(40),
    "entropy only": [EOD] + diverse(400) + [3, 4] * 128,
    "neither": [EOD] + diverse(500),
}


@pytest.mark.parametrize("name", list(STREAMS))
@pytest.mark.parametrize("var_length", [True, False])
def test_check_stop_follows_reference_order(name: str, var_length: bool) -> None:
    ids = STREAMS[name]
    stop, kept = reference_check_stop_conds(ids, EOD, var_length)
    d = check_stop(ids, EOD, var_length=var_length, entropy_threshold=4.0)
    assert d.stop == stop
    if var_length:
        assert (ids[: d.keep] if d.keep is not None else ids) == kept
    else:  # fixed length: a stop is a rejection, never a truncation
        assert d.keep is None and d.reject == stop


def test_both_fire_entropy_cut_wins() -> None:
    ids = STREAMS["eos early, low-entropy tail"]
    d = check_stop(ids, EOD, var_length=True, entropy_threshold=4.0)
    assert d.reason == "entropy" and d.keep == len(ids) - 256 != ids.index(EOD, 1) + 1


def test_stop_tracker_applies_the_same_order() -> None:
    streams = [STREAMS["eos early, low-entropy tail"], STREAMS["eos inside the low-entropy tail"]]
    n = min(len(s) for s in streams)
    streams = [s[:n] for s in streams]
    opts = SamplerOptions(length=1024, mask_id=999, bos_id=EOD, eod_id=EOD, vocab_size=1000, var_length=True)
    tracker = StopTracker(2, opts)
    x = torch.tensor(streams)
    tracker.update(x, nfe=7, fills=0)  # one check sees both rules fire
    for r, ids in zip(tracker.results(x, 7, 0, 1.0), streams):
        _, kept = reference_check_stop_conds(ids, EOD, True)
        assert r.tokens == kept and r.stop_reason == "entropy"
