"""tools/preprocess_data.py with an --output-prefix that cannot be written: one `error:` line, exit 1,
before any work, nothing left behind (issue 11; it used to raise FileNotFoundError/NotADirectoryError)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from megabd3.data.preprocess import check_output_prefix
from megabd3.errors import UserError

TOOL = Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"


def _cli():
    spec = importlib.util.spec_from_file_location("megabd3_preprocess_cli_outpath", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, prefix: str, capsys) -> str:  # noqa: ANN001
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello world"}\n')
    with pytest.raises(SystemExit) as info:
        # the tokenizer is never loaded: the output check comes first
        _cli().main(["--input", str(src), "--tokenizer", "no-such-tokenizer", "--output-prefix", prefix,
                     "--workers", "1", "--no-progress"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output-prefix ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_output_dir_is_one_line(tmp_path, capsys):
    err = _run(tmp_path, "/proc/x/y", capsys)
    # root passes the permission check and fails creating; other users fail the permission check first
    assert "cannot create files in /proc/x" in err or "no permission" in err, err
    assert not os.path.exists("/proc/x")


def test_file_in_the_path_is_one_line_and_nothing_is_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = _run(tmp_path, str(tmp_path / "afile" / "sub" / "deeper" / "y"), capsys)
    assert f"{tmp_path / 'afile'} is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.jsonl"]


def test_directory_as_prefix_is_rejected(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        check_output_prefix(str(tmp_path))


def test_good_prefix_creates_its_directory_and_leaves_no_probe(tmp_path):
    out = tmp_path / "a" / "b" / "name"
    assert check_output_prefix(str(out)) == out.parent
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []
