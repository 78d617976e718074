"""tools/add_mask_token.py: a causal-LM tokenizer gets an in-vocabulary mask token (vocabulary unchanged), which
megabd3's tokenizer layer then uses instead of appending a row; bad input gets one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]


def _causal_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unused_a>": 3, "<unused_b>": 4,
             **{w: i + 5 for i, w in enumerate(["the", "cat", "sat", "on", "mat", "[UNK]"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                                unk_token="[UNK]", pad_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<unused_a>", "<unused_b>"]})
    fast.save_pretrained(str(path))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "add_mask_token.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_mask_token_is_reused_from_the_vocabulary(tmp_path) -> None:  # noqa: ANN001
    from megabd3.data.tokenizers import get_tokenizer

    src = _causal_tokenizer(tmp_path / "src")
    before = get_tokenizer(str(src))
    assert (before.mask_id, before.model_vocab_size) == (11, 12)  # appended: one row more than the checkpoint
    r = _run(str(src), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    after = get_tokenizer(str(tmp_path / "out"))
    # the last special token that is not BOS/EOS/PAD/UNK, inside the vocabulary: no new row
    assert (after.mask_id, after.vocab_size, after.model_vocab_size) == (4, 11, 11)
    assert after.encode("the cat sat") == before.encode("the cat sat")
    r = _run(str(src), str(tmp_path / "named"), "--mask-token", "<unused_a>")
    assert r.returncode == 0 and get_tokenizer(str(tmp_path / "named")).mask_id == 3


@pytest.mark.parametrize("case", ["exists", "unknown", "has_mask"])
def test_bad_input_gets_one_line(tmp_path, case: str) -> None:  # noqa: ANN001
    src = _causal_tokenizer(tmp_path / "src")
    out = tmp_path / "out"
    args = [str(src), str(out)]
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "unknown":
        args += ["--mask-token", "<nope>"]
    else:
        assert _run(str(src), str(tmp_path / "m")).returncode == 0
        args = [str(tmp_path / "m"), str(out)]
    r = _run(*args)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert {"exists": "not empty", "unknown": "not a token", "has_mask": "already has a mask"}[case] in lines[0]
    if case == "exists":
        assert (out / "keep.txt").read_text() == "x"


def test_data_holding_the_in_vocabulary_mask_is_refused(tmp_path) -> None:  # noqa: ANN001
    """A literal special token in the text is tokenized to its id: if that id is the mask, training would score a
    clean token with the mask logit at -inf. check_manifest (run before every training) refuses such data."""
    import json

    from megabd3.data.manifest import check_manifest
    from megabd3.data.tokenizers import get_tokenizer
    from megabd3.errors import UserError

    src = _causal_tokenizer(tmp_path / "src")
    assert _run(str(src), str(tmp_path / "tok")).returncode == 0  # mask = <unused_b> (id 4)
    docs = tmp_path / "docs.jsonl"
    for name, texts in (("clean", ["the cat sat", "on the mat"]), ("dirty", ["the cat sat", "the <unused_b> mat"])):
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(docs),
                            "--tokenizer", str(tmp_path / "tok"), "--output-prefix", str(tmp_path / name),
                            "--workers", "1", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
    tok = get_tokenizer(str(tmp_path / "tok"))
    check_manifest(str(tmp_path / "clean"), tok)
    with pytest.raises(UserError, match="contains the mask id 4"):
        check_manifest(str(tmp_path / "dirty"), tok)
