"""Render docs/config_reference.md from the schema (section, field, type, default, doc).

``tools/gen_config_docs.py`` writes the file; a test fails when the committed file is stale.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from megabd3.config.load import _fields, _is_section, _type_name
from megabd3.config.schema import Config

HEADER = """# Config reference

Generated from `megabd3/config/schema.py` by `python tools/gen_config_docs.py`; do not edit by hand
(`tests/unit/test_config_files.py` fails when this file is stale).

A config is a JSON object mirroring these sections, e.g. `{"model": {"hidden_size": 768}}`. A file
may list other files in `"base": [...]` (paths relative to the file; merged first, later wins) and
any key can be overridden with `--set section.key=value`. Check a config with
`python -m megabd3.config FILE [--set k=v ...] [--world-size N]`.
"""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(cls: type, path: str, out: list[str]) -> None:
    doc = " ".join((cls.__doc__ or "").split())
    out += ["", f"## `{path}`", "", doc, "", "| key | type | default | description |", "|---|---|---|---|"]
    nested: list[tuple[type, str]] = []
    hints = _fields(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if _is_section(hint):
            out.append(f"| `{path}.{f.name}` | section | see below | {_cell(f.metadata.get('doc', ''))} |")
            nested.append((hint, f"{path}.{f.name}"))
            continue
        default = json.dumps(_default(f))
        out.append(f"| `{path}.{f.name}` | {_type_name(hint)} | `{_cell(default)}` | {_cell(f.metadata.get('doc', ''))} |")
    for sub, sub_path in nested:
        _section(sub, sub_path, out)


def render_reference() -> str:
    """The full markdown text of docs/config_reference.md."""
    out = [HEADER.rstrip("\n")]
    top_level: list[str] = []
    hints = _fields(Config)
    for f in dataclasses.fields(Config):
        hint = hints[f.name]
        if _is_section(hint):
            _section(hint, f.name, out)
        else:
            top_level.append(f"| `{f.name}` | {_type_name(hint)} | `{_cell(json.dumps(_default(f)))}` | "
                             f"{_cell(f.metadata.get('doc', ''))} |")
    out += ["", "## Top-level keys", "", "| key | type | default | description |", "|---|---|---|---|"]
    out += top_level
    out += ["| `base` | list | `[]` | Files merged before this one (only in files; relative to the file). |"]
    return "\n".join(out) + "\n"
