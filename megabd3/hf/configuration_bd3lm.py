"""BD3-LM configuration (the released checkpoints' field names and meanings). Self-contained remote code:
imports transformers only, so `AutoConfig.from_pretrained(dir, trust_remote_code=True)` needs no megabd3."""
from transformers import PretrainedConfig


class BD3LMConfig(PretrainedConfig):
    model_type = "bd3lm"

    def __init__(self, block_size: int = 1, vocab_size: int = 50258, model_length: int = 1024,
                 cross_attn: bool = True, adaln: bool = True, attn_backend: str = "sdpa", causal: bool = False,
                 hidden_dim: int = 768, cond_dim: int = 129, n_blocks: int = 12, n_heads: int = 12,
                 dropout: float = 0.1, time_conditioning: bool = False, var_min: bool = True,
                 sampling_eps_min: float = 1e-3, sampling_eps_max: float = 0.999, **kwargs) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.cross_attn = cross_attn
        self.adaln = adaln
        self.attn_backend = attn_backend
        self.causal = causal
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.var_min = var_min
        self.sampling_eps_min = sampling_eps_min
        self.sampling_eps_max = sampling_eps_max
        super().__init__(**kwargs)
