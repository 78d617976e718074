"""DP=2: evaluate_nelbo and search_clip_interval reduce over the data-parallel group exactly like one
process on the union of both ranks' sequences; 2 gloo ranks, OMP_NUM_THREADS=1.

t and the masks come from per-rank generators, and antithetic strata are per rank (spec), so a single
process drawing for the union would draw different noise. The single-process reference therefore
replays each rank's draws (same objective, same seed per rank, same call order) and reduces by hand:
sums and counts added, per-block means concatenated before the unbiased variance. AR has no noise,
so there the reference is the plain 1-process ``evaluate_nelbo`` on the union batches.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _diffusion_dp_worker as W  # noqa: E402
from _launch import launch  # noqa: E402

from megabd3.diffusion.objectives import build_objective  # noqa: E402
from megabd3.eval.nelbo import evaluate_nelbo  # noqa: E402

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:  # noqa: ANN001
    out = tmp_path_factory.mktemp("dp") / "out.pt"
    launch(Path(W.__file__), 2, str(out))
    return torch.load(out)


@torch.no_grad()
def _replay(seed: int, interval_list=None):  # noqa: ANN001, ANN202
    """Per rank and batch (and candidate): (nelbo_sum, count, per_block_mean) with that rank's draws."""
    m, out = W.model(), []
    for r in range(2):
        obj = build_objective(W.cfg(), W.MASK, W.V, evaluation=interval_list is None)
        gen = torch.Generator().manual_seed(seed + r)
        rows = []
        for b in W.local_batches(r):
            if interval_list is None:
                o = obj(m, b["input_ids"], gen, train=False, attention_mask=b["attention_mask"])
                rows.append((float(o.nelbo_sum), int(o.token_count), o.per_block_mean))
            else:
                rows.append({c: obj(m, b["input_ids"], gen, train=False, attention_mask=b["attention_mask"],
                                    interval=c).per_block_mean for c in interval_list})
        out.append(rows)
    return out


def test_evaluate_nelbo_matches_union(ranks: list) -> None:
    rep = _replay(W.EVAL_SEED)
    s = sum(row[0] for r in rep for row in r)
    n = sum(row[1] for r in rep for row in r)
    var = sum(float(torch.cat([rep[0][i][2], rep[1][i][2]]).flatten().double().var()) for i in range(W.NB)) / W.NB
    assert n == W.NB * (5 * W.L - 2)  # padding excluded
    for got in (r["nelbo"] for r in ranks):
        assert got["tokens"] == n and got["batches"] == W.NB
        assert got["nelbo"] == pytest.approx(s / n, rel=1e-6)
        assert got["ppl"] == pytest.approx(math.exp(s / n), rel=1e-6)
        assert got["var_nelbo"] == pytest.approx(var, rel=1e-5)
    # positive control: a rank-local reduction (rank 0's sequences only) is measurably different
    s0 = sum(row[0] for row in rep[0]) / sum(row[1] for row in rep[0])
    assert abs(s0 - s / n) > 1e-3
    var0 = sum(float(rep[0][i][2].flatten().double().var()) for i in range(W.NB)) / W.NB
    assert abs(var0 - var) > 1e-3 * var


@torch.no_grad()
def test_evaluate_nelbo_with_an_all_padding_rank_matches_union(ranks: list) -> None:
    """Rank 1's last batch is only padding: it is skipped there (no draws) but joins the gathers."""
    from megabd3.eval.padding import real_rows

    m, per_rank = W.model(), []
    for r in range(2):
        honest = build_objective(W.clipped_cfg(), W.MASK, W.V, evaluation=True)
        train = build_objective(W.clipped_cfg(), W.MASK, W.V)
        gen, tgen = torch.Generator().manual_seed(W.EVAL_SEED + r), torch.Generator().manual_seed(W.EVAL_SEED + r)
        rows = []
        for b in W.padded_batches(r):
            b = real_rows(b)
            if b["input_ids"].shape[0] == 0:
                rows.append(None)
                continue
            o = honest(m, b["input_ids"], gen, train=False, attention_mask=b["attention_mask"])
            t = train(m, b["input_ids"], tgen, train=False, attention_mask=b["attention_mask"], interval=W.CLIP)
            rows.append((float(o.nelbo_sum), int(o.token_count), o.per_block_mean, t.per_block_mean))
        per_rank.append(rows)
    flat = [row for rows in per_rank for row in rows if row is not None]
    s, n = sum(row[0] for row in flat), sum(row[1] for row in flat)

    def var(k: int) -> float:
        per_batch = [torch.cat([rows[i][k] for rows in per_rank if rows[i] is not None]) for i in range(W.NB + 1)]
        return sum(float(v.flatten().double().var()) for v in per_batch) / len(per_batch)

    assert per_rank[1][-1] is None and per_rank[0][-1] is not None
    for r in ranks:
        got = r["nelbo_pad"]
        assert got["tokens"] == n and got["batches"] == W.NB + 1
        assert got["nelbo"] == pytest.approx(s / n, rel=1e-6)
        assert got["var_nelbo"] == pytest.approx(var(2), rel=1e-5)
        assert got["var_nelbo_train"] == pytest.approx(var(3), rel=1e-5)
        assert tuple(got["var_nelbo_train_interval"]) == W.CLIP


def test_evaluate_nelbo_ar_equals_one_process_on_union(ranks: list) -> None:
    ref = evaluate_nelbo(W.cfg("ar"), W.model(), W.global_batches(), mask_id=W.MASK, vocab_size=W.V)
    for r in ranks:
        got = r["nelbo_ar"]
        assert got["tokens"] == ref["tokens"] and got["batches"] == ref["batches"]
        for k in ("nelbo", "ppl", "bpd", "var_nelbo"):
            assert got[k] == pytest.approx(ref[k], rel=1e-5), k


def test_clip_search_matches_union(ranks: list) -> None:
    rep = _replay(W.CLIP_SEED, W.CANDIDATES)
    table = {c: sum(float(torch.cat([rep[0][i][c], rep[1][i][c]]).flatten().double().var())
                    for i in range(W.NB)) / W.NB for c in W.CANDIDATES}
    best = min(W.CANDIDATES, key=table.get)
    assert len(set(round(v, 6) for v in table.values())) == len(table)  # a strict winner
    local = {c: sum(float(rep[0][i][c].flatten().double().var()) for i in range(W.NB)) / W.NB for c in table}
    assert any(abs(local[c] - table[c]) > 1e-3 * table[c] for c in table)  # the gather matters
    for r in ranks:
        got = r["clip"]
        assert got["batches"] == W.NB
        assert set(got["table"]) == set(table)
        for c in table:
            assert got["table"][c] == pytest.approx(table[c], rel=1e-5), c
        assert got["interval"] == best and tuple(got["train_interval"]) == best
