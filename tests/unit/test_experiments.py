"""The reproduction suite's data model: tables, stage sharing, hashing, checks, tokenizer and baselines."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megabd3.errors import UserError
from megabd3.experiments import tables as T
from megabd3.experiments.profiles import PROFILES, get_profile
from megabd3.experiments.stages import build_graph


@pytest.fixture(scope="module")
def cpu_graph(tmp_path_factory):
    return build_graph(T.build_tables(), get_profile("cpu"), tmp_path_factory.mktemp("suite"))


def test_thirteen_tables_every_cell_has_a_source():
    tabs = T.build_tables()
    assert [t.number for t in tabs] == list(range(1, 14))
    for t in tabs:
        assert t.cells, t.number
        for c in t.cells:
            assert c.measure.kind in ("eval", "zeroshot", "sample", "data", "check", "best")
            if c.measure.kind in ("eval", "zeroshot", "sample"):
                assert c.measure.run is not None


def test_parse_tables():
    assert T.parse_tables("all") == list(range(1, 14))
    assert T.parse_tables("1-3,10") == [1, 2, 3, 10]
    with pytest.raises(UserError, match="--tables"):
        T.parse_tables("one")
    with pytest.raises(UserError, match="1-13"):
        T.build_tables([14])


def test_every_cell_builds_a_stage(cpu_graph):
    assert cpu_graph.errors == {}


def test_identical_stages_are_shared(cpu_graph):
    g = cpu_graph
    pre = g.by_run[T.pretrain("lm1b", "ablation")]
    # Table 3's fine-tunes and Table 10's schedules hang off the one L'=L pretrain
    for run in [T.finetune("lm1b", f"bd3lm_bs{b}_loglinear", "ablation") for b in (4, 8, 16)] + \
               [r for _, _, r in T.t11_candidates(16, "loglinear")]:
        assert g.stages[g.by_run[run]].spec["parent"] == pre
    # at the cpu scale every protocol has one budget, so the same model is one stage across tables
    assert g.by_run[T.baseline("lm1b", "ar", "ablation")] == g.by_run[T.baseline("lm1b", "ar", "weighting")]
    assert g.by_run[T.baseline("lm1b", "ar", "t1")] == g.by_run[T.baseline("lm1b", "ar", "ablation")]
    # but a different config is a different stage
    assert g.by_run[T.finetune("lm1b", "bd3lm_bs4_loglinear", "ablation")] != \
        g.by_run[T.finetune("lm1b", "bd3lm_bs4_clip_0.5-1", "ablation")]


def test_report_profile_keeps_the_report_step_counts(tmp_path):
    g = build_graph(T.build_tables([3]), get_profile("report"), tmp_path)
    ar = g.stages[g.by_run[T.baseline("lm1b", "ar", "ablation")]]
    ft = g.stages[g.by_run[T.finetune("lm1b", "bd3lm_bs4_loglinear", "ablation")]]
    assert "training.steps=500" in ar.spec["sets"]       # 400 + 100 in one run
    assert "training.steps=100" in ft.spec["sets"]
    assert "training.steps=400" in g.stages[ft.spec["parent"]].spec["sets"]


def test_stage_key_is_the_resolved_config(tmp_path):
    a = build_graph(T.build_tables([3]), get_profile("cpu"), tmp_path)
    b = build_graph(T.build_tables([3]), get_profile("cpu"), tmp_path)
    assert set(a.stages) == set(b.stages)
    prof = get_profile("cpu")
    changed = type(prof)(**{**prof.__dict__, "train_sets": prof.train_sets + ["optim.lr=5e-4"]})
    c = build_graph(T.build_tables([3]), changed, tmp_path)
    train_a = {k for k in a.stages if k.startswith("train-")}
    train_c = {k for k in c.stages if k.startswith("train-")}
    assert train_a.isdisjoint(train_c)


def test_pretraining_stages_see_500k_tokens_at_cpu_scale():
    prof = get_profile("cpu")
    sets = dict(x.split("=", 1) for x in prof.train_sets)
    tokens_per_step = int(sets["training.global_batch_size"]) * prof.standins["lm1b"].seq_len
    assert min(p for p, _ in prof.steps.values()) * tokens_per_step >= 500_000


def test_unknown_scale_is_one_line():
    with pytest.raises(UserError, match="--scale: expected one of"):
        get_profile("huge")
    assert {"paper", "report", "cpu", "smoke"} <= set(PROFILES)


def test_unigram_cross_entropy_matches_a_loop():
    from megabd3.eval.baselines import unigram_cross_entropy

    rng = np.random.default_rng(0)
    train, test, V = rng.integers(0, 7, 200), rng.integers(0, 9, 50), 10
    counts = [1.0] * V
    for x in train:
        counts[x] += 1
    total = sum(counts)
    want = sum(-math.log(counts[x] / total) for x in test) / len(test)
    assert unigram_cross_entropy(train, test, V) == pytest.approx(want, rel=1e-12)


def test_bpe_tokenizer_is_deterministic_and_loads(tmp_path):
    from megabd3.data.tokenizers import _resolve
    from megabd3.data.train_tokenizer import train_bpe

    texts = [f"the {w} said the market rose {i} points" for i, w in enumerate(["company", "bank", "firm"] * 40)]
    a = train_bpe(texts, tmp_path / "a", vocab_size=300, name="bpe300-toy")
    b = train_bpe(texts, tmp_path / "b", vocab_size=300, name="bpe300-toy")
    assert json.loads((a / "tokenizer.json").read_text())["model"] == json.loads((b / "tokenizer.json").read_text())["model"]
    tok = _resolve(str(a), True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.model_vocab_size == 300
    ids = tok.encode("the bank said")
    assert tok.decode(ids) == "the bank said"
    with pytest.raises(UserError, match="vocab_size"):
        train_bpe(texts, tmp_path / "c", vocab_size=100, name="x")


def test_formula_checks_are_exact():
    from megabd3.experiments.checks import schedule_checks, weighting_checks

    s = schedule_checks()
    assert max(v for k, v in s.items()) < 1e-8
    w = weighting_checks()
    assert max(v for k, v in w.items() if k.endswith("w_err")) < 1e-10
    # spec 9.3: E_{p~U}[w] explains the fork's weighted "PPL" ratios
    for name, want in {"sigmoid": 0.500, "edm": 0.549, "iddpm": 0.785, "fm": 1.570}.items():
        assert w[f"{name}/mean_w"] == pytest.approx(want, abs=2e-3)


def test_findings_verdicts():
    from megabd3.experiments.report import findings

    rec = lambda t, row, col, v: {"table": t, "row": row, "col": col, "ours": v, "status": "ok"}  # noqa: E731
    records = [rec(3, "SEDD", "PPL", 300), rec(3, "MDLM", "PPL", 290), rec(3, "BD3-LM L'=16", "PPL", 280),
               rec(3, "BD3-LM L'=8", "PPL", 270), rec(3, "BD3-LM L'=4", "PPL", 275),
               rec(1, "Autoregressive (AR)", "PPL", 100), rec(1, "BD3-LM (L'=1) + tuned schedule", "PPL", 104)]
    out = {f: v for f, v, _ in findings(records, {"owt": 128})}
    assert out["BD3-LM beats MDLM and SEDD (Table 3)"] == "HELD"
    assert out["Smaller L' gives lower PPL (Table 3: 16 > 8 > 4)"] == "NOT HELD"
    assert out["The tuned L'=1 model reaches AR (within 5%, Table 1)"] == "HELD"
    assert out["BD3-LM beats MDLM and SEDD (Table 4)"].startswith("not checked")


def test_every_committed_report_number_is_attached():
    """Spot values of the report and the paper, so a transcription slip shows up here."""
    t13 = {(c.row, c.col): c.report for c in T.table13().cells}
    assert t13[("BD3-LM L'=4", "sigmoid (weighted 'PPL')")] == 33.16
    assert t13[("BD3-LM L'=16", "iddpm (weighted 'PPL')")] == 279.7
    assert t13[("BD3-LM L'=8", "simple (weighted 'PPL')")] == 8246395904
    t2 = {(c.row, c.col): (c.report, c.paper) for c in T.table2().cells}
    # the paper's Var. NELBO is under the row's own interval; the report's was measured unclipped (spec 9.2)
    assert t2[("L'=4 U[0.5, 1]", "Var. NELBO (train schedule)")] == (None, 8.28)
    assert t2[("L'=4 U[0.5, 1]", "Var. NELBO (unclipped)")] == (44.41, None)
    assert t2[("L'=128 U[0, 0.5]", "PPL")] == (2106, 31.72)
    t3 = {c.row: (c.report, c.paper) for c in T.table3().cells}
    assert t3["SEDD"] == (1447, 32.68) and t3["BD3-LM L'=8"] == (1734, 29.83)
    t4 = {c.row: (c.report, c.paper) for c in T.table4().cells}
    assert t4["Transformer (AR)"] == (2036, 17.54) and t4["BD3-LM L'=4"] == (1935, 20.73)
    t5 = {(c.row, c.col): (c.report, c.paper) for c in T.table5().cells}
    assert t5[("MDLM", "lambada")] == (1556, 48.29) and t5[("BD3-LM L'=4", "wikitext")] == (3143, 31.31)
    t7 = {(c.row, c.col): (c.report, c.paper) for c in T.table7().cells}
    assert t7[("BD3-LM L'=16", "Gen PPL")] == (7576, 33.4) and t7[("AR", "NFEs")] == (1024, 1024)
    t8 = {(c.row, c.col): (c.report, c.paper) for c in T.table8().cells}
    assert t8[("L'=16 Square", "Var. NELBO (train schedule)")] == (27.53, 13.03)
    t10 = {(c.row, c.col): c.report for c in T.table10().cells}
    assert t10[("L'=16 B.G. (mu1=0.1, w1=0.6)", "PPL")] == 1295 and t10[("L'=4 Cosine", "Var. NELBO (unclipped)")] == 45.28
