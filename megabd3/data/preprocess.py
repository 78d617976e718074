"""Text -> Megatron MMIDIDX datasets, in parallel, resumably (the engine of tools/preprocess_data.py).

Pipeline:

1. **Plan.** Inputs (jsonl / txt / parquet files, or an HF dataset) are cut into shards: byte ranges of
   line-oriented files (aligned to line starts, so one big jsonl still spreads over all workers), parquet
   row groups, or row ranges / stream shards of an HF dataset. The plan is saved in ``<prefix>.partial/``.
2. **Tokenize.** ``--workers`` processes take shards; each reads its shard in batches (~1000 documents),
   batch-encodes (tiktoken for GPT-2, the Rust tokenizers backend otherwise), appends EOD with numpy and
   writes ``shard_XXXXX.{bin,idx}`` atomically, then a ``shard_XXXXX.json`` with its counts (the marker
   that the shard is done). A killed run resumes from the finished shards when the plan still matches.
3. **Merge.** Documents keep input order. Each output split (a document range) is assembled by
   byte-copying shard ranges (numpy indices throughout), published atomically (``.idx`` last) with its
   ``.manifest.json``; then the work directory is removed.

Empty documents are skipped and counted; invalid UTF-8 is an error naming the file and line unless
``errors="replace"``.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megabd3.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from megabd3.data.manifest import TOOL_VERSION, write_manifest
from megabd3.errors import UserError
from megabd3.io import atomic_write_json

LINE_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt"}
PARQUET_EXT = {".parquet": "parquet"}
BATCH_DOCS = 1000
BATCH_BYTES = 4 << 20


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class Shard:
    """A contiguous piece of the input: bytes [start, stop) of a line file, row groups, or HF rows."""

    index: int
    kind: str  # jsonl | txt | txtfile | parquet | hf | hf_stream
    path: str
    start: int
    stop: int
    nbytes: int


@dataclass
class Job:
    """Everything the workers need (picklable)."""

    inputs: List[str]
    tokenizer: str
    text_key: str = "text"
    txt_mode: str = "lines"  # lines: one document per line; file: one document per file
    errors: str = "strict"  # strict | replace (invalid UTF-8)
    hf_dataset: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    hf_data_files: Optional[List[str]] = None  # local files for a packaged builder (json, parquet, text, csv)
    streaming: bool = False
    shard_bytes: int = 0  # 0 = automatic
    workers: int = 1
    reference_separator: bool = True
    shards: List[Shard] = field(default_factory=list)


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Globs -> sorted, de-duplicated files; a pattern matching nothing is an error."""
    files: List[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise UserError(f"input {pat} matches no file; check the path or glob (quote globs so the shell does not expand them)")
        files.extend(hits)
    out = list(dict.fromkeys(os.path.abspath(f) for f in files))
    for f in out:
        kind = _kind(f)
        if kind is None:
            raise UserError(f"input {f}: unknown file type {Path(f).suffix!r}; expected .jsonl/.json, .txt or .parquet")
    return out


def expand_data_files(patterns: Sequence[str]) -> List[str]:
    """``--hf-data-files`` globs -> sorted absolute paths (any extension: the HF builder decides the format)."""
    out: List[str] = []
    for pat in patterns:
        hits = sorted(h for h in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(h))
        if not hits:
            raise UserError(f"--hf-data-files {pat} matches no file; check the path or glob (quote globs so the shell does not expand them)")
        out.extend(os.path.abspath(h) for h in hits)
    return list(dict.fromkeys(out))


def _kind(path: str) -> Optional[str]:
    suffixes = Path(path).suffixes
    ext = suffixes[-1].lower() if suffixes else ""
    return LINE_EXT.get(ext) or PARQUET_EXT.get(ext)


def _line_ranges(path: str, target: int) -> List[Tuple[int, int]]:
    """Byte ranges of about ``target`` bytes; each line belongs to the range holding its first byte."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    n = max(1, math.ceil(size / target))
    cuts = [round(i * size / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def plan_shards(job: Job) -> List[Shard]:
    shards: List[Shard] = []
    if job.hf_dataset:
        return _plan_hf(job)
    files = job.inputs
    total = sum(os.path.getsize(f) for f in files)
    # enough shards to keep every worker busy to the end (8 per worker), none smaller than 256 KB,
    # none larger than 256 MB (bounded memory per shard, fine-grained resume)
    target = job.shard_bytes or int(min(256 << 20, max(256 << 10, total / max(1, 8 * job.workers))))
    for f in files:
        kind = _kind(f)
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as exc:
                raise UserError(f"input {f} is not a readable parquet file ({type(exc).__name__}: {exc})") from None
            for rg in range(meta.num_row_groups):
                shards.append(Shard(len(shards), "parquet", f, rg, rg + 1, meta.row_group(rg).total_byte_size))
        elif kind == "txt" and job.txt_mode == "file":
            shards.append(Shard(len(shards), "txtfile", f, 0, os.path.getsize(f), os.path.getsize(f)))
        else:
            for a, b in _line_ranges(f, target):
                shards.append(Shard(len(shards), kind, f, a, b, b - a))
    return shards


_HF_LOADED: dict = {}


def _load_hf(job: Job, streaming: bool):
    """The HF dataset of ``job``, loaded once per process (forked workers inherit the planner's copy, so
    shards do not each pay for ``load_dataset``; Arrow tables are memory-mapped and fork-safe)."""
    files = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in job.hf_data_files or ())
    key = (job.hf_dataset, job.hf_config, job.hf_split, files, streaming)
    if key not in _HF_LOADED:
        _HF_LOADED.clear()  # one dataset at a time: do not pin old ones in memory
        _HF_LOADED[key] = _load_hf_uncached(job, streaming)
    return _HF_LOADED[key]


def _load_hf_uncached(job: Job, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(job.hf_dataset, job.hf_config, split=job.hf_split, streaming=streaming,
                                     data_files=job.hf_data_files or None)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot load HF dataset {job.hf_dataset!r} config {job.hf_config!r} split {job.hf_split!r} ({first}); "
                        "offline, use local files with --input, or a packaged builder: --hf-dataset json --hf-data-files FILES") from None


def _plan_hf(job: Job) -> List[Shard]:
    if job.streaming:
        ds = _load_hf(job, True)
        return [Shard(i, "hf_stream", job.hf_dataset, i, ds.num_shards, 0) for i in range(ds.num_shards)]
    ds = _load_hf(job, False)
    n = len(ds)
    per = max(1, math.ceil(n / max(1, 8 * job.workers)))
    return [Shard(i, "hf", job.hf_dataset, a, min(n, a + per), 0) for i, a in enumerate(range(0, n, per))]


# ------------------------------------------------------------------------------------------- reading


@dataclass
class ShardStats:
    documents: int = 0
    empty_skipped: int = 0
    replaced_utf8: int = 0
    tokens: int = 0
    bytes: int = 0


def _decode(raw: bytes, shard: Shard, errors: str, stats: ShardStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors == "replace":
            stats.replaced_utf8 += 1
            return raw.decode("utf-8", errors="replace")
        line = 1 + _line_of(shard, exc.start)
        raise UserError(f"{shard.path}: invalid UTF-8 byte {raw[exc.start:exc.start + 1]!r} at line {line}; "
                        "convert the file to UTF-8 or pass --errors replace") from None


def _line_of(shard: Shard, offset_in_chunk: int) -> int:
    """0-based line number in the file of byte ``shard.start + offset_in_chunk`` (error messages only)."""
    with open(shard.path, "rb") as f:
        return f.read(shard.start + offset_in_chunk).count(b"\n")


def _read_range(shard: Shard) -> bytes:
    """The whole lines whose first byte lies in [start, stop)."""
    with open(shard.path, "rb") as f:
        start = shard.start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # we are mid-line: that line belongs to the previous shard
                f.readline()
            start = f.tell()
        if start >= shard.stop:
            return b""
        data = f.read(shard.stop - start)
        if data and not data.endswith(b"\n"):
            data += f.readline()  # finish the last line that starts inside the range
        return data


def iter_texts(shard: Shard, job: Job, stats: ShardStats) -> Iterator[str]:
    """Documents of a shard, in order (empty ones skipped and counted in ``stats``)."""
    if shard.kind in ("jsonl", "txt", "txtfile"):
        raw = _read_range(shard) if shard.kind != "txtfile" else Path(shard.path).read_bytes()
        stats.bytes += len(raw)
        text = _decode(raw, shard, job.errors, stats)
        if shard.kind == "txtfile":
            rows: Iterator[str] = iter([text])
        elif shard.kind == "txt":
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # the newline that ends the shard's last line, not an empty document
            rows = (ln[:-1] if ln.endswith("\r") else ln for ln in lines)  # CRLF files: no stray "\r" token
        else:
            rows = _json_rows(text, shard, job)
    elif shard.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(shard.path)
        if job.text_key not in pf.schema_arrow.names:
            raise UserError(f"{shard.path} has no column {job.text_key!r} (columns: {pf.schema_arrow.names}); pass --text-key")
        table = pf.read_row_groups(list(range(shard.start, shard.stop)), columns=[job.text_key])
        stats.bytes += table.nbytes
        rows = iter(table.column(0).to_pylist())
    else:
        rows = _hf_rows(shard, job, stats)
    for t in rows:
        if t is None or not t.strip():
            stats.empty_skipped += 1
            continue
        yield t


def _json_rows(text: str, shard: Shard, job: Job) -> Iterator[Optional[str]]:
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{shard.path}: line {1 + _line_of(shard, 0) + i} is not valid JSON ({exc.msg}); fix the line or the file format") from None
        if not isinstance(obj, dict) or job.text_key not in obj:
            keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{shard.path}: line {1 + _line_of(shard, 0) + i} has no key {job.text_key!r} (found {keys}); pass --text-key")
        val = obj[job.text_key]
        if val is not None and not isinstance(val, str):
            raise UserError(f"{shard.path}: line {1 + _line_of(shard, 0) + i}: {job.text_key!r} is {type(val).__name__}, expected a string")
        yield val


def _hf_rows(shard: Shard, job: Job, stats: ShardStats) -> Iterator[Optional[str]]:
    if shard.kind == "hf_stream":
        ds = _load_hf(job, True).shard(num_shards=shard.stop, index=shard.start, contiguous=True)
        it = iter(ds)
    else:
        ds = _load_hf(job, False).select(range(shard.start, shard.stop))
        it = iter(ds)
    for row in it:
        if job.text_key not in row:
            raise UserError(f"HF dataset {job.hf_dataset} has no column {job.text_key!r} (columns: {list(row)}); pass --text-key")
        val = row[job.text_key]
        stats.bytes += len(val.encode("utf-8")) if isinstance(val, str) else 0
        yield val


# ------------------------------------------------------------------------------------------ tokenize

_WORKER: dict = {}


def _batches(texts: Iterator[str]) -> Iterator[List[str]]:
    batch: List[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_to_arrays(tok, texts: Sequence[str], dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Batch-encode and append EOD: (flat tokens, per-document lengths including the EOD)."""
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    flat = np.insert(body, ends, dtype.type(tok.eod_id))  # EOD after every document, in one vectorised pass
    return flat, lengths + 1


def shard_prefix(work: Path, i: int) -> Path:
    return work / f"shard_{i:05d}"


def process_shard(shard: Shard, job: Job, work: Path, progress=None) -> dict:
    """Tokenize one shard into ``work/shard_XXXXX.{bin,idx}`` and its ``.json`` stats (the done-marker)."""
    from megabd3.data.tokenizers import get_tokenizer

    tok = _WORKER.get("tok") or get_tokenizer(job.tokenizer, reference_separator=job.reference_separator)
    dtype = np.dtype(optimal_dtype(tok.model_vocab_size))
    stats = ShardStats()
    prefix = shard_prefix(work, shard.index)
    last_bytes = 0
    with IndexedDatasetWriter(prefix, dtype) as w:
        for batch in _batches(iter_texts(shard, job, stats)):
            flat, lengths = encode_to_arrays(tok, batch, dtype)
            w.add_documents(flat, lengths)
            stats.documents += len(batch)
            stats.tokens += int(flat.size)
            if progress is not None:
                progress((stats.bytes - last_bytes, len(batch), int(flat.size)))
                last_bytes = stats.bytes
        w.finalize()
    if progress is not None and stats.bytes > last_bytes:
        progress((stats.bytes - last_bytes, 0, 0))
    out = {"shard": asdict(shard), **asdict(stats)}
    atomic_write_json(f"{prefix}.json", out)
    return out


def _worker_init(q, job: Job) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["queue"] = q
    from megabd3.data.tokenizers import get_tokenizer

    _WORKER["tok"] = get_tokenizer(job.tokenizer, reference_separator=job.reference_separator)


def _worker_run(args) -> dict:
    shard, job, work = args
    q = _WORKER["queue"]
    return process_shard(shard, job, Path(work), progress=q.put)


# -------------------------------------------------------------------------------------------- splits


@dataclass
class SplitSpec:
    name: str
    start: Optional[str]
    stop: Optional[str]


def parse_split(text: str) -> SplitSpec:
    """``NAME:START:END`` (document indices, negatives count from the end, fractions like 0.95, empty =
    open end) or ``NAME:FRACTION`` (that share of documents, right after the previous split)."""
    parts = text.split(":")
    if len(parts) == 2 and parts[0] and parts[1]:
        return SplitSpec(parts[0], None, parts[1])  # fraction shorthand, resolved in order
    if len(parts) != 3 or not parts[0]:
        raise UserError(f"--split {text!r}: expected NAME:START:END (e.g. train:0:-100000, valid:-100000:) or NAME:FRACTION (train:0.95)")
    return SplitSpec(parts[0], parts[1], parts[2])


def _bound(value: str, n: int, what: str) -> int:
    try:
        if any(c in value for c in ".eE"):
            f = float(value)
            if not -1.0 <= f <= 1.0:
                raise ValueError
            return int(round(f * n)) if f >= 0 else n + int(round(f * n))
        i = int(value)
    except ValueError:
        raise UserError(f"--split bound {value!r} of {what}: expected an integer document index or a fraction in [-1, 1]") from None
    return i if i >= 0 else n + i


def resolve_splits(specs: Sequence[SplitSpec], n: int) -> List[Tuple[str, int, int]]:
    """Document ranges [a, b) of each split over ``n`` documents; overlaps and empty splits are errors."""
    out: List[Tuple[str, int, int]] = []
    cursor = 0
    for s in specs:
        if s.start is None:  # NAME:FRACTION
            a = cursor
            b = a + _bound(s.stop, n, s.name)
        else:
            a = _bound(s.start, n, s.name) if s.start else 0
            b = _bound(s.stop, n, s.name) if s.stop else n
        a, b = max(0, min(a, n)), max(0, min(b, n))
        if b <= a:
            raise UserError(f"split {s.name!r} is empty ([{a}, {b}) of {n} documents); adjust --split (e.g. the OWT preset needs more than 100,000 documents)")
        out.append((s.name, a, b))
        cursor = b
    names = [o[0] for o in out]
    if len(set(names)) != len(names):
        raise UserError(f"--split names must be unique, found {names}")
    spans = sorted(out, key=lambda o: o[1])
    for x, y in zip(spans, spans[1:]):
        if y[1] < x[2]:
            raise UserError(f"splits {x[0]!r} [{x[1]}, {x[2]}) and {y[0]!r} [{y[1]}, {y[2]}) overlap; documents would leak between them")
    return out


# ----------------------------------------------------------------------------------------------- run

PRESETS = {
    # bd3lms openwebtext-split: train = train[:-100000], valid = train[-100000:]
    "owt": {"tokenizer": "gpt2", "splits": ["train:0:-100000", "valid:-100000:"]},
    # LM1B: one sentence per document, BERT WordPiece, separators = [CLS] (spec §7)
    "lm1b": {"tokenizer": "bert-base-uncased", "splits": [], "txt_mode": "lines"},
}


def _fingerprint(job: Job, tok_hash: str) -> str:
    """Identity of a run: inputs (path, size, mtime), tokenizer and reading options."""
    files = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in [*job.inputs, *(job.hf_data_files or [])]]
    ident = {"files": files, "tok": tok_hash, "key": job.text_key, "txt": job.txt_mode, "err": job.errors,
             "hf": [job.hf_dataset, job.hf_config, job.hf_split, job.streaming], "shard_bytes": job.shard_bytes,
             "tool": TOOL_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def check_output_prefix(output_prefix: str) -> Path:
    """Make sure the outputs of `output_prefix` can be written, before any work: create its directory
    and probe it with a temporary file. Returns the directory. Nothing is created unless every
    missing directory can be (the deepest existing ancestor must be a writable directory), so a bad
    prefix leaves no partial tree behind."""
    def bad(why: str) -> UserError:
        return UserError(f"--output-prefix {output_prefix}: {why}; choose a prefix in a writable directory")

    if not output_prefix or output_prefix.endswith(os.sep) or os.path.isdir(output_prefix):
        raise bad("is a directory, not a file prefix (outputs are <prefix>.bin/.idx), e.g. dir/name")
    parent = Path(output_prefix).parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise bad(f"{existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise bad(f"no permission to write in {existing}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{Path(output_prefix).name}.write_probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:  # e.g. /proc, a read-only file system, a full disk
        raise bad(f"cannot create files in {parent} ({exc.strerror or exc})") from None
    return parent


def run(job: Job, output_prefix: str, splits: Sequence[str] = (), progress: bool = True,
        stop_after_shards: int = 0, log=print) -> dict:
    """Preprocess ``job`` into ``output_prefix`` (or ``<prefix>_<split>`` per split); returns a summary."""
    from megabd3.data.tokenizers import get_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()
    if job.workers < 1:
        raise UserError(f"--workers must be >= 1, found {job.workers}")
    if job.hf_data_files and not job.hf_dataset:
        raise UserError("--hf-data-files needs --hf-dataset naming the builder (json, parquet, text, csv)")
    if job.hf_dataset and job.inputs:
        raise UserError("pass either --input FILES or --hf-dataset NAME, not both (local files for an HF builder go in --hf-data-files)")
    if job.hf_data_files:
        job.hf_data_files = expand_data_files(job.hf_data_files)
    if job.hf_dataset and not progress:
        import datasets

        datasets.disable_progress_bars()  # --no-progress silences the builder's "Generating split" bars too
    if not job.hf_dataset:
        if not job.inputs:
            raise UserError("no input: pass --input FILES/GLOBS or --hf-dataset NAME")
        job.inputs = expand_inputs(job.inputs)
    check_output_prefix(str(output_prefix))  # before the tokenizer, the inputs and any shard work
    tok = get_tokenizer(job.tokenizer, reference_separator=job.reference_separator)
    split_specs = [parse_split(s) for s in splits]
    work = Path(f"{output_prefix}.partial")
    fp = _fingerprint(job, tok.hash)
    plan_file = work / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") == fp:
        job.shards = [Shard(**s) for s in json.loads(plan_file.read_text())["shards"]]
    else:
        if work.exists():
            log(f"discarding stale partial run {work} (inputs or options changed)")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        job.shards = plan_shards(job)
        atomic_write_json(plan_file, {"fingerprint": fp, "shards": [asdict(s) for s in job.shards]})
    if not job.shards:
        raise UserError(f"empty input: {', '.join(job.inputs) or job.hf_dataset} holds no data; check the files")

    done = {}
    for s in job.shards:
        p = shard_prefix(work, s.index)
        if os.path.isfile(f"{p}.json"):
            try:
                IndexedDataset(p)  # the pair must load; otherwise redo the shard
                done[s.index] = json.loads(Path(f"{p}.json").read_text())
            except UserError:
                pass
    todo = [s for s in job.shards if s.index not in done]
    if done:
        log(f"resuming: {len(done)} of {len(job.shards)} shards already done in {work}")
    total_bytes = sum(s.nbytes for s in todo)
    bar = _Progress(total_bytes, enabled=progress)
    t_tok = time.time()
    _tokenize(todo, job, work, done, bar, stop_after_shards)
    bar.close()
    tok_seconds = time.time() - t_tok

    stats = [done[s.index] for s in job.shards]
    docs = np.array([st["documents"] for st in stats], dtype=np.int64)
    n_docs = int(docs.sum())
    empty = sum(st["empty_skipped"] for st in stats)
    if n_docs == 0:
        raise UserError(f"no documents in the input ({empty} empty documents skipped); check --text-key and the files")
    ranges = resolve_splits(split_specs, n_docs) if split_specs else [("", 0, n_docs)]
    starts = np.concatenate([[0], np.cumsum(docs)])
    dtype = np.dtype(optimal_dtype(tok.model_vocab_size))
    shard_sets = [IndexedDataset(shard_prefix(work, s.index)) for s in job.shards]
    outputs = {}
    for name, a, b in ranges:
        prefix = f"{output_prefix}_{name}" if name else str(output_prefix)
        w = IndexedDatasetWriter(prefix, dtype)
        try:
            for k, ds in enumerate(shard_sets):  # shard k holds documents [starts[k], starts[k+1])
                lo, hi = max(a, starts[k]), min(b, starts[k + 1])
                if hi > lo:
                    w.append_dataset(ds, int(lo - starts[k]), int(hi - starts[k]))
            w.finalize(commit=False)
        except BaseException:
            w.abort()
            raise
        counts = _count_tokens(shard_sets, starts, a, b)
        manifest = {
            "tool": TOOL_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "tokenizer": tok.describe(),
            "dtype": dtype.name,
            "num_documents": b - a,
            "num_tokens": counts,
            "empty_documents_skipped_total": empty,
            "invalid_utf8_replaced_total": sum(st["replaced_utf8"] for st in stats),
            "split": {"name": name or None, "documents": [a, b], "of_total": n_docs},
            "sources": _sources(job),
            "options": {"text_key": job.text_key, "txt_mode": job.txt_mode, "errors": job.errors,
                        "eod_appended": True, "reference_separator": job.reference_separator},
        }
        w.commit(before_idx=lambda p=prefix, m=manifest: write_manifest(p, m))
        outputs[name or "all"] = {"prefix": prefix, "documents": b - a, "tokens": counts}
    del shard_sets
    shutil.rmtree(work, ignore_errors=True)
    total_tokens = int(sum(st["tokens"] for st in stats))
    total_b = int(sum(st["bytes"] for st in stats))
    elapsed = time.time() - t_start
    return {"outputs": outputs, "documents": n_docs, "empty_skipped": empty, "tokens": total_tokens, "bytes": total_b,
            "seconds": elapsed, "tokenize_seconds": tok_seconds, "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "resumed_shards": len(job.shards) - len(todo)}


def _count_tokens(sets: List[IndexedDataset], starts: np.ndarray, a: int, b: int) -> int:
    n = 0
    for k, ds in enumerate(sets):
        lo, hi = max(a, starts[k]), min(b, starts[k + 1])
        if hi > lo:
            n += int(ds.sizes[int(lo - starts[k]):int(hi - starts[k])].sum(dtype=np.int64))
    return n


def _sources(job: Job) -> list:
    if job.hf_dataset:
        src = {"hf_dataset": job.hf_dataset, "config": job.hf_config, "split": job.hf_split, "streaming": job.streaming}
        if job.hf_data_files:
            src["data_files"] = [{"path": f, "bytes": os.path.getsize(f)} for f in job.hf_data_files]
        return [src]
    return [{"path": f, "bytes": os.path.getsize(f)} for f in job.inputs]


class _Progress:
    """tqdm over input bytes with docs/s and tok/s in the postfix."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.docs = self.toks = 0
        self.t0 = time.time()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenize",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, item: Tuple[int, int, int]) -> None:
        nbytes, docs, toks = item
        self.docs += docs
        self.toks += toks
        if self.bar is not None:
            dt = max(time.time() - self.t0, 1e-9)
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.toks / dt / 1e6:.2f} M tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tokenize(todo: List[Shard], job: Job, work: Path, done: dict, bar: _Progress, stop_after: int) -> None:
    finished = 0
    if job.workers == 1 or len(todo) <= 1:
        for s in todo:
            done[s.index] = process_shard(s, job, work, progress=bar.update)
            finished += 1
            if stop_after and finished >= stop_after:
                os._exit(3)  # testing hook: die like a kill, without cleanup
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    q = ctx.Queue()
    with ctx.Pool(min(job.workers, len(todo)), initializer=_worker_init, initargs=(q, job)) as pool:
        it = pool.imap_unordered(_worker_run, [(s, job, str(work)) for s in todo])
        pending = len(todo)
        while pending:
            try:
                res = it.next(timeout=0.2)
            except mp.TimeoutError:
                res = None
            _drain(q, bar)
            if res is not None:
                done[res["shard"]["index"]] = res
                pending -= 1
                finished += 1
                if stop_after and finished >= stop_after:
                    pool.terminate()
                    os._exit(3)
        _drain(q, bar)


def _drain(q, bar: _Progress) -> None:
    while True:
        try:
            bar.update(q.get_nowait())
        except queue.Empty:
            return
