"""Read a Hugging Face directory in the released BD3-LM layout into (megabd3 Config, full state dict).

The full state dict loads into any TP/PP layout with megabd3.model.export.load_full_state_dict. Our own
exports carry the resolved megabd3 config in config.json["megabd3"] (cross-checked against the released
fields beside it); for other directories (the released checkpoints) the config is rebuilt from the
released fields. The clip interval comes from the sampling_eps_min/max buffers stored with the weights.
Every malformed input (missing or non-numeric field, weights config.json does not describe, another
architecture, a tokenizer of another vocabulary) is a one-line UserError.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megabd3.errors import UserError
from megabd3.hf.mapping import HF_BUFFERS, from_released

WEIGHTS = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")
# the released layout's required config.json fields (no default could stand in for them)
REQUIRED = ("hidden_dim", "n_heads", "n_blocks", "vocab_size")
# the released defaults (bd3lm_hf_format.md) for the optional fields
DEFAULT_CLIP = (1e-3, 0.999)


def _read_config(path: Path) -> Optional[dict]:
    f = path / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def is_hf_dir(path: str | Path) -> bool:
    """A transformers model directory (config.json with a model_type), as opposed to a megabd3 run."""
    p = Path(path)
    conf = _read_config(p) if p.is_dir() else None
    return conf is not None and "model_type" in conf


def looks_like_hub_id(path_or_id: str | Path) -> bool:
    """Only a plain string "owner/name" may name a Hub model: never a Path object, nothing that starts with
    "." "/" or "~", exactly one "/", an owner that is not a local file or directory (then "runs/demo2" is
    a mistyped run directory), and no checkpoint file suffix ("x/model.pt")."""
    if not isinstance(path_or_id, str) or path_or_id[:1] in (".", "/", "~") or not _HUB_ID.match(path_or_id):
        return False
    owner, name = path_or_id.split("/")
    return ".." not in path_or_id and not name.endswith(_FILE_SUFFIXES) and not Path(owner).exists()


def resolve_hf(path_or_id: str | Path) -> Optional[Path]:
    """The local directory of an HF checkpoint: a directory as given, or a Hub id (downloaded through the
    Hub cache, which works offline when it is cached). None when it is neither (a megabd3 checkpoint, or a
    local path that does not exist: the caller reports it as missing, the Hub is never asked)."""
    p = Path(path_or_id)
    if p.exists():
        return p if is_hf_dir(p) else None
    if not looks_like_hub_id(path_or_id):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, no access: all one message
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path_or_id!r} is neither a local path nor a reachable Hub model ({first}); "
                        "pass a megabd3 run directory or a downloaded HF directory") from None


_MISSING = object()


def _int(conf: dict, key: str, file: Path, default: Any = _MISSING) -> int:
    """An integer field of config.json; one-line errors for a missing required field or a non-integer."""
    if key not in conf:
        if default is _MISSING:
            raise UserError(f"{file}: required field {key!r} is missing; a BD3-LM config.json needs "
                            f"{', '.join(REQUIRED)}")
        return int(default)
    v = conf[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or int(v) != v or v < 1:
        raise UserError(f"{file}: {key} must be a positive integer, found {v!r}")
    return int(v)


def _float(conf: dict, key: str, file: Path, default: float) -> float:
    v = conf.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise UserError(f"{file}: {key} must be a number, found {v!r}")
    return float(v)


def _flag(conf: dict, key: str, file: Path, default: bool) -> bool:
    v = conf.get(key, default)
    if not isinstance(v, bool) and v not in (0, 1):
        raise UserError(f"{file}: {key} must be true or false, found {v!r}")
    return bool(v)


def _config_from_released(conf: dict, file: Path) -> Any:
    """A megabd3 Config from the released fields (a directory without our megabd3 block).

    The released layout has no objective field. cross_attn=true is BD3-LM, causal=true the AR baseline,
    and otherwise the checkpoint is MDLM -- with time conditioning if time_conditioning=true (megabd3's
    MDLM then feeds sigma(t) as in training). SEDD is never guessed: its score-entropy output means
    something else than MDLM's logits, and only our own exports (megabd3 block) name it.
    """
    from megabd3.config.schema import Config

    cfg = Config()
    m, d = cfg.model, cfg.diffusion
    m.name = "custom"
    m.hidden_size, m.num_layers, m.num_heads = (_int(conf, k, file) for k in ("hidden_dim", "n_blocks", "n_heads"))
    if m.hidden_size % m.num_heads:
        raise UserError(f"{file}: hidden_dim={m.hidden_size} is not divisible by n_heads={m.num_heads}")
    m.cond_dim = _int(conf, "cond_dim", file, 129)  # the released default
    m.dropout = _float(conf, "dropout", file, 0.1)
    m.adaln = _flag(conf, "adaln", file, True)
    m.time_conditioning = _flag(conf, "time_conditioning", file, False)
    m.mlp_ratio, m.rope_base, m.tie_embeddings = 4, 10000.0, False
    L = cfg.data.seq_len = _int(conf, "model_length", file, 1024)
    causal, cross = _flag(conf, "causal", file, False), _flag(conf, "cross_attn", file, True)
    if causal and cross:
        raise UserError(f"{file}: causal=true and cross_attn=true contradict each other (the AR baseline has "
                        "cross_attn=false); fix config.json")
    if causal:
        d.objective, d.block_size = "ar", 1
    elif cross:
        d.objective, d.block_size = "bd3lm", _int(conf, "block_size", file, 1)
        if L % d.block_size:
            raise UserError(f"{file}: block_size={d.block_size} does not divide model_length={L}")
    else:
        d.objective, d.block_size = "mdlm", L
    cfg.data.tokenizer = "gpt2"  # the released checkpoints use GPT-2 + an appended mask token
    return cfg


def _clip_interval(conf: dict, tensors: Dict[str, torch.Tensor], file: Path) -> tuple[float, float]:
    """The clip interval [beta, omega] stored with the weights.

    The sampling_eps_min/max buffers in model.safetensors win over the config.json fields when both exist
    and disagree: the buffers are what the released model reads at runtime (the clip search writes them
    and the checkpoint saves them), while config.json only seeds them when the model is built.
    """
    def pick(key: str, default: float) -> float:
        field = _float(conf, key, file, default)
        buf = tensors.get(key)
        if buf is None or buf.numel() != 1:
            return field
        # a float32 buffer holds 0.2 as 0.20000000298...: keep config.json's exact value when it is the
        # same number at the buffer's precision, else the buffer's
        same = torch.tensor(field, dtype=buf.dtype) == buf.reshape(())
        return field if (key in conf and bool(same)) else float(buf)

    lo, hi = pick("sampling_eps_min", DEFAULT_CLIP[0]), pick("sampling_eps_max", DEFAULT_CLIP[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise UserError(f"{file.parent}: the clip interval sampling_eps_min={lo}, sampling_eps_max={hi} is not "
                        "within 0 <= min <= max <= 1; fix the buffers in model.safetensors or config.json")
    return lo, hi


def _cross_check(conf: dict, cfg: Any, file: Path) -> None:
    """Our export's megabd3 block against the released fields beside it: they were written together, so a
    difference means config.json was edited after export and the directory no longer says one thing."""
    from megabd3.hf.export import released_block_size

    m, d = cfg.model, cfg.diffusion
    obj = f"diffusion.objective={d.objective}"
    want = {"hidden_dim": (m.hidden_size, "model.hidden_size"), "n_blocks": (m.num_layers, "model.num_layers"),
            "n_heads": (m.num_heads, "model.num_heads"), "cond_dim": (m.cond_dim, "model.cond_dim"),
            "model_length": (cfg.data.seq_len, "data.seq_len"),
            "block_size": (released_block_size(cfg), f"{obj}, diffusion.block_size={d.block_size}"),
            "cross_attn": (d.objective == "bd3lm", obj), "causal": (d.objective == "ar", obj),
            "adaln": (bool(m.adaln), "model.adaln"),
            "time_conditioning": (bool(m.time_conditioning), "model.time_conditioning")}
    for key, (ours, where) in want.items():
        if key in conf and conf[key] != ours:
            raise UserError(f"{file}: {key}={conf[key]!r} but its megabd3 block says {ours!r} ({where}); the file "
                            "was edited after export: restore it, or delete the megabd3 block to import from the "
                            "released fields alone")


def _check_shapes(tensors: Dict[str, torch.Tensor], cfg: Any, vocab: int, path: Path) -> None:
    """Every weight of the released layout present with the shape config.json gives (one line naming the
    first difference), before a model is built from them."""
    m = cfg.model
    d, c, bb = m.hidden_size, m.cond_dim, "backbone."
    want = {bb + "vocab_embed.embedding": (vocab, d), bb + "output_layer.norm_final.weight": (d,),
            bb + "output_layer.linear.weight": (vocab, d), bb + "output_layer.linear.bias": (vocab,)}
    if m.adaln:
        want.update({bb + "sigma_map.mlp.0.weight": (c, 256), bb + "sigma_map.mlp.0.bias": (c,),
                     bb + "sigma_map.mlp.2.weight": (c, c), bb + "sigma_map.mlp.2.bias": (c,),
                     bb + "output_layer.adaLN_modulation.weight": (2 * d, c),
                     bb + "output_layer.adaLN_modulation.bias": (2 * d,)})
    for i in range(m.num_layers):
        p = f"{bb}blocks.{i}."
        want.update({p + "norm1.weight": (d,), p + "norm2.weight": (d,), p + "attn_qkv.weight": (3 * d, d),
                     p + "attn_out.weight": (d, d), p + "mlp.0.weight": (4 * d, d), p + "mlp.0.bias": (4 * d,),
                     p + "mlp.2.weight": (d, 4 * d), p + "mlp.2.bias": (d,)})
        if m.adaln:
            want.update({p + "adaLN_modulation.weight": (6 * d, c), p + "adaLN_modulation.bias": (6 * d,)})
    for k, shape in want.items():
        if k not in tensors:
            raise UserError(f"{path / WEIGHTS}: the weight {k!r} is missing (config.json: n_blocks={m.num_layers}, "
                            f"adaln={m.adaln}); the directory is incomplete or its config.json is wrong")
        if tuple(tensors[k].shape) != shape:
            raise UserError(f"{path / WEIGHTS}: {k!r} has shape {list(tensors[k].shape)}, config.json implies "
                            f"{list(shape)}; the weights and config.json come from different models")
    extra = sorted(set(tensors) - set(want) - set(HF_BUFFERS))
    if extra:
        raise UserError(f"{path / WEIGHTS}: {len(extra)} weights that config.json (n_blocks={m.num_layers}, "
                        f"adaln={m.adaln}) does not describe, first {extra[0]!r}; the weights and config.json disagree")


def _check_tokenizer(path: Path, vocab: int, cfg: Any) -> None:
    """Tokenizer files shipped in the directory must give the model's vocabulary (+ an appended mask)."""
    if not (path / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    from megabd3.data.tokenizers import _generic

    # trust_remote_code=False: AutoTokenizer reads config.json, whose auto_map would otherwise prompt
    hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    tok = _generic(str(path.resolve()), hf)
    if tok.model_vocab_size != vocab:
        raise UserError(f"{path}: the model vocabulary is {vocab} but the tokenizer files there give "
                        f"{tok.model_vocab_size} (incl. the mask token); the directory mixes two models")
    cfg.data.tokenizer = str(path.resolve())


def load_hf_dir(path: str | Path) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(megabd3 Config, full state dict) of an HF directory in the released BD3-LM layout."""
    from safetensors.torch import load_file

    from megabd3.config.load import config_from_dict

    path = Path(path)
    conf = _read_config(path)
    if conf is None:
        raise UserError(f"{path} has no readable config.json; it is not a Hugging Face model directory")
    from megabd3.hf.llama_import import LLAMA_MODEL_TYPES, load_llama_dir

    if conf.get("model_type") in LLAMA_MODEL_TYPES:  # AR -> BD3 adaptation of a pretrained causal LM
        return load_llama_dir(path, conf)
    if conf.get("model_type") != "bd3lm":
        raise UserError(f"{path}: model_type {conf.get('model_type')!r} is not supported; supported: bd3lm "
                        f"(BD3-LM / MDLM / AR DiT checkpoints in the released layout) and "
                        f"{', '.join(LLAMA_MODEL_TYPES)} (Llama-family causal LMs)")
    if not (path / WEIGHTS).is_file():
        raise UserError(f"{path} has no {WEIGHTS}; export or download the safetensors weights")
    file = path / "config.json"
    vocab, hidden, heads = (_int(conf, k, file) for k in ("vocab_size", "hidden_dim", "n_heads"))
    _int(conf, "n_blocks", file)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as exc:  # truncated download, not a safetensors file
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path / WEIGHTS} cannot be read ({first}); download or export it again") from None
    if isinstance(conf.get("megabd3"), dict):  # our export: the exact config, checked against the fields beside it
        cfg = config_from_dict(conf["megabd3"], source=str(file), training=False, validate=False)
        _cross_check(conf, cfg, file)
    else:
        cfg = _config_from_released(conf, file)
    # (the interval clip search moved the run to, as the run saved it; buffers win over config.json)
    cfg.diffusion.clip_min, cfg.diffusion.clip_max = _clip_interval(conf, tensors, file)
    emb = tensors.get("backbone.vocab_embed.embedding")
    if emb is None or tuple(emb.shape) != (vocab, hidden):
        raise UserError(f"{path}: backbone.vocab_embed.embedding has shape "
                        f"{None if emb is None else list(emb.shape)}, config.json says vocab_size={vocab}, "
                        f"hidden_dim={hidden}; the directory is inconsistent")
    _check_shapes(tensors, cfg, vocab, path)
    sd = from_released(tensors, heads)
    _check_tokenizer(path, vocab, cfg)
    return cfg, sd


def check_vocab(hf_vocab: int, model_vocab: int, source: str, tokenizer: str) -> None:
    """Fine-tuning from an HF directory: its vocabulary must be the run's tokenizer's (rows would be
    silently trimmed or zero-padded otherwise)."""
    if hf_vocab != model_vocab:
        raise UserError(f"{source} has vocabulary {hf_vocab} but the run's tokenizer {tokenizer} gives "
                        f"{model_vocab}; set data.tokenizer to the checkpoint's tokenizer")


def mask_hint(source: str, tokenizer: str, rows: int) -> str:
    return (f"{source} has {rows} vocabulary rows but tokenizer {tokenizer} has no mask token, so megabd3 appends one "
            f"({rows + 1}); give it an unused special token as mask: python tools/add_mask_token.py {tokenizer} OUT_DIR, "
            "then set data.tokenizer=OUT_DIR (and preprocess with it)")
