"""tools/convert_to_hf.py end to end on a tiny run directory: tokenizer files, model card with the run's
eval PPL, the directory loads in transformers; one-line errors for a non-empty OUT_DIR and --weights ema
without EMA weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megabd3.config.load import save_resolved
from tests.unit._hf_common import V, random_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
convert = pytest.importorskip("convert_to_hf")
transformers = pytest.importorskip("transformers")


def _tiny_run(tmp_path: Path, ema: bool = True) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok_dir = tmp_path / "tok"
    words = {f"w{i}": i for i in range(V - 1)}  # + the appended mask token = the model's V
    tk = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w1").save_pretrained(str(tok_dir))
    _, sd, cfg = random_model("bd3lm", 4)
    cfg.data.tokenizer = str(tok_dir)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    torch.save({"model": sd, "ema": {k: v + 1 for k, v in sd.items()} if ema else None, "ema_num_updates": 7,
                "step": 7, "config": None}, step / "model.pt")
    save_resolved(cfg, step)
    torch.save({"step": 7, "consumed_samples": 0, "clip_interval": (0.01, 0.9)}, step / "megabd3_state.pt")
    (run / "checkpoints" / "latest").write_text("step_00000007\n")
    (run / "eval").mkdir()
    (run / "eval" / "results_step_00000007.json").write_text(json.dumps(
        {"weights": "ema", "perplexity": {"test": {"ppl": 123.456, "tokens": 999}}}))
    return run


def test_convert_cli(tmp_path, capsys) -> None:  # noqa: ANN001
    run = _tiny_run(tmp_path)
    out = tmp_path / "hf"
    convert.main([str(run), str(out)])
    card = (out / "README.md").read_text()
    assert "test PPL" in card and "123.456" in card and "steps: 7" in card
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    conf = json.loads((out / "config.json").read_text())
    assert len(tok) == V - 1 and conf["mask_token_id"] == V - 1 and conf["vocab_size"] == V
    assert (conf["sampling_eps_min"], conf["sampling_eps_max"]) == (0.01, 0.9)  # the run's final clip interval
    from safetensors.torch import load_file

    emb = load_file(str(out / "model.safetensors"))["backbone.vocab_embed.embedding"]
    live = torch.load(run / "checkpoints" / "step_00000007" / "model.pt", weights_only=True)["model"]
    assert torch.equal(emb, live["embedding.weight"] + 1)  # --weights ema (the default)

    capsys.readouterr()  # drop earlier output (library warnings)
    with pytest.raises(SystemExit):
        convert.main([str(run), str(out)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "exists and is not empty" in err and "\n" not in err


def test_convert_cli_live_only(tmp_path, capsys) -> None:  # noqa: ANN001
    run = _tiny_run(tmp_path, ema=False)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert.main([str(run), str(tmp_path / "a")])
    assert "pass --weights live" in capsys.readouterr().err
    convert.main([str(run), str(tmp_path / "b"), "--weights", "live"])
    assert "No evaluation result" not in (tmp_path / "b" / "README.md").read_text()
