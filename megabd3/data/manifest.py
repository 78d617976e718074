"""The ``<prefix>.manifest.json`` sidecar: what a dataset was built from and with which tokenizer.

The MMIDIDX files record no tokenizer identity, so a dataset tokenized with BERT trains silently with a
GPT-2 config. The manifest closes that hole; Megatron ignores it, so compatibility is untouched.
:func:`check_manifest` compares it with the run's tokenizer and samples documents to check that every
id is below the vocabulary size (also for manifest-less datasets from Megatron or NeoX).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import numpy as np

from megabd3.errors import UserError
from megabd3.io import atomic_write_json

MANIFEST_FORMAT = "megabd3-dataset-manifest"
MANIFEST_VERSION = 1
TOOL_VERSION = "megabd3-preprocess 1"


def manifest_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.manifest.json"


def read_manifest(prefix: str | os.PathLike) -> Optional[dict]:
    """The manifest of ``prefix`` or None when there is none (datasets from other tools)."""
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); delete it or re-run tools/preprocess_data.py") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a megabd3 dataset manifest (format {m.get('format') if isinstance(m, dict) else None!r}); delete it or re-run tools/preprocess_data.py")
    return m


def write_manifest(prefix: str | os.PathLike, manifest: dict) -> None:
    """Atomic write (temp + rename)."""
    atomic_write_json(manifest_path(prefix), {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest},
                      indent=1)


def check_manifest(prefix: str | os.PathLike, tokenizer, check_max_id_samples: int = 64, seed: int = 0) -> Optional[dict]:
    """Raise ``UserError`` when ``prefix`` was not built with ``tokenizer`` (name, hash, vocab, EOD).

    Then sample ``check_max_id_samples`` documents (first, last and random ones) and check every id is
    below ``tokenizer.vocab_size``. Returns the manifest (None for a manifest-less dataset, with a warning).
    """
    from megabd3.data.indexed import IndexedDataset

    m = read_manifest(prefix)
    if m is None:
        warnings.warn(f"{prefix} has no .manifest.json (built by another tool?): its tokenizer cannot be verified, "
                      "only the id range is checked", stacklevel=2)
    else:
        tm = m.get("tokenizer", {})
        fix = f"re-run tools/preprocess_data.py --tokenizer {tokenizer.name} or set data.tokenizer={tm.get('name')}"
        if tm.get("name") != tokenizer.name:
            raise UserError(f"{manifest_path(prefix)} says tokenizer {tm.get('name')!r} but the config uses {tokenizer.name!r}; {fix}")
        for key in ("vocab_size", "eod_id"):
            if tm.get(key) != getattr(tokenizer, key):
                raise UserError(f"{manifest_path(prefix)}: tokenizer.{key} {tm.get(key)} != {getattr(tokenizer, key)} of "
                                f"{tokenizer.name} in the config; {fix}")
        if tm.get("hash") != tokenizer.hash:
            raise UserError(f"{manifest_path(prefix)}: tokenizer hash {str(tm.get('hash'))[:12]}… != {tokenizer.hash[:12]}… of "
                            f"{tokenizer.name} (same name, different vocabulary or special ids); {fix}")
    if check_max_id_samples > 0:
        ds = IndexedDataset(prefix)
        if len(ds):
            rng = np.random.default_rng(seed)
            picks = {0, len(ds) - 1} | set(rng.integers(0, len(ds), size=check_max_id_samples).tolist())
            for i in sorted(picks):
                seq = ds[i]
                if seq.size and int(seq.max()) >= tokenizer.vocab_size:
                    raise UserError(f"{prefix}: document {i} holds token id {int(seq.max())} >= vocab size {tokenizer.vocab_size} "
                                    f"of {tokenizer.name}; the data was tokenized with another tokenizer: re-run tools/preprocess_data.py")
                if tokenizer.mask_id < tokenizer.vocab_size and seq.size and bool((seq == tokenizer.mask_id).any()):
                    # an in-vocabulary mask (BERT's [MASK], tools/add_mask_token.py) that occurs in the text: a clean
                    # token equal to the mask would be scored with the mask logit at -inf (infinite loss)
                    raise UserError(f"{prefix}: document {i} contains the mask id {tokenizer.mask_id} of {tokenizer.name} as "
                                    "text; pick another mask token (tools/add_mask_token.py --mask-token) and re-run "
                                    "tools/preprocess_data.py")
    return m
