"""Cross-field validation: combinations that type-check but cannot run (or run silently wrong).

Every check appends a :class:`Problem` naming the keys involved, so the loader can say which file
set each of them. Nothing here raises; :func:`validate` returns every problem at once.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from megabd3.config import choices
from megabd3.config.derived import batch_plan_problems, cuda_available, effective_block_size, model_parallel_size
from megabd3.config.errors import Problem
from megabd3.config.schema import Config


class _Checker:
    """Collects problems; small helpers keep each rule to one line."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, keys: tuple[str, ...] | str, message: str) -> None:
        self.problems.append(Problem((keys,) if isinstance(keys, str) else tuple(keys), message))

    def choice(self, key: str, value: object, allowed: tuple) -> None:
        if value not in allowed:
            self.add(key, f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")

    def at_least(self, key: str, value: float, low: float) -> None:
        if not value >= low:
            self.add(key, f"{key}={value!r} must be >= {low}")

    def within(self, key: str, value: float, low: float, high: float, *, open_low: bool = False,
               open_high: bool = False) -> None:
        ok_low = value > low if open_low else value >= low
        ok_high = value < high if open_high else value <= high
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok_low and ok_high):
            lb, hb = ("(" if open_low else "["), (")" if open_high else "]")
            self.add(key, f"{key}={value!r} must lie in {lb}{low}, {high}{hb}")


def _check_model(c: _Checker, cfg: Config) -> None:
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    for key in ("hidden_size", "num_layers", "num_heads", "cond_dim", "mlp_ratio", "attention_tile",
                "make_vocab_size_divisible_by"):
        c.at_least(f"model.{key}", getattr(m, key), 1)
    if m.num_heads >= 1 and m.hidden_size % m.num_heads:
        c.add(("model.hidden_size", "model.num_heads"),
              f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    elif m.num_heads >= 1 and (m.hidden_size // m.num_heads) % 2:
        c.add(("model.hidden_size", "model.num_heads"),
              f"head dim hidden_size/num_heads = {m.hidden_size // m.num_heads} must be even for rotary embeddings")
    if tp >= 1 and m.num_heads >= 1 and m.num_heads % tp:
        c.add(("model.num_heads", "parallel.tensor_parallel"),
              f"model.num_heads={m.num_heads} is not divisible by parallel.tensor_parallel={tp}; "
              f"pick a tensor_parallel that divides the heads")
    if tp >= 1 and m.arch != "llama" and (m.mlp_ratio * m.hidden_size) % tp:  # llama: ffn_hidden_size below
        c.add(("model.mlp_ratio", "model.hidden_size", "parallel.tensor_parallel"),
              f"MLP width mlp_ratio x hidden_size = {m.mlp_ratio * m.hidden_size} is not divisible by "
              f"parallel.tensor_parallel={tp}")
    c.within("model.dropout", m.dropout, 0.0, 1.0, open_high=True)
    c.choice("model.attention_backend", m.attention_backend, choices.ATTENTION_BACKENDS)
    c.choice("model.init", m.init, choices.INITS)
    if not (m.rope_base > 0):
        c.add("model.rope_base", f"model.rope_base={m.rope_base!r} must be > 0")
    _check_llama(c, cfg)


ARCHS = ("dit", "llama")  # model.arch: the reference DDiT, the Llama family (issue 12)


def _check_llama(c: _Checker, cfg: Config) -> None:
    """model.arch and the Llama-family fields (megabd3/model/llama.py check_llama_config at build)."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    c.choice("model.arch", m.arch, ARCHS)
    c.at_least("model.num_query_groups", m.num_query_groups, 0)
    c.at_least("model.ffn_hidden_size", m.ffn_hidden_size, 0)
    if not (m.norm_eps > 0):
        c.add("model.norm_eps", f"model.norm_eps={m.norm_eps!r} must be > 0")
    if m.shift_logits and m.arch != "llama":
        c.add(("model.shift_logits", "model.arch"), "model.shift_logits=true needs model.arch=llama (an adapted "
              "causal LM); the dit backbone predicts each position from its own hidden state")
    if m.shift_logits and cfg.diffusion.objective not in ("bd3lm", "mdlm"):
        c.add(("model.shift_logits", "diffusion.objective"),
              f"model.shift_logits=true applies to bd3lm/mdlm; diffusion.objective={cfg.diffusion.objective!r} "
              "(ar already predicts the next token); set model.shift_logits=false")
    if m.arch != "llama":
        # the DiT reads none of these: a non-default value would be silently ignored
        from megabd3.config.schema import ModelConfig

        base = ModelConfig()
        for key in ("num_query_groups", "ffn_hidden_size", "norm_eps"):
            if getattr(m, key) != getattr(base, key):
                c.add(("model." + key, "model.arch"), f"model.{key}={getattr(m, key)!r} only applies to "
                      "model.arch=llama (the dit ignores it); reset it to its default or set model.arch=llama")
        return
    groups = m.num_query_groups or m.num_heads
    if groups >= 1 and m.num_heads % groups:
        c.add(("model.num_query_groups", "model.num_heads"),
              f"model.num_query_groups={groups} does not divide model.num_heads={m.num_heads}")
    if m.adaln or m.time_conditioning:
        c.add(("model.arch", "model.adaln"), "model.arch=llama has no adaLN; set model.adaln=false "
              "and model.time_conditioning=false")
    if m.recompute:
        c.add(("model.arch", "model.recompute"), "model.recompute=true is not supported with model.arch=llama yet")
    if tp >= 1 and groups >= 1 and groups % tp:
        c.add(("model.num_query_groups", "parallel.tensor_parallel"),
              f"model.num_query_groups={groups} is not divisible by parallel.tensor_parallel={tp}; "
              "each tensor-parallel rank needs whole query groups")
    ffn = m.ffn_hidden_size or m.mlp_ratio * m.hidden_size
    if tp >= 1 and ffn % tp:
        c.add(("model.ffn_hidden_size", "parallel.tensor_parallel"),
              f"model.ffn_hidden_size={ffn} is not divisible by parallel.tensor_parallel={tp}")


def _check_data(c: _Checker, cfg: Config) -> None:
    d = cfg.data
    if not d.tokenizer:
        c.add("data.tokenizer", "data.tokenizer is empty; set it to gpt2, bert-base-uncased or a tokenizer directory")
    c.at_least("data.seq_len", d.seq_len, 2)
    c.choice("data.mode", d.mode, choices.DATA_MODES)
    if d.chunk_special_tokens and d.mode != "wrap":
        c.add(("data.chunk_special_tokens", "data.mode"),
              f"data.chunk_special_tokens=true only applies to data.mode='wrap', found mode={d.mode!r}")
    if d.chunk_special_tokens and d.seq_len < 3:
        c.add(("data.chunk_special_tokens", "data.seq_len"),
              f"data.chunk_special_tokens needs seq_len >= 3 ([BOS] + tokens + [EOS]), found {d.seq_len}")
    c.at_least("data.num_workers", d.num_workers, 0)
    c.at_least("data.check_max_id_samples", d.check_max_id_samples, 0)


def _check_noise(c: _Checker, cfg: Config) -> None:
    n = cfg.diffusion.noise
    c.choice("diffusion.noise.type", n.type, choices.NOISE_TYPES)
    c.within("diffusion.noise.eps", n.eps, 0.0, 1.0, open_low=True, open_high=True)
    if n.type == "gaussian":
        c.within("diffusion.noise.mu", n.mu, 0.0, 1.0, open_low=True, open_high=True)
        c.within("diffusion.noise.sigma", n.sigma, 0.0, math.inf, open_low=True, open_high=True)
    if n.type == "bimodal_gaussian":
        for key in ("mu1", "mu2", "mu2_end"):
            c.within(f"diffusion.noise.{key}", getattr(n, key), 0.0, 1.0, open_low=True, open_high=True)
        for key in ("sigma1", "sigma2"):
            c.within(f"diffusion.noise.{key}", getattr(n, key), 0.0, math.inf, open_low=True, open_high=True)
        c.within("diffusion.noise.w1", n.w1, 0.0, 1.0, open_low=True, open_high=True)
        c.at_least("diffusion.noise.tau_scale", n.tau_scale, 0.0)
    if n.type in ("gaussian", "bimodal_gaussian"):
        c.within("diffusion.noise.uniform_mix", n.uniform_mix, 0.0, 1.0, open_high=True)


def _check_diffusion(c: _Checker, cfg: Config) -> None:
    df, L = cfg.diffusion, cfg.data.seq_len
    c.choice("diffusion.objective", df.objective, choices.OBJECTIVES)
    if df.objective == "bd3lm":
        if df.block_size < 1:
            c.add("diffusion.block_size", f"diffusion.block_size={df.block_size} must be >= 1")
        elif df.block_size > L:
            c.add(("diffusion.block_size", "data.seq_len"),
                  f"diffusion.block_size={df.block_size} exceeds data.seq_len={L}; use a block size <= L")
        elif L % df.block_size:
            c.add(("diffusion.block_size", "data.seq_len"),
                  f"data.seq_len={L} is not divisible by diffusion.block_size={df.block_size}; "
                  f"use a block size that divides L")
    _check_noise(c, cfg)
    c.within("diffusion.sampling_eps", df.sampling_eps, 0.0, 1.0, open_low=True, open_high=True)
    if not (0.0 <= df.clip_min <= df.clip_max <= 1.0):
        c.add(("diffusion.clip_min", "diffusion.clip_max"),
              f"need 0 <= diffusion.clip_min <= diffusion.clip_max <= 1, found clip_min={df.clip_min!r}, "
              f"clip_max={df.clip_max!r}")
    c.choice("diffusion.time_mode", df.time_mode, choices.TIME_MODES)
    if df.time_mode == "tuned" and (df.objective != "bd3lm" or df.block_size != 1):
        c.add(("diffusion.time_mode", "diffusion.objective", "diffusion.block_size"),
              f"diffusion.time_mode='tuned' (U[1,1]) is defined only for objective='bd3lm' with block_size=1, "
              f"found objective={df.objective!r}, block_size={df.block_size}")
    c.choice("diffusion.weighting", df.weighting, choices.WEIGHTINGS)
    if df.weighting != "none" and df.objective not in choices.DIFFUSION_OBJECTIVES:
        c.add(("diffusion.weighting", "diffusion.objective"),
              f"diffusion.weighting={df.weighting!r} applies only to the diffusion objectives "
              f"{'/'.join(choices.DIFFUSION_OBJECTIVES)}, found objective={df.objective!r}; set weighting='none'")
    if df.weighting != "none" and df.time_mode == "tuned":
        c.add(("diffusion.weighting", "diffusion.time_mode"),
              "diffusion.weighting must be 'none' with time_mode='tuned' (its weight is fixed at 1)")
    if not (df.sigma_max > 0):
        c.add("diffusion.sigma_max", f"diffusion.sigma_max={df.sigma_max!r} must be > 0")
    cs = df.clip_search
    if cs.enabled:
        if df.objective not in choices.DIFFUSION_OBJECTIVES:
            c.add(("diffusion.clip_search.enabled", "diffusion.objective"),
                  f"diffusion.clip_search applies only to {'/'.join(choices.DIFFUSION_OBJECTIVES)}, "
                  f"found objective={df.objective!r}")
        if df.time_mode == "tuned":
            c.add(("diffusion.clip_search.enabled", "diffusion.time_mode"),
                  "diffusion.clip_search cannot be enabled with time_mode='tuned' (the interval is fixed at [1, 1])")
    if not cs.widths or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 1
                                for w in cs.widths):
        c.add("diffusion.clip_search.widths",
              f"diffusion.clip_search.widths={cs.widths!r} must be a non-empty list of numbers in (0, 1]")
    c.within("diffusion.clip_search.delta", cs.delta, 0.0, 1.0, open_low=True)
    c.at_least("diffusion.clip_search.num_batches", cs.num_batches, 1)


def _check_optim(c: _Checker, cfg: Config) -> None:
    o = cfg.optim
    if not (o.lr > 0):
        c.add("optim.lr", f"optim.lr={o.lr!r} must be > 0")
    if not (0 <= o.min_lr <= o.lr):
        c.add(("optim.min_lr", "optim.lr"), f"need 0 <= optim.min_lr <= optim.lr, found min_lr={o.min_lr!r}, lr={o.lr!r}")
    if not (len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                      for b in o.betas)):
        c.add("optim.betas", f"optim.betas={o.betas!r} must be two numbers in [0, 1)")
    if not (o.eps > 0):
        c.add("optim.eps", f"optim.eps={o.eps!r} must be > 0")
    c.at_least("optim.weight_decay", o.weight_decay, 0.0)
    c.at_least("optim.warmup_steps", o.warmup_steps, 0)
    c.choice("optim.schedule", o.schedule, choices.LR_SCHEDULES)
    c.at_least("optim.grad_clip", o.grad_clip, 0.0)


def _check_training(c: _Checker, cfg: Config) -> None:
    t = cfg.training
    c.at_least("training.steps", t.steps, 1)
    c.at_least("training.micro_batch_size", t.micro_batch_size, 1)
    c.at_least("training.global_batch_size", t.global_batch_size, 0)
    c.at_least("training.gradient_accumulation", t.gradient_accumulation, 1)
    c.within("training.ema", t.ema, 0.0, 1.0, open_high=True)
    for key in ("eval_interval", "seed"):
        c.at_least(f"training.{key}", getattr(t, key), 0)
    c.at_least("training.log_interval", t.log_interval, 1)
    if not t.run_dir:
        c.add("training.run_dir", "training.run_dir is empty; set a directory for the run's outputs")
    c.choice("training.nan_policy", t.nan_policy, choices.NAN_POLICIES)


def _check_parallel(c: _Checker, cfg: Config, world_size: Optional[int]) -> None:
    p = cfg.parallel
    for key in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline"):
        c.at_least(f"parallel.{key}", getattr(p, key), 1)
    c.choice("parallel.zero_stage", p.zero_stage, choices.ZERO_STAGES)
    c.choice("parallel.precision", p.precision, choices.PRECISIONS)
    c.choice("parallel.backend", p.backend, choices.DIST_BACKENDS)
    c.at_least("parallel.world_size", p.world_size, 0)
    # The support matrix of DESIGN.md ("Parallelism"); everything outside it is rejected here.
    if p.pipeline_parallel > 1 and p.zero_stage != 1:
        why = {0: "ZeRO-0 clips gradients wrong", 2: "ZeRO-2 reduces gradients twice", 3: "ZeRO-3 deadlocks"}
        c.add(("parallel.pipeline_parallel", "parallel.zero_stage"),
              f"parallel.pipeline_parallel={p.pipeline_parallel} supports only parallel.zero_stage=1, found "
              f"zero_stage={p.zero_stage} ({why.get(p.zero_stage, 'unsupported')}); set parallel.zero_stage=1")
    if p.sequence_parallel:
        c.add("parallel.sequence_parallel",
              "parallel.sequence_parallel=true is not supported: the local layer spec has no sequence-parallel "
              "LayerNorm; set it to false")
    if p.pipeline_parallel > 1 and cfg.model.tie_embeddings:
        c.add(("model.tie_embeddings", "parallel.pipeline_parallel"),
              f"model.tie_embeddings=true is not supported with parallel.pipeline_parallel={p.pipeline_parallel}; "
              f"set model.tie_embeddings=false")
    if p.virtual_pipeline > 1 and p.pipeline_parallel < 2:
        c.add(("parallel.virtual_pipeline", "parallel.pipeline_parallel"),
              f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline_parallel > 1")
    elif p.virtual_pipeline > 1:
        # Interleaving needs one model chunk per virtual stage (each built with its vp_stage) carried
        # through the engine, EMA, checkpoint and export; megabd3 builds one chunk per rank.
        c.add("parallel.virtual_pipeline",
              f"parallel.virtual_pipeline={p.virtual_pipeline} (interleaved pipeline) is not supported: the model "
              f"is built as one chunk per pipeline stage; set parallel.virtual_pipeline=1")
    stages = max(1, p.pipeline_parallel) * max(1, p.virtual_pipeline)
    if stages > 1 and cfg.model.num_layers % stages:
        c.add(("model.num_layers", "parallel.pipeline_parallel", "parallel.virtual_pipeline"),
              f"model.num_layers={cfg.model.num_layers} is not divisible by pipeline_parallel x virtual_pipeline "
              f"= {stages}")
    if world_size and p.world_size and world_size != p.world_size:
        c.add("parallel.world_size", f"parallel.world_size={p.world_size} but the job has {world_size} ranks; "
                                     f"launch {p.world_size} ranks or set parallel.world_size=0")
    ws = world_size if world_size else (p.world_size or None)
    mp = model_parallel_size(cfg)
    if ws is not None and mp >= 1:
        if ws % mp:
            c.add(("parallel.world_size", "parallel.tensor_parallel", "parallel.pipeline_parallel"),
                  f"world size {ws} is not a multiple of tensor_parallel x pipeline_parallel = {mp}")
        else:
            for msg in batch_plan_problems(cfg, ws // mp):
                c.add(("training.global_batch_size", "training.micro_batch_size", "training.gradient_accumulation"),
                      f"{msg} (world size {ws})")


def _check_attention_device(c: _Checker, cfg: Config, training: bool, cuda: Optional[bool]) -> None:
    if cfg.model.attention_backend != "flex" or not training:
        return
    has_cuda = cuda_available() if cuda is None else cuda
    if not has_cuda:
        c.add("model.attention_backend",
              "model.attention_backend='flex' cannot train without CUDA (FlexAttention has no CPU backward); "
              "use 'auto', 'tiled' or 'dense'")


def _check_rest(c: _Checker, cfg: Config) -> None:
    ck, lg, ev, sm = cfg.checkpoint, cfg.logging, cfg.eval, cfg.sampling
    c.at_least("checkpoint.save_interval", ck.save_interval, 0)
    c.at_least("checkpoint.keep_last_n", ck.keep_last_n, 0)
    c.choice("logging.wandb_mode", lg.wandb_mode, choices.WANDB_MODES)
    c.at_least("eval.batch_size", ev.batch_size, 1)
    c.at_least("eval.max_batches", ev.max_batches, 0)
    if not all(isinstance(x, str) and x for x in ev.zero_shot_prefixes):
        c.add("eval.zero_shot_prefixes", f"eval.zero_shot_prefixes={ev.zero_shot_prefixes!r} must be a list of paths")
    c.at_least("eval.judge_context", ev.judge_context, 1)
    if not (1 <= ev.judge_stride <= ev.judge_context):
        c.add(("eval.judge_stride", "eval.judge_context"),
              f"need 1 <= eval.judge_stride <= eval.judge_context, found {ev.judge_stride} and {ev.judge_context}")
    for key in ("num_samples", "batch_size", "length", "steps", "max_tries", "cache_window"):
        c.at_least(f"sampling.{key}", getattr(sm, key), 1)
    c.within("sampling.top_p", sm.top_p, 0.0, 1.0, open_low=True)
    c.choice("sampling.nucleus", sm.nucleus, choices.NUCLEUS_RULES)
    c.at_least("sampling.entropy_threshold", sm.entropy_threshold, 0.0)
    _check_strategy(c, cfg)
    if cfg.diffusion.objective == "bd3lm" and cfg.diffusion.block_size >= 1:
        b = effective_block_size(cfg)
        if sm.length % b:
            c.add(("sampling.length", "diffusion.block_size"),
                  f"sampling.length={sm.length} is not a multiple of diffusion.block_size={b}")
        if sm.cache_window < b or sm.cache_window % b:
            c.add(("sampling.cache_window", "diffusion.block_size"),
                  f"sampling.cache_window={sm.cache_window} must be a positive multiple of diffusion.block_size={b}")


SAMPLING_STRATEGIES = ("first_hitting", "ancestral", "threshold", "topk_per_step")  # = sampling.block.STRATEGIES


def _check_strategy(c: _Checker, cfg: Config) -> None:
    """sampling.strategy and its parameters (megabd3/sampling/block.py check_strategy at sampling time)."""
    sm = cfg.sampling
    c.choice("sampling.strategy", sm.strategy, SAMPLING_STRATEGIES)
    c.choice("sampling.cuda_graphs", sm.cuda_graphs, choices.CUDA_GRAPH_MODES)
    if sm.cuda_graphs == "on" and not (sm.kv_cache and cfg.diffusion.objective in ("bd3lm", "ar")):
        c.add(("sampling.cuda_graphs", "sampling.kv_cache", "diffusion.objective"),
              f"sampling.cuda_graphs=on captures KV-cached decoding steps (bd3lm and ar with sampling.kv_cache=true), "
              f"found objective {cfg.diffusion.objective} with kv_cache={sm.kv_cache}: set sampling.cuda_graphs=auto or off")
    c.within("sampling.threshold", sm.threshold, 0.0, math.inf, open_high=True)
    if not (isinstance(sm.tokens_per_step, int) and sm.tokens_per_step >= 1):
        c.add("sampling.tokens_per_step", f"sampling.tokens_per_step={sm.tokens_per_step!r} must be an integer >= 1")
    if sm.strategy in ("threshold", "topk_per_step"):
        if not sm.first_hitting:
            c.add(("sampling.strategy", "sampling.first_hitting"),
                  f"sampling.first_hitting=false (ancestral) conflicts with sampling.strategy={sm.strategy}: "
                  f"drop first_hitting=false or use strategy=ancestral")
        if cfg.diffusion.objective not in ("bd3lm", "mdlm"):
            c.add(("sampling.strategy", "diffusion.objective"),
                  f"sampling.strategy={sm.strategy} applies to bd3lm and mdlm sampling, not "
                  f"diffusion.objective={cfg.diffusion.objective}: use strategy=first_hitting")


def _check_objective_builds(c: _Checker, cfg: Config) -> None:
    """Build the training objective (noise schedule, time sampler, resampling), so a valid config builds.

    Only when the diffusion and data keys passed every check above (building would repeat those
    problems less precisely). The one check here that imports torch, lazily: the rest stay torch-free.
    """
    if any(k.startswith(("diffusion.", "data.")) for p in c.problems for k in p.keys):
        return
    from megabd3.diffusion.objectives import build_problem

    found = build_problem(cfg)
    if found is not None:
        c.add(*found)


CHECKS: tuple[Callable[[_Checker, Config], None], ...] = (
    _check_model, _check_data, _check_diffusion, _check_optim, _check_training, _check_rest,
    _check_objective_builds,
)


def check(cfg: Config, world_size: Optional[int] = None, *, training: bool = True,
          cuda: Optional[bool] = None) -> list[Problem]:
    """Every cross-field problem of ``cfg`` as :class:`Problem` objects (keys + message).

    world_size: the number of ranks when known (else ``parallel.world_size`` if > 0); enables the
    global-batch check. training: False for evaluation/sampling, where flex on CPU is allowed.
    cuda: override CUDA detection (tests); None = ask torch, only if the answer matters.
    """
    c = _Checker()
    for fn in CHECKS:
        fn(c, cfg)
    _check_parallel(c, cfg, world_size)
    _check_attention_device(c, cfg, training, cuda)
    return c.problems


def validate(cfg: Config, world_size: Optional[int] = None, *, training: bool = True,
             cuda: Optional[bool] = None) -> list[str]:
    """Cross-field checks of ``cfg``; one line per problem (empty when the config is consistent)."""
    return [str(p) for p in check(cfg, world_size, training=training, cuda=cuda)]
