"""Data pipeline: tokenizers, Megatron MMIDIDX datasets, manifests, BD3 samples and the resumable loader.

The public names below are imported lazily (PEP 562), so ``import megabd3.data`` stays cheap: the
preprocessing workers and the tools import only the submodules they use, and torch is loaded only when
``SampleDataset``, ``build_loader`` or ``ResumableDistributedSampler`` is first touched.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "get_tokenizer": "megabd3.data.tokenizers",
    "Tokenizer": "megabd3.data.tokenizers",
    "IndexedDataset": "megabd3.data.indexed",
    "IndexedDatasetWriter": "megabd3.data.indexed",
    "read_manifest": "megabd3.data.manifest",
    "check_manifest": "megabd3.data.manifest",
    "SampleDataset": "megabd3.data.samples",
    "build_loader": "megabd3.data.loader",
    "ResumableDistributedSampler": "megabd3.data.loader",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from megabd3.data.indexed import IndexedDataset, IndexedDatasetWriter
    from megabd3.data.loader import ResumableDistributedSampler, build_loader
    from megabd3.data.manifest import check_manifest, read_manifest
    from megabd3.data.samples import SampleDataset
    from megabd3.data.tokenizers import Tokenizer, get_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megabd3.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
