"""megabd3: Block Diffusion language models on Megatron-core and DeepSpeed."""
__version__ = "0.1.0"
