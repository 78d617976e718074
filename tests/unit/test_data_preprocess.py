"""tools/preprocess_data.py: equals direct tokenization, splits, workers, resume, bad input, manifest.

The CLI runs in-process (``main(argv)``, the same code path as the console, ``cli_main`` included) so a
run costs milliseconds instead of an interpreter start; runs that must die (``os._exit``/SIGKILL) or
whose exit status and stderr of a real process matter run as subprocesses.
"""
import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megabd3.data import assets  # noqa: E402
from megabd3.data.indexed import IndexedDataset  # noqa: E402
from megabd3.data.manifest import check_manifest, read_manifest  # noqa: E402
from megabd3.data.tokenizers import get_tokenizer  # noqa: E402
from megabd3.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
WORDS = "the quick brown fox jumps over a lazy dog while café 東京 numbers 12345 and 'quotes' follow".split()


def _load_cli():
    spec = importlib.util.spec_from_file_location("megabd3_preprocess_data_cli", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CLI = _load_cli()


@pytest.fixture(scope="module")
def tok():
    assets.fetch_tokenizers()
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def ref_gpt2(tok):
    """An independent GPT-2 encoder: the Rust BPE built from vocab.json/merges.txt (no tiktoken, no megabd3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = assets.tokenizer_dir("gpt2")
    ref = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return ref


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 60)))) for _ in range(n)]


def _jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


def _run(*args, check=True):
    """tools/preprocess_data.py in-process: returncode/stdout/stderr like subprocess.run."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            CLI.main(["--no-progress", *map(str, args)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    p = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _run_subprocess(*args, check=True):
    p = subprocess.run([sys.executable, TOOL, "--no-progress", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _expected(ref, eod, texts):
    return [np.array(e.ids + [eod]) for e in ref.encode_batch([t for t in texts if t.strip()])]


def _load(prefix):
    ds = IndexedDataset(prefix)
    return [np.asarray(ds[i]) for i in range(len(ds))]


def test_matches_direct_tokenization_with_workers_and_splits(tmp_path, tok, ref_gpt2):
    texts = _texts(800)
    texts[5] = "   "  # empty documents are skipped and counted
    texts[77] = ""
    a = _jsonl(tmp_path / "a.jsonl", texts[:500])
    b = _jsonl(tmp_path / "b.jsonl", texts[500:])
    # 98 + 60 KB in 20 KB shards: 5 + 3 shards over 2 workers, cut mid-file (line alignment matters)
    _run("--input", str(tmp_path / "*.jsonl"), "--tokenizer", "gpt2", "--output-prefix", tmp_path / "o",
         "--workers", 2, "--shard-mb", 0.02, "--split", "train:0:-200", "--split", "valid:-200:")
    exp = _expected(ref_gpt2, tok.eod_id, texts)
    got_train, got_valid = _load(tmp_path / "o_train"), _load(tmp_path / "o_valid")
    assert len(got_train) == len(exp) - 200 and len(got_valid) == 200
    for g, e in zip(got_train + got_valid, exp):
        np.testing.assert_array_equal(g, e)
    m = read_manifest(tmp_path / "o_valid")
    assert m["tokenizer"]["name"] == "gpt2" and m["tokenizer"]["hash"] == tok.hash and m["dtype"] == "uint16"
    assert m["num_documents"] == 200 and m["num_tokens"] == sum(map(len, got_valid))
    assert m["empty_documents_skipped_total"] == 2 and m["split"]["documents"] == [598, 798]
    assert [s["path"] for s in m["sources"]] == [a, b]
    assert not os.path.exists(f"{tmp_path / 'o'}.partial")
    # one worker, txt and parquet inputs give the same tokens
    (tmp_path / "t.txt").write_text("\n".join(texts), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet", row_group_size=300)
    for inp in ("t.txt", "p.parquet"):
        _run("--input", tmp_path / inp, "--tokenizer", "gpt2", "--output-prefix", tmp_path / inp, "--workers", 1)
        got = _load(tmp_path / inp)
        assert len(got) == len(exp)
        for g, e in zip(got, exp):
            np.testing.assert_array_equal(g, e)


def test_fraction_splits_and_owt_preset_needs_enough_documents(tmp_path, tok):
    src = _jsonl(tmp_path / "a.jsonl", _texts(200))
    _run("--input", src, "--tokenizer", "gpt2", "--output-prefix", tmp_path / "f", "--split", "train:0.9", "--split", "valid:0.1")
    assert len(IndexedDataset(tmp_path / "f_train")) == 180 and len(IndexedDataset(tmp_path / "f_valid")) == 20
    # a real process: exit status 1 and one `error:` line, no traceback
    p = _run_subprocess("--preset", "owt", "--input", src, "--output-prefix", tmp_path / "owt", check=False)
    assert p.returncode == 1 and "empty" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: ") and "\n" not in p.stderr.strip()


@pytest.mark.parametrize("case,needle", [
    ("missing", "matches no file"),
    ("empty_file", "empty input"),
    ("only_empty_docs", "no documents"),
    ("bad_utf8", "invalid UTF-8"),
    ("bad_json", "not valid JSON"),
    ("no_key", "no key 'body'"),
    ("unknown_tokenizer", "unknown tokenizer"),
    ("overlap", "overlap"),
])
def test_bad_input_is_one_line_error(tmp_path, tok, case, needle):
    src = tmp_path / "in.jsonl"
    tokname = "gpt2"
    extra = []
    if case == "missing":
        src = tmp_path / "nope*.jsonl"
    elif case == "empty_file":
        src.write_bytes(b"")
    elif case == "only_empty_docs":
        _jsonl(src, ["", "  ", "\n"])
    elif case == "bad_utf8":
        src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    elif case == "bad_json":
        src.write_bytes(b'{"text": "ok"}\n{"text": \n')
    elif case == "no_key":
        _jsonl(src, ["x"])
        extra = ["--text-key", "body"]
    elif case == "unknown_tokenizer":
        _jsonl(src, ["x"])
        tokname = "no-such-tokenizer-xyz"
    elif case == "overlap":
        _jsonl(src, _texts(50))
        extra = ["--split", "train:0:40", "--split", "valid:30:"]
    p = _run("--input", src, "--tokenizer", tokname, "--output-prefix", tmp_path / "o", *extra, check=False)
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    if case == "bad_utf8":
        assert "line 2" in err
        p = _run("--input", src, "--tokenizer", "gpt2", "--output-prefix", tmp_path / "r", "--errors", "replace")
        assert read_manifest(tmp_path / "r")["invalid_utf8_replaced_total"] == 1


def test_resume_after_kill_reuses_shards_and_matches_clean_run(tmp_path, tok):
    src = _jsonl(tmp_path / "a.jsonl", _texts(1200, seed=3))  # 239 KB: 12 shards of 20 KB
    common = ["--input", src, "--tokenizer", "gpt2", "--shard-mb", 0.02, "--workers", 1]
    _run(*common, "--output-prefix", tmp_path / "clean")
    p = _run_subprocess(*common, "--output-prefix", tmp_path / "o", "--stop-after-shards", 3, check=False)
    assert p.returncode == 3
    assert not os.path.exists(tmp_path / "o.idx")  # killed before the merge: no pair at all
    assert len(list((tmp_path / "o.partial").glob("shard_*.json"))) == 3
    p = _run(*common, "--output-prefix", tmp_path / "o")
    assert "resuming: 3 of 12" in p.stderr
    assert (tmp_path / "o.bin").read_bytes() == (tmp_path / "clean.bin").read_bytes()
    assert (tmp_path / "o.idx").read_bytes() == (tmp_path / "clean.idx").read_bytes()


@pytest.mark.slow  # real SIGKILLs at wall-clock delays: seconds, and load-dependent
def test_sigkill_at_any_time_never_leaves_a_valid_looking_pair(tmp_path, tok):
    src = _jsonl(tmp_path / "a.jsonl", _texts(6000, seed=4))
    for delay in (0.3, 0.8, 1.5):
        prefix = tmp_path / f"k{delay}"
        proc = subprocess.Popen([sys.executable, TOOL, "--no-progress", "--input", src, "--tokenizer", "gpt2",
                                 "--output-prefix", str(prefix), "--workers", "2", "--shard-mb", "0.02"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if os.path.exists(f"{prefix}.idx"):  # finished before the kill: then it must be complete and correct
            ds = IndexedDataset(prefix)
            assert len(ds) == 6000 and read_manifest(prefix)["num_documents"] == 6000
        else:
            with pytest.raises(UserError):
                IndexedDataset(prefix)


def test_check_manifest_rejects_other_tokenizer_and_out_of_range_ids(tmp_path, tok):
    src = _jsonl(tmp_path / "a.jsonl", _texts(30))
    _run("--input", src, "--tokenizer", "gpt2", "--output-prefix", tmp_path / "g")
    assert check_manifest(tmp_path / "g", tok)["num_documents"] == 30
    bert = get_tokenizer("bert-base-uncased")
    with pytest.raises(UserError, match="says tokenizer 'gpt2' but the config uses 'bert-base-uncased'"):
        check_manifest(tmp_path / "g", bert)
    os.remove(tmp_path / "g.manifest.json")  # a manifest-less (foreign) dataset: ids are still range-checked
    with pytest.warns(UserWarning), pytest.raises(UserError, match=">= vocab size 30522"):
        check_manifest(tmp_path / "g", bert)


def test_inspect_dataset_tool(tmp_path, tok):
    src = _jsonl(tmp_path / "a.jsonl", ["First document here.", "Middle.", "The last one."])
    _run("--input", src, "--tokenizer", "gpt2", "--output-prefix", tmp_path / "g")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_dataset.py"), str(tmp_path / "g")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "First document here.<|endoftext|>" in p.stdout and "The last one.<|endoftext|>" in p.stdout
    assert "OK: idx/bin consistent" in p.stdout
    (tmp_path / "g.bin").write_bytes((tmp_path / "g.bin").read_bytes()[:-2])
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_dataset.py"), str(tmp_path / "g")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and "truncated" in p.stderr and "Traceback" not in p.stderr


def test_build_loader_end_to_end(tmp_path, tok):
    from megabd3.config.schema import Config
    from megabd3.data.loader import build_loader

    src = _jsonl(tmp_path / "a.jsonl", _texts(300, seed=5))
    _run("--input", src, "--tokenizer", "gpt2", "--output-prefix", tmp_path / "d", "--split", "train:0.9", "--split", "valid:0.1")
    cfg = Config()
    cfg.data.train_prefix, cfg.data.valid_prefix = str(tmp_path / "d_train"), str(tmp_path / "d_valid")
    cfg.data.seq_len, cfg.data.cache_dir = 32, str(tmp_path / "cache")
    b0 = next(iter(build_loader(cfg, "train", 0, 2, consumed_samples=8, batch_size=2)))
    b1 = next(iter(build_loader(cfg, "train", 1, 2, consumed_samples=8, batch_size=2)))
    whole = next(iter(build_loader(cfg, "train", 0, 1, consumed_samples=8, batch_size=4)))
    assert b0["input_ids"].shape == (2, 32) and b0["input_ids"].dtype.is_floating_point is False
    assert b0["attention_mask"].dtype == __import__("torch").bool
    assert b0["sample_index"].tolist() + b1["sample_index"].tolist() == whole["sample_index"].tolist()
    assert (b0["input_ids"] == whole["input_ids"][:2]).all() and (b1["input_ids"] == whole["input_ids"][2:]).all()
    assert int(whole["input_ids"].max()) < tok.vocab_size
    ev = list(build_loader(cfg, "valid", 0, 1))
    n_valid = sum(int((b["sample_index"] >= 0).sum()) for b in ev)
    assert n_valid == len(__import__("megabd3.data.samples", fromlist=["x"]).SampleDataset(
        cfg.data.valid_prefix, 32, "wrap", tok, shuffle=False, cache_dir=cfg.data.cache_dir))
    cfg.data.tokenizer = "bert-base-uncased"
    with pytest.raises(UserError, match="says tokenizer 'gpt2'"):
        build_loader(cfg, "train", 0, 1)
