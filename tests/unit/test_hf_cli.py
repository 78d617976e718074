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


# -- one-line errors through the command lines: exit status 1, exactly one `error:` line, no traceback ----------

ROOT = Path(__file__).resolve().parents[2]


def _one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def _cli_process(*argv: str, cwd: Path) -> str:
    """The real process: its exit status and stderr."""
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    return _one_error(p.stderr)


def _cli(main, argv: list, capsys) -> str:  # noqa: ANN001
    """In process (the same cli_main wrapper, without a second interpreter's start-up): any exception other
    than the one-line UserError propagates and fails the test."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    return _one_error(capsys.readouterr().err)


def _evaluate():  # noqa: ANN202
    import importlib.util

    spec = importlib.util.spec_from_file_location("_evaluate_launcher", ROOT / "launchers" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _foreign_dir(tmp_path: Path, model_type: str) -> Path:
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 50257}))
    (d / "model.safetensors").write_bytes(b"")
    return d


def test_evaluate_process_refuses_an_unsupported_architecture(tmp_path) -> None:  # noqa: ANN001
    err = _cli_process(str(ROOT / "launchers" / "evaluate.py"), "--checkpoint", str(_foreign_dir(tmp_path, "gpt2")),
                       cwd=tmp_path)
    assert "model_type 'gpt2' is not supported; supported: bd3lm" in err


def test_evaluate_refuses_bad_hf_dirs(tmp_path, capsys) -> None:  # noqa: ANN001
    from megabd3.hf.export import export_state_dict

    main = _evaluate()
    err = _cli(main, ["--checkpoint", str(_foreign_dir(tmp_path, "bert"))], capsys)
    assert "model_type 'bert' is not supported; supported: bd3lm" in err
    _, sd, cfg = random_model("bd3lm", 4)
    out = export_state_dict(sd, cfg, tmp_path / "hf")
    _tokenizer_dir(out, V + 5)  # 45 words + the appended mask = 46, the model has 40 rows
    err = _cli(main, ["--checkpoint", str(out)], capsys)
    assert "the model vocabulary is 40 but the tokenizer files there give 46" in err


def _tokenizer_dir(path: Path, words: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w1").save_pretrained(str(path))
    return path


def test_convert_refuses_bad_input(tmp_path, capsys) -> None:  # noqa: ANN001
    from megabd3.config.load import load_config

    run = _tiny_run(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("")
    assert "exists and is not empty" in _cli(convert.main, [str(run), str(busy)], capsys)
    assert [f.name for f in busy.iterdir()] == ["keep.txt"]

    step = run / "checkpoints" / "step_00000007"
    cfg = load_config(str(step / "config.json"))
    cfg.data.tokenizer = str(_tokenizer_dir(tmp_path / "tok_big", V + 5))  # the run's tokenizer changed
    save_resolved(cfg, step)
    err = _cli(convert.main, [str(run), str(tmp_path / "out_vocab")], capsys)
    assert "checkpoint vocabulary 40 does not match tokenizer" in err and not (tmp_path / "out_vocab").exists()

    # a Llama-family run cannot go into the released DiT layout (export_checkpoint routes it to the
    # LlamaForCausalLM exporter instead, tests/unit/test_hf_llama_io.py)
    from megabd3.errors import UserError
    from megabd3.hf.export import export_state_dict

    cfg.data.tokenizer = str(tmp_path / "tok")
    cfg.model.arch, cfg.model.adaln = "llama", False
    with pytest.raises(UserError, match=r"model.arch='llama': the released BD3-LM layout holds only the DiT") as exc:
        export_state_dict({"embedding.weight": torch.zeros(V, 4)}, cfg, tmp_path / "out_llama")
    assert "\n" not in str(exc.value) and not (tmp_path / "out_llama").exists()
