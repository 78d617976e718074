"""``--dry-run --world-size N``: plan a training run from one process, without GPUs, data or a real job.

1. The config is validated for N ranks (a config error stops here, as it would stop the run).
2. The plan: TP x PP x DP, the batch split and tokens per step, the data (documents, tokens, steps per
   epoch) and the tokenizer.
3. For every distinct rank role -- each pipeline stage x tensor-parallel rank (data-parallel ranks hold the
   same shapes) -- the process becomes that rank of a fake N-rank process group (megabd3.parallel.fake,
   megatron's real ``initialize_model_parallel``), builds the *real* model for it under ``FakeTensorMode``,
   and runs one forward + backward of the real training objective at micro_batch_size x seq_len, tracing
   the activation peak (megabd3.training.memtrace). Parameters, gradients, optimizer state, EMA and ZeRO
   buffers follow from that rank's real parameters and the configured ZeRO stage
   (megabd3.training.memory_plan).
4. A per-role memory table, then the problems.

Problems are what would stop the real run but not the plan: a missing dataset or tokenizer, a manifest
that does not match, a missing ``training.init_from``. Failures are the planner's own: a rank role whose
fake world, model build or trace raised (its row shows ``n/a``, the cause is listed, the other roles are
still planned). Exit status of the launcher (``DryRunReport.exit_code``): 0 clean, 1 problems listed,
2 a config error or an internal failure -- a script can gate a submission on a clean dry run.

The plan is for the device the run will use (``target_cuda``, default True): ``precision: auto`` is
bf16 and ``attention_backend: auto`` is FlexAttention there. FlexAttention cannot run on (fake) CPU
tensors, so the trace stands in a function with its exact saved-tensor footprint (q, k, v, output,
fp32 log-sum-exp; memtrace.flex_standin); dense and tiled run for real.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from megabd3.training.memory_plan import StateBytes

GIB = 2**30
MIB = 2**20
EXIT_CLEAN, EXIT_PROBLEMS, EXIT_FAILED = 0, 1, 2

# Model vocabulary and mask id of the known tokenizers, for a plan without the tokenizer files.
KNOWN_VOCAB = {"gpt2": (50258, 50257), "bert-base-uncased": (30522, 103)}
FALLBACK_VOCAB = KNOWN_VOCAB["gpt2"]


@dataclass
class RoleMemory:
    """One rank role: pipeline stage x tensor-parallel rank (data-parallel rank 0 stands for all)."""

    rank: int
    pp_rank: int
    tp_rank: int
    params: Optional[int]          # local parameter elements (None: the role could not be built, see failures)
    state: Optional["StateBytes"]
    activations: Optional[int]     # peak activation bytes (None if the trace failed or was not run)
    in_flight: int = 1
    global_params: int = 0         # unsharded elements of this stage's parameters
    same_as: Optional[int] = None  # rank whose plan this row copies (a TP rank with the same shapes and ops)
    trace_tokens: Optional[int] = None  # sequence length the model saw in the trace (bd3lm: 2 x seq_len)

    @property
    def total(self) -> Optional[int]:
        return None if self.state is None else self.state.total + (self.activations or 0)


def _fmt(n: Optional[int], unit: int) -> str:
    """Three significant figures (no exponent), so small states do not print as 0.00."""
    if n is None:
        return "n/a"
    x = n / unit
    if x == 0:
        return "0"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 0.001:
        return f"{x:.3g}" if x < 1 else f"{x:.{2 if x < 10 else 1}f}"
    return "<0.001"


@dataclass
class DryRunReport:
    header: list[str] = field(default_factory=list)
    roles: list[RoleMemory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # the run would stop on these (exit 1)
    failures: list[str] = field(default_factory=list)   # the planner failed for a role (exit 2)
    total_params: int = 0
    vocab: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failures else EXIT_PROBLEMS if self.problems else EXIT_CLEAN

    def unit(self) -> tuple[str, int]:
        """GiB when a role reaches 1 GiB, MiB otherwise (small models)."""
        big = max((r.total or 0 for r in self.roles), default=0) >= GIB
        return ("GiB", GIB) if big else ("MiB", MIB)

    def table(self) -> str:
        _, unit = self.unit()
        cols = ("params", "grads", "optimizer", "ema", "buffers", "activations", "total")
        head = f"{'rank role':<22}{'#params':>10}" + "".join(f"{c:>12}" for c in cols)
        rows = [head, "-" * len(head)]
        for r in self.roles:
            s = r.state
            states = (s.params, s.grads, s.optimizer, s.ema, s.buffers) if s is not None else (None,) * 5
            vals = [_fmt(v, unit) for v in (*states, r.activations, r.total)]
            role = f"pp {r.pp_rank} tp {r.tp_rank} (rank {r.rank})"
            n = "n/a" if r.params is None else f"{r.params / 1e6:.{3 if r.params < 1e6 else 1}f}M"
            row = f"{role:<22}{n:>10}" + "".join(f"{v:>12}" for v in vals)
            rows.append(row + (f"  (same as rank {r.same_as})" if r.same_as is not None else ""))
        return "\n".join(rows)

    def render(self) -> str:
        out = list(self.header)
        if self.roles:
            name, _ = self.unit()
            out += ["", f"per-rank memory ({name}; data-parallel ranks of a role are identical):", self.table()]
        if self.notes:
            out += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        out.append("")
        if self.problems:
            out.append(f"problems ({len(self.problems)}):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("problems: none")
        if self.failures:
            out.append(f"planner failures ({len(self.failures)}; the rows marked n/a are not planned):")
            out += [f"  - {p}" for p in self.failures]
        out.append(f"dry run: nothing was trained (exit status {self.exit_code})")
        return "\n".join(out)


# ------------------------------------------------------------------------------------------ pieces


def _tokenizer(cfg: Any, problems: list[str]):  # type: ignore[no-untyped-def]
    """(tokenizer or None, model vocab, mask id)."""
    from megabd3.data.tokenizers import get_tokenizer

    try:
        tok = get_tokenizer(cfg.data.tokenizer)
        return tok, tok.model_vocab_size, tok.mask_id
    except Exception as exc:  # noqa: BLE001 - any failure is a listed problem, the plan goes on
        vocab, mask = KNOWN_VOCAB.get(cfg.data.tokenizer, FALLBACK_VOCAB)
        problems.append(f"data.tokenizer={cfg.data.tokenizer!r} is not available here ({_one_line(exc)}); "
                        f"the plan assumes a vocabulary of {vocab}")
        return None, vocab, mask


def _data_lines(cfg: Any, tok: Any, global_batch: int, problems: list[str]) -> list[str]:
    """Documents/tokens/steps per epoch of the train and valid splits; missing or mismatched data are
    problems (the run's preflight would stop on them)."""
    lines = []
    for split in ("train", "valid"):
        prefix = getattr(cfg.data, f"{split}_prefix")
        if not prefix:
            if split == "train":
                problems.append("data.train_prefix is empty; set it to a dataset made by tools/preprocess_data.py")
            continue
        if not Path(prefix + ".idx").is_file():
            problems.append(f"data.{split}_prefix={prefix!r}: {prefix}.idx not found on this machine; run "
                            f"tools/preprocess_data.py or fix the path")
            lines.append(f"{split}: {prefix} (not on this machine)")
            continue
        try:
            from megabd3.data.indexed import IndexedDataset

            idx = IndexedDataset(prefix)
            tokens = int(idx.sizes.sum())
            samples = tokens // cfg.data.seq_len
            lines.append(f"{split}: {len(idx):,} documents, {tokens:,} tokens, ~{samples:,} samples of "
                         f"{cfg.data.seq_len} ({samples / max(1, global_batch):,.1f} steps/epoch)")
            if tok is not None:
                from megabd3.data.manifest import check_manifest

                check_manifest(prefix, tok, check_max_id_samples=cfg.data.check_max_id_samples, seed=cfg.training.seed)
        except Exception as exc:  # noqa: BLE001 - a broken dataset is a problem, not a crash
            problems.append(f"data.{split}_prefix={prefix!r}: {_one_line(exc)}")
    if cfg.training.init_from and not Path(cfg.training.init_from).exists():
        problems.append(f"training.init_from={cfg.training.init_from!r} does not exist; point it at a pretraining "
                        f"run directory or its checkpoints/step_* directory")
    return lines


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _tp_class(tp_rank: int, shard: int, vocab: int, mask_id: int) -> tuple[bool, bool]:
    """What makes tensor-parallel ranks of one stage differ: they hold equal shards (same shapes), but the
    rank whose vocabulary shard has padding rows masks them (a copy of its logits) and the rank owning
    the mask id sets its logit (another copy) -- model/transformer.py ``_head``, diffusion/vocab_ops.
    Ranks with the same answers run the same ops, so one trace stands for all of them."""
    start, end = tp_rank * shard, (tp_rank + 1) * shard
    return vocab < end, start <= mask_id < end


def _largest_module(model: Any) -> int:
    """Elements of the largest module's own parameters (what ZeRO-3 gathers for one submodule call)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def _global_params(model: Any, tp: int) -> int:
    """Unsharded elements of this stage's parameters (TP-sharded ones x tp, replicated ones once)."""
    from megabd3.model.export import full_shape

    return sum(math.prod(full_shape(p, tp)) for p in model.parameters())


# ------------------------------------------------------------------------------------------ main


def plan(cfg: Any, world_size: int, *, target_cuda: bool = True, trace: bool = True, seed: int = 0) -> DryRunReport:
    """The dry-run report of ``cfg`` on ``world_size`` ranks (module docstring). Raises ConfigError when
    the config itself is invalid for that world size, UserError inside a real distributed job."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megabd3.config.deepspeed import derive_deepspeed_config
    from megabd3.config.derived import batch_plan, data_parallel_size, padded_vocab_size, resolve_precision
    from megabd3.config.errors import raise_if
    from megabd3.config.validate import validate
    from megabd3.diffusion.objectives import build_objective
    from megabd3.errors import UserError
    from megabd3.parallel.fake import rank_of
    from megabd3.training import memory_plan as mp

    if dist.is_initialized():  # checked once here: per role it would only repeat as a failure
        raise UserError("the dry run needs a process without torch.distributed; run --dry-run with plain "
                        "python, not under torchrun/srun/deepspeed")
    raise_if(validate(cfg, world_size, cuda=target_cuda), "config")
    par = cfg.parallel
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    dp = data_parallel_size(cfg, world_size)
    bp = batch_plan(cfg, dp)
    ds = derive_deepspeed_config(cfg, dp, cuda=target_cuda)
    zero, precision = mp.ZeroSettings.from_ds_config(ds), mp.Precision.from_ds_config(ds)
    prec_name = resolve_precision(cfg, target_cuda)
    rep = DryRunReport()
    tok, vocab, mask_id = _tokenizer(cfg, rep.problems)
    rep.vocab = vocab
    L, mb = cfg.data.seq_len, cfg.training.micro_batch_size
    rep.header += [
        f"world {world_size} = tp {tp} x pp {pp} x dp {dp}; ZeRO-{zero.stage}; precision {par.precision} -> "
        f"{prec_name} (planned for {'cuda' if target_cuda else 'cpu'})",
        f"global batch {bp.global_batch_size} = micro {bp.micro_batch_size} x accumulation {bp.gradient_accumulation} "
        f"x dp {dp}; tokens/step {bp.global_batch_size * L:,} (seq_len {L})",
    ]
    rep.header += _data_lines(cfg, tok, bp.global_batch_size, rep.problems)

    objective = build_objective(cfg, mask_id, vocab)
    act_dtype = torch.bfloat16 if precision.bf16 else torch.float32
    ema = cfg.training.ema > 0
    # token ids below the mask id (data never contains it); their values do not change any shape
    x0 = torch.randint(0, max(2, mask_id), (mb, L), generator=torch.Generator().manual_seed(seed))
    shard = padded_vocab_size(cfg, vocab) // tp
    for s in range(pp):
        done: dict[tuple, RoleMemory] = {}
        for t in range(tp):
            rank = rank_of(t, s, tp, dp)
            key = _tp_class(t, shard, vocab, mask_id)
            if key in done:  # same shapes and the same ops as an already planned TP rank of this stage
                src = done[key]
                rep.roles.append(dataclasses.replace(src, rank=rank, tp_rank=t, same_as=src.rank))
                continue
            try:
                role = _fake_role(cfg, objective, vocab, x0, rank, world_size, s, t,
                                  FakeTensorMode(allow_non_fake_inputs=True), zero=zero, precision=precision,
                                  act_dtype=act_dtype, ema=ema, n_micro=bp.gradient_accumulation, trace=trace,
                                  rep=rep, target_cuda=target_cuda)
            except Exception as exc:  # noqa: BLE001 - one role's failure must not hide the plan of the others
                rep.failures.append(f"pp {s} tp {t} (rank {rank}) could not be planned: {type(exc).__name__}: "
                                    f"{_one_line(exc)}")
                role = RoleMemory(rank=rank, pp_rank=s, tp_rank=t, params=None, state=None, activations=None)
            if t == 0:
                rep.total_params += role.global_params
            done[key] = role
            rep.roles.append(role)
    n_vocab_pad = padded_vocab_size(cfg, vocab)
    rep.header.insert(2, f"model: {rep.total_params / 1e6:.1f}M parameters (vocabulary {vocab} padded to {n_vocab_pad}); "
                         f"objective {cfg.diffusion.objective}; model.recompute {cfg.model.recompute}"
                         + ("; incomplete: stages that failed are not counted" if any(
                             r.params is None and r.tp_rank == 0 for r in rep.roles) else ""))
    backend = cfg.model.attention_backend
    flex = backend == "flex" or (backend == "auto" and target_cuda)
    if trace:
        rep.header.insert(3, "trace: one micro-batch of " + _trace_shape(rep.roles, L, mb))
        rep.notes.append(f"activations: one forward+backward of the training objective traced with fake tensors "
                         f"({'bf16' if precision.bf16 else 'fp32'} activations"
                         + (", activation recompute on" if cfg.model.recompute else "") + ")"
                         + (f"; pipeline stage s holds min(pp - s, {bp.gradient_accumulation}) micro-batches (1F1B)"
                            if pp > 1 else ""))
        if flex:
            rep.notes.append(f"attention {backend} -> FlexAttention on {'cuda' if target_cuda else 'the target'}: it "
                             f"cannot run on fake CPU tensors, so the trace uses a stand-in that keeps exactly flex's "
                             f"saved tensors (q, k, v, out, fp32 lse) and its backward buffers; no flex kernel ran")
    if zero.stage == 0:  # no reduce bucket: DeepSpeed's allreduce flattens the gradients itself
        rep.notes.append(f"ZeRO-0: gradients all-reduced through a flat copy of up to {mp.ALLREDUCE_CHUNK:,} "
                         f"elements (the buffers column, dp > 1)")
    else:
        rep.notes.append(f"ZeRO-{zero.stage}: reduce_bucket_size {zero.reduce_bucket_size:,}, contiguous_gradients "
                         f"{zero.contiguous_gradients}, overlap_comm {zero.overlap_comm}"
                         + (f", persistence threshold {zero.param_persistence_threshold:,}" if zero.stage == 3 else ""))
    for n in dict.fromkeys(n for r in rep.roles if r.state is not None for n in r.state.notes):
        rep.notes.append(n)
    rep.notes.append("total = every column at once (an upper bound: buffers and the activation peak do not all "
                     "coexist); not counted: the CUDA context, allocator fragmentation, NCCL buffers")
    return rep


def _trace_shape(roles: list[RoleMemory], seq_len: int, mb: int) -> str:
    """What the traced model saw: bd3lm feeds x_t and x_0 side by side, 2 x seq_len tokens."""
    seen = {r.trace_tokens for r in roles if r.trace_tokens}
    if len(seen) != 1:
        return f"micro-batch {mb} x seq_len {seq_len} (no trace recorded its length)"
    n = seen.pop()
    how = (f"{n} = 2 x {seq_len} tokens (x_t and x_0 side by side)" if n == 2 * seq_len
           else f"{n} tokens" if n != seq_len else f"{n} tokens (seq_len)")
    return f"{mb} sequences x {how} through the model"


def _fake_role(cfg: Any, objective: Any, vocab: int, x0: Any, rank: int, world_size: int, s: int, t: int,
               mode: Any, **kw: Any) -> RoleMemory:
    """Become ``rank`` of the fake world and plan it (fake_world always tears down, also on errors)."""
    from megabd3.parallel.fake import fake_world

    par = cfg.parallel
    with fake_world(rank, world_size, par.tensor_parallel, par.pipeline_parallel, seed=cfg.training.seed) as fr:
        if (fr.pp_rank, fr.tp_rank) != (s, t):
            raise RuntimeError(f"rank {rank} is pp {fr.pp_rank} tp {fr.tp_rank} in megatron's groups, "
                               f"expected pp {s} tp {t}")
        return _plan_role(cfg, objective, vocab, x0, fr, mode, tp=par.tensor_parallel, **kw)


def _plan_role(cfg: Any, objective: Any, vocab: int, x0: Any, fr: Any, mode: Any, *, zero: Any, precision: Any,
               act_dtype: Any, ema: bool, n_micro: int, trace: bool, rep: DryRunReport, tp: int,
               target_cuda: bool) -> RoleMemory:
    """Build this rank's model in ``mode``, account its states, trace its activations."""
    import torch

    from megabd3.model.layers import cond_rows
    from megabd3.model.transformer import build_model
    from megabd3.training import memory_plan as mp
    from megabd3.training import memtrace

    with mode:
        model = build_model(cfg, vocab, pre_process=fr.first_stage, post_process=fr.last_stage)
        if act_dtype != torch.float32:  # DeepSpeed casts the module to bf16; Module.to() cannot swap fake
            for p in model.parameters():  # parameters, assigning .data keeps them (and their attributes)
                p.data = p.data.to(act_dtype)
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    state = mp.zero_state_bytes(numels, dp=fr.dp_size, zero=zero, precision=precision, ema=ema,
                                largest_gather=_largest_module(model))
    in_flight = memtrace.pipeline_in_flight(fr.pp_rank, cfg.parallel.pipeline_parallel, n_micro)
    activations, tokens = None, None
    if trace:
        try:
            with memtrace.flex_standin(target_cuda):
                tr = memtrace.trace_micro_batch(
                    model, objective, x0, torch.Generator().manual_seed(cfg.training.seed), mode,
                    first=fr.first_stage, last=fr.last_stage, hidden_size=cfg.model.hidden_size, act_dtype=act_dtype,
                    cond_rows=cond_rows(cfg.model.cond_dim, cfg.model.hidden_size) if cfg.model.adaln else 0)
            activations, tokens = memtrace.activation_bytes(tr, in_flight), tr.tokens
        except Exception as exc:  # noqa: BLE001 - the table still prints; the failure is listed (exit 2)
            rep.failures.append(f"activation trace of pp {fr.pp_rank} tp {fr.tp_rank} (rank {fr.rank}) failed: "
                                f"{type(exc).__name__}: {_one_line(exc)}")
    return RoleMemory(rank=fr.rank, pp_rank=fr.pp_rank, tp_rank=fr.tp_rank, params=sum(numels), state=state,
                      activations=activations, in_flight=in_flight, global_params=_global_params(model, tp),
                      trace_tokens=tokens)


def dry_run(cfg: Any, world_size: int, *, target_cuda: bool = True) -> DryRunReport:
    """What ``launchers/pretrain.py --dry-run`` prints (``.render()``); its exit status is ``.exit_code``."""
    return plan(cfg, world_size, target_cuda=target_cuda)
