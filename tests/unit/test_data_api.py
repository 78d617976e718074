"""megabd3.data re-exports its public API lazily: the names are the submodules' objects, and importing
the package loads neither torch nor transformers nor datasets."""
import subprocess
import sys

import megabd3.data as data

PUBLIC = {
    "get_tokenizer": "tokenizers", "IndexedDataset": "indexed", "read_manifest": "manifest",
    "check_manifest": "manifest", "SampleDataset": "samples", "build_loader": "loader",
    "ResumableDistributedSampler": "loader",
}


def test_exports_are_the_submodule_objects():
    import importlib

    for name, mod in PUBLIC.items():
        assert getattr(data, name) is getattr(importlib.import_module(f"megabd3.data.{mod}"), name)
        assert name in data.__all__ and name in dir(data)
    try:
        data.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("unknown attribute did not raise")


def test_import_is_cheap():
    code = ("import sys, megabd3.data; from megabd3.data import preprocess, get_tokenizer; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
