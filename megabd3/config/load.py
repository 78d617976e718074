"""Load a config: JSON files composed with ``"base"``, ``--set`` overrides, strict typing, validation.

Resolution order (later wins): the files listed in ``"base"`` (each resolved recursively, paths
relative to the file that names them), then the file's own keys, then each ``--set a.b.c=value`` in
order. Dicts merge key by key; every other value (lists included) is replaced.

Nothing stops at the first mistake: unknown keys, wrong types, bad JSON, missing bases, bad overrides
and cross-field inconsistencies are all collected and raised together as one :class:`ConfigError`,
each line naming the file (or ``--set``) the offending key came from.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from megabd3.config.deepspeed import deepspeed_problems
from megabd3.config.errors import ConfigError, Problem
from megabd3.config.merge import deep_merge
from megabd3.config.schema import Config
from megabd3.config.validate import check
from megabd3.io import atomic_write_json

Key = tuple[str, ...]
Provenance = dict[Key, str]  # leaf key path -> the file (or "--set") that set it last

BASE_KEY = "base"
SET_SOURCE = "--set"


# ----------------------------------------------------------------------------- schema introspection

@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint (the schema uses ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.lru_cache(maxsize=1)
def all_key_paths() -> tuple[str, ...]:
    """Every leaf key path of the schema, e.g. ``diffusion.noise.mu`` (used for suggestions)."""
    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for name, hint in _fields(cls).items():
            if _is_section(hint):
                walk(hint, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    walk(Config, "")
    return tuple(out)


def _suggest(key: str, valid: Sequence[str], prefix: str) -> str:
    """A "did you mean" hint: a close sibling, else the same (or a close) name in another section."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5) or [v for v in valid if v.startswith(key)][:1]
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    leaves = {p.rsplit(".", 1)[-1]: p for p in all_key_paths()}
    close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.8)
    if close:
        return f"did you mean '{leaves[close[0]]}'?"
    return f"valid keys here: {', '.join(valid)}"


def _type_name(hint: Any) -> str:
    if _is_section(hint):
        return "object (section)"
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if hint is dict or origin is dict:
        return "object"
    return getattr(origin or hint, "__name__", str(hint))


def _coerce(hint: Any, value: Any) -> tuple[bool, Any]:
    """Check a JSON value against a field type; ints are accepted (and converted) for floats."""
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        for arg in typing.get_args(hint):
            ok, out = _coerce(arg, value)
            if ok:
                return True, out
        return False, value
    if hint is type(None):
        return value is None, value
    base = origin or hint
    if base is bool:
        return isinstance(value, bool), value
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if base is str:
        return isinstance(value, str), value
    if base is list:
        return isinstance(value, list), copy.deepcopy(value)
    if base is dict:
        return isinstance(value, dict), copy.deepcopy(value)
    return isinstance(value, base), value


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- files and merging

def display_path(path: os.PathLike | str) -> str:
    """A path as users typed it: relative to the working directory when below it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)



def _leaf_keys(data: Any, prefix: Key = ()) -> list[Key]:
    if isinstance(data, dict) and data:
        return [leaf for k, v in data.items() for leaf in _leaf_keys(v, prefix + (k,))]
    return [prefix]


def _overlay(prov: Provenance, over: Provenance) -> None:
    """Provenance after deep-merging data whose leaves are ``over`` on top of data with ``prov``.

    A new leaf replaces any old leaf above it (a scalar replaced by a dict) and any below it (a dict
    replaced by a scalar); that is exactly what :func:`deep_merge` does to the data.
    """
    for key, source in over.items():
        n = len(key)
        stale = [k for k in prov if (len(k) < n and key[: len(k)] == k) or (len(k) > n and k[:n] == key)]
        for k in stale:
            del prov[k]
        prov[key] = source


def _sourced(data: Any, prefix: Key, source: str) -> Provenance:
    return {leaf: source for leaf in _leaf_keys(data, prefix) if leaf}  # () = an empty top level


def _read_json(path: Path, shown: str) -> tuple[Optional[dict[str, Any]], list[Problem]]:
    problems: list[Problem] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                problems.append(Problem((k,), f"key '{k}' appears twice in one object; keep one", shown))
            out[k] = v
        return out

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [Problem((), f"cannot read the file: {exc.strerror or exc}", shown)]
    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        return None, [Problem((), f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", shown)]
    if not isinstance(data, dict):
        return None, problems + [Problem((), f"the top level must be a JSON object, found {type(data).__name__}", shown)]
    return data, problems


def _resolve_file(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], Provenance, list[Problem]]:
    """The merged content of ``path`` with its bases, where each leaf came from, and problems."""
    shown = display_path(path)
    data, problems = _read_json(path, shown)
    if data is None:
        return {}, {}, problems
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        problems.append(Problem((BASE_KEY,), f"'base' must be a list of file paths, found {_shown(bases)}", shown))
        bases = []
    merged: dict[str, Any] = {}
    prov: Provenance = {}
    for entry in bases:
        base_path = (path.parent / entry).resolve()
        if base_path in chain or base_path == path:
            problems.append(Problem((BASE_KEY,), f"base '{entry}' includes itself (cycle through {display_path(base_path)})", shown))
            continue
        if not base_path.is_file():
            problems.append(Problem((BASE_KEY,), f"base '{entry}' not found (looked for {display_path(base_path)}; "
                                                 f"base paths are relative to the including file)", shown))
            continue
        sub, sub_prov, sub_problems = _resolve_file(base_path, chain + (path,))
        merged = deep_merge(merged, sub)
        _overlay(prov, sub_prov)
        problems += sub_problems
    merged = deep_merge(merged, data)
    _overlay(prov, _sourced(data, (), shown))
    return merged, prov, problems


# ----------------------------------------------------------------------------- overrides

def _schema_target(parts: Sequence[str]) -> tuple[str, Any]:
    """What ``a.b.c`` names: ("section", cls), ("field", hint) or ("free", None) inside a dict field.

    Raises KeyError with a "did you mean" message for an unknown key.
    """
    cls: Any = Config
    for i, part in enumerate(parts):
        fields = _fields(cls)
        if part not in fields:
            prefix = ".".join(parts[:i]) + ("." if i else "")
            raise KeyError(f"unknown key '{'.'.join(parts[: i + 1])}'; {_suggest(part, list(fields), prefix)}")
        hint = fields[part]
        if _is_section(hint):
            cls = hint
            continue
        rest = parts[i + 1:]
        if not rest:
            return "field", hint
        if hint is dict or typing.get_origin(hint) is dict:
            return "free", None  # a key inside a pass-through dict (e.g. deepspeed.zero_optimization.x)
        raise KeyError(f"'{'.'.join(parts[: i + 1])}' is a {_type_name(hint)}, it has no key '{rest[0]}'")
    return "section", cls


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_override_value(hint: Any, text: str) -> Any:
    """Parse the text of ``--set key=text`` for a field of type ``hint``; raises ValueError."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        if text.strip().lower() in ("null", "none"):
            return None
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return parse_override_value(arg, text)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    base = origin or hint
    if base is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected bool (true/false), found {text!r}")
    if base is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"expected int, found {text!r}") from None
    if base is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(f"expected float, found {text!r}") from None
    if base is str:
        if text.startswith('"'):
            try:
                value = json.loads(text)
                if isinstance(value, str):
                    return value
            except json.JSONDecodeError:
                pass
        return text
    # list, dict and whole sections are given as JSON
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected JSON {_type_name(hint)}, found {text!r} ({exc.msg})") from None
    want = list if base is list else dict
    if not isinstance(value, want):
        raise ValueError(f"expected JSON {_type_name(hint)}, found {text!r}")
    return value


def _parse_free_value(text: str) -> Any:
    """A value inside a pass-through dict: JSON if it parses, else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_overrides(raw: dict[str, Any], prov: Provenance, overrides: Iterable[str]) -> list[Problem]:
    problems: list[Problem] = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem((), f"'{item}' is not key=value (e.g. --set diffusion.block_size=4)", SET_SOURCE))
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        parts = tuple(p for p in key.split("."))
        if not key or any(not p for p in parts):
            problems.append(Problem((), f"'{item}' has an empty key path", SET_SOURCE))
            continue
        try:
            kind, hint = _schema_target(parts)
            if kind == "free":
                value = _parse_free_value(text)
            elif kind == "section":
                value = parse_override_value(dict, text)
            else:
                value = parse_override_value(hint, text)
        except KeyError as exc:
            problems.append(Problem((key,), exc.args[0], SET_SOURCE))
            continue
        except ValueError as exc:
            problems.append(Problem((key,), f"{key}: {exc}", SET_SOURCE))
            continue
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)  # same semantics as a file on top
        else:
            node[parts[-1]] = value
        _overlay(prov, _sourced(value, parts, SET_SOURCE))
    return problems


# ----------------------------------------------------------------------------- building the dataclasses

def _origin(prov: Provenance, key: Key) -> str:
    """The file(s) that set ``key`` or anything below it."""
    if key in prov:
        return prov[key]
    sources = sorted({s for k, s in prov.items() if k[: len(key)] == key})
    return ", ".join(sources)


def _build(cls: type, data: dict[str, Any], prov: Provenance, prefix: Key) -> tuple[Any, list[Problem]]:
    """Instantiate ``cls`` from ``data``; unknown keys and wrong types become problems (defaults kept)."""
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    problems: list[Problem] = []
    dotted = ".".join(prefix) + ("." if prefix else "")
    for name, value in data.items():
        key = prefix + (name,)
        if name not in fields:
            problems.append(Problem((".".join(key),), f"unknown key '{dotted}{name}'; {_suggest(name, list(fields), dotted)}",
                                    _origin(prov, key)))
            continue
        hint = fields[name]
        if _is_section(hint):
            if isinstance(value, dict):
                kwargs[name], sub = _build(hint, value, prov, key)
                problems += sub
            else:
                problems.append(Problem((".".join(key),), f"{dotted}{name}: expected an object (section), found {_shown(value)}",
                                        _origin(prov, key)))
            continue
        ok, converted = _coerce(hint, value)
        if ok:
            kwargs[name] = converted
        else:
            problems.append(Problem((".".join(key),), f"{dotted}{name}: expected {_type_name(hint)}, found {_shown(value)}",
                                    _origin(prov, key)))
    return cls(**kwargs), problems


def _locate(problem: Problem, prov: Provenance) -> Problem:
    """Attach the file(s) that set a cross-field problem's keys (or "defaults")."""
    if problem.source:
        return problem
    sources: list[str] = []
    for key in problem.keys:
        origin = _origin(prov, tuple(key.split(".")))
        for s in origin.split(", ") if origin else []:
            if s not in sources:
                sources.append(s)
    return dataclasses.replace(problem, source=", ".join(sources) if sources else "defaults")


def _finish(raw: dict[str, Any], prov: Provenance, problems: list[Problem], override_problems: list[Problem],
            what: str, *, world_size: Optional[int], training: bool, cuda: Optional[bool], validate: bool) -> Config:
    cfg, build_problems = _build(Config, raw, prov, ())
    problems = problems + build_problems + override_problems  # in the order the user reads them
    if isinstance(getattr(cfg.training, "init_from", None), str) and cfg.training.init_from.startswith("~"):
        # recipes point at the asset cache (~/.cache/megabd3/...): expand once, here, for every reader
        cfg.training.init_from = os.path.expanduser(cfg.training.init_from)
    if validate:
        ws = world_size if world_size else (cfg.parallel.world_size or None)
        cross = check(cfg, ws, training=training, cuda=cuda)
        mp = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
        dp = ws // mp if ws and mp >= 1 and ws % mp == 0 else None
        cross += deepspeed_problems(cfg, dp, cuda=cuda)
        problems += [_locate(p, prov) for p in cross]
    if problems:
        # dict.fromkeys: a file reached twice through "base" (a diamond) reports its problems once
        raise ConfigError(list(dict.fromkeys(str(p) for p in problems)), what)
    return cfg


# ----------------------------------------------------------------------------- public API

def load_config(path: os.PathLike | str, overrides: Sequence[str] = (), *, world_size: Optional[int] = None,
                training: bool = True, cuda: Optional[bool] = None, validate: bool = True) -> Config:
    """Load, merge, override, type-check and validate a config file; raise ConfigError with every problem.

    path: a JSON file (``"base": [...]`` lists files merged first, relative to this file).
    overrides: ``"a.b.c=value"`` strings, typed by the schema (lists/dicts as JSON).
    world_size: the number of ranks when known (enables the global-batch and DeepSpeed batch checks).
    training: False for evaluation/sampling (allows flex attention without CUDA).
    cuda: override CUDA detection (tests). validate: False skips the cross-field checks.
    """
    p = Path(path)
    what = f"config {display_path(p)}" + (" with --set overrides" if overrides else "")
    if not p.is_file():
        raise ConfigError([f"{display_path(p)}: config file not found; pass a path like configs/demo.json"], what)
    raw, prov, problems = _resolve_file(p.resolve(), ())
    override_problems = _apply_overrides(raw, prov, overrides)
    return _finish(raw, prov, problems, override_problems, what, world_size=world_size, training=training, cuda=cuda,
                   validate=validate)


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>", overrides: Sequence[str] = (),
                     world_size: Optional[int] = None, training: bool = True, cuda: Optional[bool] = None,
                     validate: bool = True) -> Config:
    """Build a Config from a plain dict (e.g. a checkpoint's config.json); same checks as load_config."""
    if BASE_KEY in data:
        raise ConfigError([f"{source}: 'base' is only allowed in files"], f"config {source}")
    raw = copy.deepcopy(data)
    prov = _sourced(raw, (), source)
    override_problems = _apply_overrides(raw, prov, overrides)
    return _finish(raw, prov, [], override_problems, f"config {source}", world_size=world_size, training=training, cuda=cuda,
                   validate=validate)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The full config as plain JSON-able dicts (every field, defaults included)."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config, ignore: Iterable[str] = ()) -> str:
    """A 16-hex-digit hash of the canonical JSON of the config; ``ignore`` drops dotted key paths."""
    data = config_to_dict(cfg)
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def save_resolved(cfg: Config, run_dir: os.PathLike | str, name: str = "config.json") -> Path:
    """Write the resolved config to ``run_dir/config.json`` atomically (temp file + os.replace)."""
    out_dir = Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    atomic_write_json(target, config_to_dict(cfg), indent=2)
    return target
