"""megabd3: Block Diffusion LMs (BD3-LM) on Megatron-core + DeepSpeed.

Install torch first (`pip install torch==2.13.0`), then `pip install -e ".[dev]"`. Every torch
requirement below is satisfied by 2.13.0, so pip never pulls a CUDA build on a CPU machine.
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.5,<=2.13.0",  # upper bound: never let pip replace the pinned CPU wheel with a CUDA one
    "deepspeed==0.19.8",
    "megatron-core==0.16.1",
    "datasets>=3.0",
    "transformers>=4.49",
    "tokenizers>=0.20",
    "tiktoken>=0.7",
    "wandb>=0.17",
    "scipy>=1.10",
    "numpy>=1.24",
    "tqdm>=4.66",
    "pyarrow>=15",
    "safetensors>=0.4",
    "matplotlib>=3.7",
]
EXTRAS = {
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "lm-eval==0.4.13"],
    # optional GPU speedups; NVIDIA apex is detected at run time if present, never required
    "gpu": ["transformer-engine"],
    # offline judge LM for Gen PPL (see tools/fetch_assets.py judge)
    "judge": ["accelerate>=1.0", "gguf>=0.10", "psutil"],
}

setup(
    name="megabd3",
    version="0.1.0",
    description="Block Diffusion language models (BD3-LM) on Megatron-core tensor/pipeline parallelism and DeepSpeed ZeRO",
    packages=find_packages(include=["megabd3", "megabd3.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    # lm-eval 0.4 has no model plugin hook: this wrapper registers --model megabd3, then runs lm_eval's CLI
    entry_points={"console_scripts": ["megabd3-lm-eval = megabd3.eval.lm_eval_adapter:main"]},
)
