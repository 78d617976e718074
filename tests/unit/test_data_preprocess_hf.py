"""tools/preprocess_data.py through `datasets.load_dataset` (normal and streaming) and the `lm1b` preset.

The HF path uses the real packaged ``json`` builder over local files (``--hf-dataset json
--hf-data-files ...``), so no Hub access is needed; its output must be byte-identical to reading the same
files with ``--input``. The LM1B preset is checked against the pure-Python ``transformers.BertTokenizer``
(an implementation independent of the Rust backend the pipeline uses) with [CLS] = 101 separators.
"""
import json
import os

import numpy as np
import pytest

from test_data_preprocess import _jsonl, _load, _run, _texts  # in-process CLI runner and corpus helpers

from megabd3.data import assets, check_manifest, get_tokenizer, read_manifest, SampleDataset
from megabd3.data.preprocess import Job, plan_shards
from megabd3.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three jsonl files (three stream shards) and their ``--input`` reference output."""
    assets.fetch_tokenizers()
    d = tmp_path_factory.mktemp("hf")
    texts = _texts(360, seed=11)
    texts[40] = "  "  # skipped and counted on both paths
    files = [_jsonl(d / f"part{k}.jsonl", texts[k * 120:(k + 1) * 120]) for k in range(3)]
    _run("--input", *files, "--tokenizer", "gpt2", "--output-prefix", d / "ref", "--workers", 1)
    return d, files, texts


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_hf_json_builder_equals_file_input(corpus, streaming):
    d, files, texts = corpus
    out = d / f"hf_{int(streaming)}"
    args = ["--hf-dataset", "json", "--hf-data-files", str(d / "part*.jsonl"), "--tokenizer", "gpt2",
            "--output-prefix", out, "--workers", 2]
    p = _run(*args, *(["--streaming"] if streaming else []))
    assert "359 documents (1 empty skipped)" in p.stdout, p.stdout
    # same documents, same order, same tokens: the files are byte-identical to the --input run
    assert (d / f"{out.name}.bin").read_bytes() == (d / "ref.bin").read_bytes()
    assert (d / f"{out.name}.idx").read_bytes() == (d / "ref.idx").read_bytes()
    m = read_manifest(out)
    src = m["sources"][0]
    assert src["hf_dataset"] == "json" and src["streaming"] is streaming
    assert [f["path"] for f in src["data_files"]] == files
    assert m["num_documents"] == 359 and m["empty_documents_skipped_total"] == 1
    assert m["num_tokens"] == read_manifest(d / "ref")["num_tokens"]
    # the work really was split: one stream shard per file, or row ranges of the map-style dataset
    job = Job(inputs=[], tokenizer="gpt2", hf_dataset="json", hf_data_files=files, streaming=streaming, workers=2)
    shards = plan_shards(job)
    if streaming:
        assert [(s.kind, s.start, s.stop) for s in shards] == [("hf_stream", k, 3) for k in range(3)]
    else:
        assert shards[0].kind == "hf" and len(shards) > 2 and shards[-1].stop == 360
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))


def test_hf_splits_and_bad_hf_input(corpus):
    d, files, texts = corpus
    _run("--hf-dataset", "json", "--hf-data-files", *files, "--tokenizer", "gpt2", "--output-prefix", d / "hs",
         "--split", "train:0:-59", "--split", "valid:-59:", "--workers", 1)
    ref = _load(d / "ref")
    assert [a.tolist() for a in _load(d / "hs_train") + _load(d / "hs_valid")] == [a.tolist() for a in ref]
    assert len(_load(d / "hs_valid")) == 59
    cases = [
        (["--hf-dataset", "json", "--hf-data-files", str(d / "nope*.jsonl")], "matches no file"),
        (["--hf-data-files", files[0]], "needs --hf-dataset"),
        (["--hf-dataset", "json", "--hf-data-files", files[0], "--input", files[0]], "not both"),
        (["--hf-dataset", "json", "--hf-data-files", files[0], "--text-key", "body"], "no column 'body'"),
    ]
    for extra, needle in cases:
        p = _run(*extra, "--tokenizer", "gpt2", "--output-prefix", d / "bad", "--workers", 1, check=False)
        err = p.stderr.strip()
        assert p.returncode == 1 and err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not os.path.exists(d / "bad.idx")


SENTENCES = [
    "The U.S. economy grew 3.5 percent in the third quarter , the Commerce Department said .",
    "\" We 're not going to stop , \" she told reporters on Tuesday .",
    "",  # an empty line: skipped and counted
    "Shares of Apple Inc. rose 2 % to $ 105.30 in early trading .",
    "Naïve café owners in São Paulo couldn't believe it !",
    "He scored 17 points , including a 3-pointer with 0:04 left .",
] * 7


@pytest.fixture(scope="module")
def lm1b(tmp_path_factory):
    assets.fetch_tokenizers()
    d = tmp_path_factory.mktemp("lm1b")
    (d / "sentences.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    _run("--preset", "lm1b", "--input", d / "sentences.txt", "--output-prefix", d / "lm1b", "--workers", 1)
    from transformers import BertTokenizer  # the slow, pure-Python WordPiece: independent of the pipeline's backend

    ref = BertTokenizer(str(assets.tokenizer_dir("bert-base-uncased") / "vocab.txt"), do_lower_case=True)
    expected = [ref.encode(s, add_special_tokens=False) + [101] for s in SENTENCES if s]
    return d, expected


def test_lm1b_preset_ids_separators_and_manifest(lm1b):
    d, expected = lm1b
    got = _load(d / "lm1b")
    assert [g.tolist() for g in got] == expected
    assert expected[0][:3] == [1996, 1057, 1012]  # "the u ." : lower-cased WordPiece, not GPT-2
    flat = np.concatenate(got)
    assert 102 not in flat and 103 not in flat  # no [SEP], never the mask id; [CLS] only as separator
    assert np.flatnonzero(flat == 101).tolist() == (np.cumsum([len(e) for e in expected]) - 1).tolist()
    m = read_manifest(d / "lm1b")
    tok = get_tokenizer("bert-base-uncased")
    assert m["dtype"] == "uint16" and m["num_documents"] == len(expected) == 35
    assert m["empty_documents_skipped_total"] == 7 and m["split"]["name"] is None
    assert m["num_tokens"] == sum(len(e) for e in expected)
    assert m["tokenizer"] == {"name": "bert-base-uncased", "hash": tok.hash, "vocab_size": 30522,
                              "model_vocab_size": 30522, "mask_id": 103, "bos_id": 101, "eos_id": 101,
                              "eod_id": 101, "pad_id": 0}
    assert m["options"]["reference_separator"] is True and m["options"]["txt_mode"] == "lines"
    assert check_manifest(d / "lm1b", tok)["num_documents"] == 35
    with pytest.raises(UserError, match="says tokenizer 'bert-base-uncased' but the config uses 'gpt2'"):
        check_manifest(d / "lm1b", get_tokenizer("gpt2"))
    # the reference's LM1B wrap: chunks of L-2 tokens bordered by [CLS] 101 on both sides
    ds = SampleDataset(d / "lm1b", 16, "wrap", tok, shuffle=False, chunk_special_tokens=True, cache_dir=d / "cache")
    assert len(ds) == flat.size // 14
    for i in (0, len(ds) - 1):
        assert ds[i]["input_ids"].tolist() == [101, *flat[14 * i:14 * (i + 1)].tolist(), 101]


def test_lm1b_sep_eos_option_is_a_different_tokenizer_identity(lm1b):
    d, expected = lm1b
    _run("--preset", "lm1b", "--bert-sep-eos", "--input", d / "sentences.txt", "--output-prefix", d / "sep", "--workers", 1)
    assert [g.tolist() for g in _load(d / "sep")] == [e[:-1] + [102] for e in expected]
    m = read_manifest(d / "sep")
    assert m["tokenizer"]["eod_id"] == 102 and m["options"]["reference_separator"] is False
    with pytest.raises(UserError, match="eod_id 102 != 101"):
        check_manifest(d / "sep", get_tokenizer("bert-base-uncased"))
    check_manifest(d / "sep", get_tokenizer("bert-base-uncased", reference_separator=False))


def test_txt_lines_trailing_newline_and_crlf(lm1b):
    """A final newline is no empty document, and CRLF files tokenize like LF files (no stray "\\r" ids)."""
    d, expected = lm1b
    (d / "crlf.txt").write_bytes(("\r\n".join(SENTENCES) + "\r\n").encode("utf-8"))
    _run("--preset", "lm1b", "--input", d / "crlf.txt", "--output-prefix", d / "crlf", "--workers", 1, "--shard-mb", 0.001)
    assert (d / "crlf.bin").read_bytes() == (d / "lm1b.bin").read_bytes()
    assert (d / "crlf.idx").read_bytes() == (d / "lm1b.idx").read_bytes()
    assert read_manifest(d / "crlf")["empty_documents_skipped_total"] == 7  # not 7 + one per shard
