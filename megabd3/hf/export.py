"""Write a megabd3 checkpoint as a Hugging Face directory in the released BD3-LM layout.

``AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)`` loads it with the self-contained
``modeling_bd3lm.py`` copied beside the weights. config.json carries the released fields plus a
``megabd3`` block (our resolved config) so that importing the directory restores the exact config.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megabd3.errors import UserError
from megabd3.hf.mapping import to_released

HERE = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_bd3lm.py", "modeling_bd3lm.py")
SUPPORTED = ("bd3lm", "mdlm", "ar", "sedd")
AUTO_MAP = {"AutoConfig": "configuration_bd3lm.BD3LMConfig",
            "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM",
            "AutoModel": "modeling_bd3lm.BD3LM"}


def _as_dict(cfg: Any) -> dict:
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)


def released_block_size(cfg: Any) -> int:
    """config.json's block_size for our objective: L' for BD3-LM, L for MDLM/SEDD (one block), 1 for AR."""
    d = cfg.diffusion
    return int({"bd3lm": d.block_size, "mdlm": cfg.data.seq_len, "sedd": cfg.data.seq_len, "ar": 1}[d.objective])


def check_exportable(cfg: Any) -> None:
    """What the released BD3-LM DiT layout can hold; checked before any weights are read."""
    arch = getattr(cfg.model, "arch", "dit")
    if arch != "dit":
        raise UserError(f"model.arch={arch!r}: the released BD3-LM layout holds only the DiT backbone "
                        "(model.arch=dit); a Llama-family run cannot be exported to it")
    if cfg.diffusion.objective not in SUPPORTED:
        raise UserError(f"diffusion.objective={cfg.diffusion.objective!r} cannot be exported; supported: "
                        f"{', '.join(SUPPORTED)}")


def hf_config(cfg: Any, vocab_size: int, clip: tuple[float, float]) -> Dict[str, Any]:
    """The released config fields for our config (plus auto_map and the megabd3 block)."""
    check_exportable(cfg)
    m, d = cfg.model, cfg.diffusion
    obj, L = d.objective, cfg.data.seq_len
    if m.mlp_ratio != 4 or m.rope_base != 10000.0 or m.tie_embeddings:
        raise UserError("the released BD3-LM layout fixes mlp_ratio=4, rope_base=10000 and untied embeddings; "
                        f"this run has mlp_ratio={m.mlp_ratio}, rope_base={m.rope_base}, "
                        f"tie_embeddings={m.tie_embeddings} and cannot be exported")
    block = released_block_size(cfg)
    return {
        "model_type": "bd3lm", "architectures": ["BD3LM"], "auto_map": dict(AUTO_MAP),
        "block_size": int(block), "vocab_size": int(vocab_size), "model_length": int(L),
        "cross_attn": obj == "bd3lm", "adaln": bool(m.adaln), "attn_backend": "sdpa", "causal": obj == "ar",
        "hidden_dim": m.hidden_size, "cond_dim": m.cond_dim, "n_blocks": m.num_layers, "n_heads": m.num_heads,
        "dropout": m.dropout, "time_conditioning": bool(m.time_conditioning), "var_min": True,
        "sampling_eps_min": float(clip[0]), "sampling_eps_max": float(clip[1]),
        "torch_dtype": "float32", "megabd3": _as_dict(cfg),
    }


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export path {out} exists and is not empty; choose a new directory or delete it first")


def export_state_dict(sd: Dict[str, torch.Tensor], cfg: Any, out: str | Path, *,
                      clip: tuple[float, float] = (1e-3, 1.0), tokenizer: Any = None,
                      card: Optional[str] = None) -> Path:
    """Write OUT: config.json, model.safetensors, remote code, tokenizer files (if given), README.md."""
    from safetensors.torch import save_file

    out = Path(out)
    _check_out_dir(out)
    check_exportable(cfg)
    vocab = int(sd["embedding.weight"].shape[0])
    conf = hf_config(cfg, vocab, clip)
    tensors = to_released(sd, cfg.model.num_heads)
    hd = cfg.model.hidden_size // cfg.model.num_heads
    # buffers of the released model, stored with the weights as the released checkpoints store them
    tensors["backbone.rotary_emb.inv_freq"] = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    tensors["sampling_eps_min"] = torch.tensor(float(clip[0]))
    tensors["sampling_eps_max"] = torch.tensor(float(clip[1]))
    if tokenizer is not None:
        conf["mask_token_id"] = int(tokenizer.mask_id)
        conf["pad_token_id"], conf["bos_token_id"], conf["eos_token_id"] = (
            int(tokenizer.pad_id), int(tokenizer.bos_id), int(tokenizer.eos_id))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True, default=str) + "\n")
    for f in REMOTE_CODE:
        shutil.copyfile(HERE / f, out / f)
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(out))
    if card:
        (out / "README.md").write_text(card)
    return out


def _eval_result(run_dir: Path, step: int) -> Optional[dict]:
    f = run_dir / "eval" / f"results_step_{step:08d}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def model_card(cfg: Any, step: int, weights: str, result: Optional[dict]) -> str:
    m, d, data = cfg.model, cfg.diffusion, cfg.data
    lines = [
        "---", "library_name: transformers", "tags: [block-diffusion, bd3lm, megabd3]", "---", "",
        f"# {d.objective} ({m.name}) exported from megabd3", "",
        *(["Load with `AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)`; the layout matches "
           "the released BD3-LM checkpoints (model_type bd3lm).", ""] if getattr(m, "arch", "dit") == "dit" else
          ["`AutoModelForCausalLM.from_pretrained(path)` loads the weights (LlamaForCausalLM layout) and runs them "
           "as a causal LM. The block-diffusion denoiser (the 2L [x_t ; x0] input"
           + (", shifted logits" if getattr(m, "shift_logits", False) else "") + ") runs in megabd3: "
           "`launchers/sample.py --checkpoint path`, `launchers/evaluate.py --checkpoint path`.", ""]),
        "## Training", "",
        f"- objective: {d.objective}, block size L' = {d.block_size if d.objective == 'bd3lm' else '-'}, "
        f"sequence length L = {data.seq_len}",
        f"- model: d={m.hidden_size}, layers={m.num_layers}, heads={m.num_heads}, cond_dim={m.cond_dim}, "
        f"adaLN={m.adaln}, time conditioning={m.time_conditioning}",
        f"- noise: {d.noise.type}, clip interval [{d.clip_min}, {d.clip_max}], weighting {d.weighting}",
        f"- data: tokenizer `{data.tokenizer}`, train `{data.train_prefix}` ({data.mode})",
        f"- steps: {step} of {cfg.training.steps}, micro batch {cfg.training.micro_batch_size}"
        + (f", global batch {cfg.training.global_batch_size}" if cfg.training.global_batch_size else "")
        + f", seed {cfg.training.seed}",
        f"- weights exported: {weights}", "", "## Evaluation", "",
    ]
    ppl = (result or {}).get("perplexity", {})
    if not ppl:
        lines.append("No evaluation result was found in the run directory for this step; no PPL is claimed.")
    for split, r in sorted(ppl.items()):
        if isinstance(r, dict) and "ppl" in r and isinstance(r["ppl"], (int, float)) and math.isfinite(r["ppl"]):
            lines.append(f"- {split} PPL (NELBO bound, {result.get('weights', '?')} weights, "
                         f"{r.get('tokens', '?')} tokens): {r['ppl']:.3f}")
    if ppl and (result or {}).get("weights") not in (None, weights):
        lines.append(f"- note: measured on the {result['weights']} weights; this export holds the {weights} weights")
    return "\n".join(lines) + "\n"


def export_checkpoint(src: str | Path, out: str | Path, weights: str = "ema", with_tokenizer: bool = True) -> Path:
    """tools/convert_to_hf.py: a run dir / checkpoints dir / step dir / model.pt -> HF directory."""
    from megabd3.config.load import load_config
    from megabd3.training.checkpoint import CONFIG_FILE, GLOBAL_STATE, read_model_file

    if weights not in ("ema", "live"):
        raise UserError(f"--weights must be ema or live, found {weights!r}")
    _check_out_dir(Path(out))  # fail before reading a large checkpoint
    file, payload = read_model_file(src)
    cfg_file = file.parent / CONFIG_FILE
    if payload.get("hf_config") is not None:
        raise UserError(f"{src} is already a Hugging Face directory; export takes a megabd3 run or checkpoint")
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file} is missing beside {file}; the checkpoint is incomplete")
    cfg = load_config(str(cfg_file))
    llama = getattr(cfg.model, "arch", "dit") == "llama"  # issue 12: adapted causal LMs, LlamaForCausalLM layout
    if not llama:
        check_exportable(cfg)
    if weights == "ema" and payload.get("ema") is None:
        raise UserError(f"{file} has no EMA weights (training.ema=0); pass --weights live")
    sd = payload["ema"] if weights == "ema" else payload["model"]
    clip = (cfg.diffusion.clip_min, cfg.diffusion.clip_max)
    state_file = file.parent / GLOBAL_STATE
    if state_file.is_file():  # the clip interval the run ended with (clip search may have moved it)
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        clip = tuple(state.get("clip_interval") or clip)
    step = int(payload.get("step", 0))
    run_dir = file.parent.parent.parent
    tok = None
    if with_tokenizer:
        from megabd3.data.tokenizers import get_tokenizer

        tok = get_tokenizer(cfg.data.tokenizer)
        if tok.model_vocab_size != sd["embedding.weight"].shape[0]:
            raise UserError(f"checkpoint vocabulary {sd['embedding.weight'].shape[0]} does not match tokenizer "
                            f"{cfg.data.tokenizer} ({tok.model_vocab_size}); fix data.tokenizer in {cfg_file}")
    card = model_card(cfg, step, weights, _eval_result(run_dir, step))
    if llama:
        from megabd3.hf.llama_export import export_llama_state_dict

        return export_llama_state_dict(sd, cfg, Path(out), tokenizer=tok, card=card)
    return export_state_dict(sd, cfg, out, clip=clip, tokenizer=tok, card=card)
