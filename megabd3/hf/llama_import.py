"""Import a Hugging Face Llama-family causal LM directory (LlamaForCausalLM: Llama, SmolLM2) as megabd3's
``model.arch=llama`` backbone, for AR -> BD3 adaptation (issue 12)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from megabd3.errors import UserError

LLAMA_MODEL_TYPES = ("llama",)


def load_llama_dir(path: Path, conf: dict) -> Tuple[Any, Dict[str, torch.Tensor]]:
    raise UserError(f"{path}: importing model_type {conf.get('model_type')!r} is being implemented")
