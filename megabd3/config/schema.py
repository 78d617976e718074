"""The typed configuration schema of megabd3.

One dataclass per section; every field has a type, a default and a docstring (given as the ``doc``
metadata through :func:`field_doc`, which ``docs/config_reference.md`` is generated from). JSON config
files mirror this tree: ``{"model": {"hidden_size": 768}, "diffusion": {"block_size": 4}}``.

Sections never import torch or any heavy package, so ``python -m megabd3.config`` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Default defensive mixture weight rho of the importance schedules (see NoiseConfig.uniform_mix).
DEFAULT_UNIFORM_MIX = 0.1

def field_doc(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with a default and a docstring (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class ModelConfig:
    """The transformer (DiT-style backbone of the reference, on megatron-core layers)."""

    name: str = field_doc("tiny", "Size name for logs: tiny (d256/8h/8L), small (d768/12h/12L, the paper's), medium (d1024/16h/24L), demo, or custom.")
    hidden_size: int = field_doc(256, "Model width d.")
    num_layers: int = field_doc(8, "Number of transformer layers.")
    num_heads: int = field_doc(8, "Attention heads; must be divisible by parallel.tensor_parallel.")
    cond_dim: int = field_doc(64, "Width of the adaLN conditioning vector (reference cond_dim: 64 tiny, 128 small/medium).")
    mlp_ratio: int = field_doc(4, "MLP hidden width = mlp_ratio * hidden_size.")
    dropout: float = field_doc(0.1, "Dropout on both residual branches (the reference uses 0.1).")
    adaln: bool = field_doc(True, "Keep the adaLN modulation modules (constant-input for BD3/MDLM, time-conditioned for SEDD). AR defaults to none.")
    time_conditioning: bool = field_doc(False, "Feed the noise level sigma to adaLN (True for SEDD; BD3-LM and MDLM zero it as the reference does).")
    tie_embeddings: bool = field_doc(False, "Tie input and output embeddings: model.arch=llama only (SmolLM2 is tied); the dit reference ignores its tie flag (untied). Rejected with pipeline_parallel > 1.")
    attention_backend: str = field_doc("auto", "Core attention: dense (SDPA + boolean mask), tiled (exact block-sparse SDPA tiles), flex (FlexAttention, GPU), auto (flex on GPU, tiled on CPU).")
    attention_tile: int = field_doc(128, "Query/key tile size of the tiled backend (rounded to a multiple of the block size).")
    rope_base: float = field_doc(10000.0, "Rotary embedding base.")
    init: str = field_doc("reference", "Weight init: reference (PyTorch default Linear, kaiming-uniform embeddings, zero output head and adaLN) or megatron (normal 0.02).")
    make_vocab_size_divisible_by: int = field_doc(128, "Pad the model vocabulary to a multiple of this times tensor_parallel (Megatron convention). Padded rows are never predicted.")
    recompute: bool = field_doc(False, "Full activation recomputation of every layer (trades compute for memory).")
    # -- second backbone family (issue 12): Llama/Qwen2/SmolLM2 layers, for AR -> BD3 adaptation
    arch: str = field_doc("dit", "Backbone: dit (the reference DDiT: LayerNorm, GELU MLP, optional adaLN) or llama (Llama/Qwen2/SmolLM2: RMSNorm, SwiGLU, grouped-query attention, no adaLN, no biases; model.adaln must be false). Both use RoPE with model.rope_base.")
    num_query_groups: int = field_doc(0, "llama: key/value heads of grouped-query attention (HF num_key_value_heads); 0 = num_heads (plain multi-head).")
    ffn_hidden_size: int = field_doc(0, "llama: SwiGLU inner width (HF intermediate_size); 0 = mlp_ratio * hidden_size.")
    norm_eps: float = field_doc(1e-5, "llama: RMSNorm epsilon (HF rms_norm_eps).")
    shift_logits: bool = field_doc(False, "llama, diffusion objectives: predict the token at position i from the hidden state at i - 1 (Fast-dLLM v2), so an adapted causal LM keeps its next-token head; a block's first token reads the clean stream's previous token. See megabd3/model/shift.py.")


@dataclass
class DataConfig:
    """Tokenized datasets and how samples are cut from them."""

    tokenizer: str = field_doc("gpt2", "Tokenizer: gpt2, bert-base-uncased, a local HF tokenizer directory or a Hub name.")
    train_prefix: str = field_doc("", "Path prefix of the training .bin/.idx/.manifest.json (relative paths resolve against the working directory).")
    valid_prefix: str = field_doc("", "Path prefix of the validation dataset.")
    test_prefix: str = field_doc("", "Path prefix of the test dataset (launchers/evaluate.py).")
    seq_len: int = field_doc(1024, "Training sequence length L (128 for LM1B, 1024 for OWT).")
    mode: str = field_doc("wrap", "wrap: packed L-token windows across documents; pad: one document per sample, truncated or padded.")
    chunk_special_tokens: bool = field_doc(False, "In wrap mode, frame every chunk as [BOS] + L-2 tokens + [EOS] (the reference's insert_*_special).")
    shuffle: bool = field_doc(True, "Shuffle training samples (deterministically from training.seed).")
    cache_dir: str = field_doc("", "Where sample-index caches are written; empty = beside the dataset in <prefix>_cache/.")
    num_workers: int = field_doc(0, "DataLoader worker processes per rank.")
    check_max_id_samples: int = field_doc(64, "Documents sampled at load time to check max token id < vocab size.")


@dataclass
class NoiseConfig:
    """The training-time noise schedule p(t) (mask probability); evaluation always uses loglinear."""

    type: str = field_doc("loglinear", "Schedule: loglinear, square, square_root, log, cosine, gaussian, bimodal_gaussian.")
    eps: float = field_doc(1e-3, "Small constant of the reference schedules (cosine epsilon, clamp of square/square_root).")
    mu: float = field_doc(0.5, "Gaussian schedule: mean of the mask probability.")
    sigma: float = field_doc(0.1, "Gaussian schedule: standard deviation (not variance) of the mask probability.")
    mu1: float = field_doc(0.15, "Bimodal Gaussian: mean of the first component.")
    sigma1: float = field_doc(0.02, "Bimodal Gaussian: standard deviation of the first component.")
    mu2: float = field_doc(0.4, "Bimodal Gaussian: mean of the second component at the start of training.")
    mu2_end: float = field_doc(0.85, "Bimodal Gaussian: asymptotic mean of the second component (mu2(tau) = mu2 + (mu2_end - mu2)(1 - exp(-tau))); set equal to mu2 for a fixed mean.")
    tau_scale: float = field_doc(3.0, "Bimodal Gaussian: tau = tau_scale * step / training.steps.")
    sigma2: float = field_doc(0.08, "Bimodal Gaussian: standard deviation of the second component.")
    w1: float = field_doc(0.7, "Bimodal Gaussian: weight of the first component, in (0, 1).")
    uniform_mix: float = field_doc(DEFAULT_UNIFORM_MIX, "Gaussian and bimodal Gaussian: defensive importance sampling (Hesterberg 1995). Mixes this fraction rho of U[0, 1] into the sampling density, q_mix = (1 - rho) q + rho, and weighs by 1/(p q_mix(p)) <= 1/(rho p): still unbiased, and each draw's term f(p)/(p q_mix) is at most 1/rho times sup f/p, so the per-step estimate has max/mean <= 1/rho and relative std <= sqrt((1/rho - 1)/n) for n draws when E[CE | p] grows like p. Without it (rho = 0, the report's density) the weight explodes where the thin-tailed q is tiny (1e10-1e12 at the configs' parameters), a typical step is ~20-30% low with rare huge spikes, and a bimodal such as mu1=0.3 cannot even reach p < 0.13 in float64. The default 0.1: the second moment is at most 1/(1 - rho) = 1.11 times that of q alone and at most 1/rho = 10 times that of plain uniform sampling. In [0, 1); 0 = exactly the report's density.")


@dataclass
class ClipSearchConfig:
    """Data-driven search of the clipped training interval [beta, omega] (spec section 2.3)."""

    enabled: bool = field_doc(False, "Run the variance search at every evaluation and write the best interval into training.")
    widths: list = field_doc([0.5, 0.6, 0.7, 0.8, 0.9], "Candidate interval widths.")
    delta: float = field_doc(0.05, "Step between candidate interval starts.")
    num_batches: int = field_doc(100, "Validation batches used per search (the reference uses the first 100).")
    fix: bool = field_doc(False, "Compute and log the variance table but keep the configured interval.")


@dataclass
class DiffusionConfig:
    """Objective, block size, noise schedule, clipping and loss weighting."""

    objective: str = field_doc("bd3lm", "Objective: ar, mdlm, bd3lm or sedd.")
    block_size: int = field_doc(16, "Block size L' (1 = AR-like, seq_len = MDLM). Ignored (forced to 1) for ar, seq_len for mdlm/sedd.")
    noise: NoiseConfig = field(default_factory=NoiseConfig, metadata={"doc": "Training noise schedule."})
    sampling_eps: float = field_doc(1e-3, "Lower end epsilon of t ~ U[eps, 1] for the unclipped NELBO (training default and all evaluation).")
    clip_min: float = field_doc(1e-3, "Training interval lower bound beta (t ~ U[beta, omega]).")
    clip_max: float = field_doc(1.0, "Training interval upper bound omega.")
    time_mode: str = field_doc("uniform", "uniform: t ~ U[clip_min, clip_max]; tuned: the L'=1 U[1,1] schedule (all positions masked, weight 1, exact AR NLL).")
    antithetic: bool = field_doc(True, "Stratify t over the local batch x blocks (one sub-interval per cell).")
    resample: bool = field_doc(False, "Redraw blocks whose realised masked fraction falls outside [clip_min, clip_max] (spec 1.1 step 3).")
    clip_search: ClipSearchConfig = field(default_factory=ClipSearchConfig, metadata={"doc": "Data-driven clip search."})
    weighting: str = field_doc("none", "Training-only loss weighting of the NELBO: none, edm, iddpm, sigmoid, fm, simple.")
    weighting_k: float = field_doc(0.0, "Shift k of the sigmoid weighting sigmoid(-lambda + k).")
    ignore_bos: bool = field_doc(False, "Never mask position 0 and exclude it from the loss (reference ignore_bos).")
    sigma_max: float = field_doc(6.907755278982137, "Clamp of sigma = -log(1-p) fed to time conditioning and SEDD (-log 1e-3).")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (reference: lr 3e-4, betas 0.9/0.999, wd 0, 2500 warm-up, constant)."""

    lr: float = field_doc(3e-4, "Peak learning rate.")
    min_lr: float = field_doc(0.0, "Final learning rate of the cosine schedule.")
    betas: list = field_doc([0.9, 0.999], "AdamW betas.")
    eps: float = field_doc(1e-8, "AdamW epsilon.")
    weight_decay: float = field_doc(0.0, "AdamW weight decay.")
    warmup_steps: int = field_doc(2500, "Linear warm-up from 0 over this many optimizer steps.")
    schedule: str = field_doc("constant", "After warm-up: constant or cosine (to min_lr at training.steps).")
    grad_clip: float = field_doc(1.0, "Gradient-norm clipping threshold (0 disables).")


@dataclass
class TrainingConfig:
    """Steps, batch sizes, intervals and the seed."""

    steps: int = field_doc(1000, "Optimizer steps to train for.")
    micro_batch_size: int = field_doc(8, "Sequences per rank per micro-step.")
    global_batch_size: int = field_doc(0, "Sequences per optimizer step; 0 = micro_batch_size x gradient_accumulation x data-parallel size.")
    gradient_accumulation: int = field_doc(1, "Micro-steps per optimizer step (derived from global_batch_size when that is set).")
    seed: int = field_doc(1, "Seed of weights, noise, shuffling and dropout.")
    ema: float = field_doc(0.9999, "EMA decay (with the (1+n)/(10+n) warm-up); 0 disables EMA.")
    eval_interval: int = field_doc(500, "Evaluate every N optimizer steps (0 = only at the end).")
    log_interval: int = field_doc(10, "Console/JSONL log line every N optimizer steps.")
    init_from: str = field_doc("", "Fine-tune: load model (and EMA) weights from this checkpoint directory, with a fresh optimizer and warm-up.")
    run_dir: str = field_doc("runs/default", "Run directory: resolved config, metrics.jsonl, checkpoints, plots.")
    nan_policy: str = field_doc("stop", "On a non-finite loss: stop (name the step and last good checkpoint) or skip the step.")


@dataclass
class ParallelConfig:
    """Tensor/pipeline/data parallelism, ZeRO and precision (see the support matrix in DESIGN.md)."""

    tensor_parallel: int = field_doc(1, "Tensor-parallel size (megatron-core).")
    pipeline_parallel: int = field_doc(1, "Pipeline-parallel size (megatron-core 1F1B schedule).")
    virtual_pipeline: int = field_doc(1, "Virtual pipeline stages per rank; only 1 is supported (the model is built as one chunk per stage: interleaved 1F1B is rejected at config time).")
    zero_stage: int = field_doc(0, "DeepSpeed ZeRO stage 0-3 (PP>1 supports only 1).")
    precision: str = field_doc("auto", "auto (bf16 on GPU, fp32 on CPU), fp32 or bf16.")
    sequence_parallel: bool = field_doc(False, "Megatron sequence parallelism (needs Transformer Engine/apex norms; rejected on the local spec).")
    world_size: int = field_doc(0, "Expected world size for validation and --dry-run; 0 = take it from the launcher.")
    backend: str = field_doc("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU), nccl or gloo.")


@dataclass
class CheckpointConfig:
    """Checkpointing and resume."""

    save_interval: int = field_doc(500, "Save every N optimizer steps (0 = only at the end and on signals).")
    keep_last_n: int = field_doc(3, "Keep this many most recent checkpoints (0 = keep all).")
    resume: bool = field_doc(True, "Auto-resume from <run_dir>/checkpoints/latest when it exists.")
    save_on_signal: bool = field_doc(True, "On SIGTERM/SIGUSR1 save a checkpoint and exit 0 (SLURM preemption).")


@dataclass
class LoggingConfig:
    """Console, JSONL and wandb logging."""

    wandb_mode: str = field_doc("offline", "wandb mode: offline, online or disabled. Offline never touches the network.")
    wandb_project: str = field_doc("megabd3", "wandb project name.")
    progress_bar: bool = field_doc(True, "Show a tqdm progress bar on rank 0.")
    plot: bool = field_doc(True, "Write loss curves to <run_dir>/curves.png at the end.")


@dataclass
class EvalConfig:
    """Evaluation: test NELBO (always loglinear, unclipped, unweighted), Var. NELBO, zero-shot, Gen PPL."""

    batch_size: int = field_doc(8, "Sequences per rank per evaluation batch.")
    max_batches: int = field_doc(0, "Evaluate at most this many batches (0 = the whole split).")
    use_ema: bool = field_doc(True, "Evaluate with EMA weights.")
    var_nelbo: bool = field_doc(True, "Also report Var. NELBO (variance across sequences x blocks of the per-block mean loss).")
    zero_shot_prefixes: list = field_doc([], "Extra preprocessed datasets (prefixes) for zero-shot perplexity.")
    judge_model: str = field_doc("gpt2-large", "Causal LM for generative perplexity: a local directory or a Hub name.")
    judge_context: int = field_doc(1024, "Judge sliding-window context length.")
    judge_stride: int = field_doc(512, "Judge sliding-window stride.")


@dataclass
class SamplingConfig:
    """Generation (block sampler for bd3lm/mdlm, AR and SEDD samplers)."""

    num_samples: int = field_doc(4, "Samples to generate.")
    batch_size: int = field_doc(1, "Samples generated together.")
    length: int = field_doc(1024, "Tokens to generate (including BOS); must be a multiple of the block size.")
    strategy: str = field_doc("first_hitting", "Block update rule (bd3lm, mdlm). first_hitting: one uniformly chosen masked position per denoising call (Zheng et al.); ancestral: sampling.steps steps per block; threshold: every masked position whose confidence (top probability of the untruncated SUBS distribution, before top-p) exceeds sampling.threshold, and at least the most confident one; topk_per_step: the sampling.tokens_per_step most confident (Fast-dLLM / SDAR).")
    threshold: float = field_doc(0.9, "tau of strategy=threshold (>= 0): reveal every masked position whose confidence, the largest probability of its untruncated SUBS distribution (before top_p), exceeds tau, else the single most confident; the tokens themselves are nucleus draws. Confidence never exceeds 1, so tau >= 1 reveals exactly one token, the most confident, per call.")
    tokens_per_step: int = field_doc(2, "k of strategy=topk_per_step: masked positions revealed per denoising call (the last call of a block may reveal fewer).")
    first_hitting: bool = field_doc(True, "Legacy switch: false selects ancestral sampling (the same as strategy=ancestral); must stay true for threshold and topk_per_step.")
    steps: int = field_doc(1000, "T: denoising steps per block for ancestral sampling.")
    top_p: float = field_doc(0.9, "Nucleus threshold (1.0 disables).")
    nucleus: str = field_doc("reference", "reference: keep tokens while cumulative prob <= p (top-1 always); hf: keep the smallest set reaching p.")
    kv_cache: bool = field_doc(True, "Use the KV cache of clean blocks.")
    var_length: bool = field_doc(False, "Stop at a second EOS or when the last-256-token unigram entropy drops below entropy_threshold.")
    entropy_threshold: float = field_doc(4.0, "Unigram-entropy stop threshold (nats) over the last 256 tokens.")
    max_tries: int = field_doc(10, "Fixed-length mode: regenerate low-entropy samples up to this many times.")
    cache_window: int = field_doc(1024, "Sliding KV-cache window in tokens for generation beyond the training length.")
    cuda_graphs: str = field_doc("auto", "KV-cached decoding steps as CUDA graphs (bd3lm and ar samplers): auto captures each call shape once and replays it when the model is on CUDA and the fast decoding path serves it (DiT backbone, TP = PP = 1, untimed; otherwise one line says why not); on requires it and refuses otherwise; off runs every step eagerly. Ignored on CPU under auto.")
    seed: int = field_doc(1, "Sampling seed.")


@dataclass
class Config:
    """A complete megabd3 run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Transformer."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Datasets."})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata={"doc": "Objective and noise."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimizer."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"doc": "Training loop."})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"doc": "Parallelism."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": "Checkpoints."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Logging."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Evaluation."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"doc": "Sampling."})
    deepspeed: dict = field_doc({}, "Pass-through block merged into the derived DeepSpeed config (validated for consistency).")
    description: str = field_doc("", "Free text saying what this run is (e.g. which table of the reproduction report it reproduces); logged, no effect on training.")
