"""launchers/evaluate.py --likelihood exact|stratified|mc on a hand-made checkpoint (tiny megatron model)."""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_checkpoint import launcher, make_checkpoint  # noqa: E402



def run(step, out, *extra):  # noqa: ANN001, ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy dataset has no manifest
        launcher().main(["--checkpoint", str(step), "--no-progress", "--out", str(out), "--zero-shot",
                         "--set", "eval.max_batches=3", *extra])
    return json.loads(Path(out).read_text())["perplexity"]["test"]


def test_evaluate_likelihood_choices(tmp_path, capsys):
    step, _ = make_checkpoint(tmp_path, ema=False)  # bd3lm, L = 16, block 4
    mc = run(step, tmp_path / "mc.json")  # default: today's estimator (test_eval_checkpoint pins its numbers' path)
    assert mc["likelihood"] == "mc" and mc["t_range"] == "[0.001, 1]"  # diffusion.sampling_eps = 1e-3
    assert mc["forward_passes"] == mc["batches"] and mc["nelbo_se"] > 0
    exact = run(step, tmp_path / "exact.json", "--likelihood", "exact")
    assert exact["likelihood"] == "exact" and exact["nelbo_se"] == 0.0 and exact["ppl_se"] == 0.0
    assert exact["t_range"] == "[0, 1]" and exact["t_range_at_sampling_eps"] == mc["t_range"]
    assert exact["forward_passes"] == 15 * exact["batches"] and exact["tokens"] == mc["tokens"]
    assert exact["ppl"] == pytest.approx(math.exp(exact["nelbo"]))
    # the MC number is a draw around exact (its SE is conservative)
    assert abs(mc["nelbo"] - exact["nelbo_at_sampling_eps"]) < 4 * mc["nelbo_se"]
    strat = run(step, tmp_path / "strat.json", "--likelihood", "stratified", "--likelihood-units", "3")
    assert strat["forward_passes"] == (2 * 3 * 3 + 1) * strat["batches"] and strat["nelbo_se"] > 0
    assert abs(strat["nelbo"] - exact["nelbo"]) < 5 * strat["nelbo_se"] and strat["t_range"] == "[0, 1]"
    # no SE comparison with mc here: mc's SE is a conservative between-cell bound at another number of
    # forwards; the fair comparison (equal forwards, honest SEs) is test_exact_nelbo's unit test
    printed = capsys.readouterr().out
    assert "test: likelihood=exact PPL" in printed and "forward passes" in printed
    md = (tmp_path / "exact.md").read_text()
    assert "ppl" in md


def test_evaluate_exact_refuses_large_blocks(tmp_path, capsys):
    step, _ = make_checkpoint(tmp_path, ema=False)
    with pytest.raises(SystemExit):
        launcher().main(["--checkpoint", str(step), "--no-progress", "--out", str(tmp_path / "x.json"),
                         "--zero-shot", "--likelihood", "exact", "--set", "diffusion.block_size=16"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --likelihood exact") and "use --likelihood stratified" in err
    assert not (tmp_path / "x.json").exists()
