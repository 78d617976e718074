"""Checkpoint loading checks (vocabulary), results report, and one-line CLI errors."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megabd3.config.schema import Config
from megabd3.errors import UserError
from megabd3.eval.inference import check_vocab, padded_vocab, refit_rows
from megabd3.eval.report import markdown_table, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPT2 = SimpleNamespace(name="gpt2", model_vocab_size=50258)


def test_padded_vocab():
    assert padded_vocab(50258, 128, 1) == 50304 and padded_vocab(50258, 128, 2) == 50432
    assert padded_vocab(30522, 128, 1) == 30592


def test_checkpoint_with_other_vocabulary_is_refused_in_one_line():
    cfg = Config()
    sd = {"embedding.word_embeddings.weight": torch.zeros(30592, 4), "output_layer.weight": torch.zeros(30592, 4)}
    with pytest.raises(UserError, match="30592 rows but tokenizer 'gpt2' needs 50258") as e:
        check_vocab(cfg, sd, GPT2, "run/model.pt")
    assert "\n" not in str(e.value)
    check_vocab(cfg, {"embedding.word_embeddings.weight": torch.zeros(50304, 4)}, GPT2, "x")  # matches: no error
    cfg.parallel.tensor_parallel = 2  # trained with TP=2: padded to 256
    check_vocab(cfg, {"embedding.word_embeddings.weight": torch.zeros(50432, 4)}, GPT2, "x")


def test_refit_rows_repads_vocab_to_tp1():
    src = {"emb": torch.arange(50432 * 2, dtype=torch.float32).view(50432, 2), "other": torch.ones(3)}
    tgt = {"emb": torch.zeros(50304, 2), "other": torch.zeros(3)}
    out = refit_rows(src, tgt, 50258)
    assert out["emb"].shape == (50304, 2) and torch.equal(out["emb"], src["emb"][:50304])
    assert out["other"] is src["other"]


def test_report_json_and_markdown(tmp_path):
    res = {"checkpoint": "runs/x", "perplexity": {"test": {"ppl": 31.5, "nelbo": 3.45, "bpd": 4.98,
                                                           "var_nelbo": float("nan"), "tokens": 1000}},
           "gen_ppl": {"judge": "j", "num_samples": 2, "mean_ppl": 40.0, "pooled_ppl": 38.0, "mean_entropy": 5.1,
                       "median_length": 1024.0, "max_length": 1024, "mean_nfe": 1023.0, "per_sample_ppl": [1, 2]}}
    path = write_results(res, tmp_path / "r.json")
    assert json.loads(path.read_text())["perplexity"]["test"]["ppl"] == 31.5
    md = path.with_suffix(".md").read_text()
    assert "| test | – | – | 31.5 | – | 3.45 | 4.98 | – | – | 1000 | – | – |" in md and "| 2 | 40 | 38 | 5.1 | 1024 | 1024 | 1023 |" in md
    assert markdown_table([{"a": 1}], ["a", "b"]).splitlines()[-1] == "| 1 | – |"


def _cli(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launchers", script), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    p = _cli("sample.py", "--checkpoint", str(tmp_path / "missing"))
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"tokens": [0, 1, 2], "tokenizer": "gpt2"}) + "\n")
    p = _cli("evaluate.py", "--samples", str(samples), "--judge", str(tmp_path / "no_judge"), "--no-progress",
             "--tokenizer", "bert-base-uncased")
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "judge model directory" in p.stderr and "does not exist" in p.stderr
