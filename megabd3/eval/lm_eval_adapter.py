"""lm-evaluation-harness (``lm_eval`` 0.4) model adapter for megabd3 checkpoints (BD3-LM, MDLM, AR).

Running it
----------
lm-eval 0.4 finds models only in its own registry (``lm_eval.models.MODEL_MAPPING`` and classes
registered by ``@register_model`` in modules already imported); it has no plugin entry-point group.
So the adapter must be imported before lm_eval's CLI parses ``--model``. This module does that and
then hands over to lm_eval's own CLI, with every lm_eval option unchanged::

    megabd3-lm-eval --model megabd3 --model_args checkpoint=runs/demo,likelihood=exact \\
        --tasks my_task --include_path tasks/          # console script installed by setup.py
    python -m megabd3.eval.lm_eval_adapter ...         # the same, without the script

From Python: ``import megabd3.eval.lm_eval_adapter`` and then ``lm_eval.simple_evaluate(model="megabd3",
model_args="checkpoint=runs/demo", ...)``.

model_args
----------
``checkpoint`` (run dir, checkpoints/, step_* dir or a Hugging Face directory, as launchers/evaluate.py),
``device`` (lm_eval's CLI passes cuda:0 by default; without CUDA the adapter says so and uses cpu),
``likelihood`` = auto | exact | stratified | mc (diffusion models; AR is always exact), ``units``
(stratified: antithetic units per stratum), ``mc_samples`` (mc: draws averaged), ``greedy`` (diffusion
``is_greedy`` check, see below), ``seed``, ``batch_size``, ``max_batch_size``, ``use_ema``, ``tokenizer``,
and any config override as a dotted key, e.g. ``sampling.top_p=0.9`` or ``sampling.strategy=threshold``.

``batch_size`` is the number of scoring windows per forward. There is no memory probing:
``batch_size=auto`` (or ``auto:N``) means ``max_batch_size`` when lm_eval passes one, else 8.
``generate_until`` runs one request at a time whatever the batch size (see below). lm_eval's
``disable_tqdm`` hides the scoring progress bar.

What the numbers are
--------------------
Every request is tokenised as ``[BOS] + context + continuation`` (the samplers also start from BOS at
position 0), placed at positions 0.. of a window of at most ``data.seq_len`` = L tokens and scored on
the continuation positions only. Context/continuation tokens follow HFLM's ``_encode_pair`` (see
:meth:`MegaBD3LM._split` for the one difference). Longer inputs are cut into windows
(:func:`score_windows`) by lm-eval's rolling convention: disjoint chunks of L - 1 scored tokens, each
after the single token before it, and a shorter last chunk with as much preceding context as fits.

- **AR**: the exact log-likelihood sum_i log p(x_i | x_<i) by one causal forward per window (SUBS
  output: the mask token takes no mass). ``is_greedy``: every continuation token is the argmax.
- **BD3-LM** (block alignment): the window starts at position 0, so blocks are [0, B), [B, 2B), ...
  and the continuation starts wherever the context ends, usually inside a block. Context tokens are
  clean earlier-block tokens or, in the block that straddles the boundary, clean (never masked, never
  scored) positions of that block; only continuation positions are masked and scored. Per block with
  scored set S the number is the time-integrated NELBO of :mod:`megabd3.eval.exact_nelbo` restricted to
  S: sum_{k=1..|S|} (1/k) E_{M subset S, |M|=k}[sum_{i in M} -log p(x_i | x_{not M}, clean earlier blocks)],
  and the request's value is minus the sum over blocks. It is an **ELBO, a lower bound on log p**, not
  the exact log-likelihood. Trailing padding (to a multiple of B, and across a batch) is invisible.
- **MDLM**: the same with one bidirectional window as the single block (S = all continuation tokens
  of the window): exact needs |S| <= 8.

Scoring and generation condition the end of a sequence differently (BD3). When the sequence ends
inside a block, scoring treats that block's trailing positions as padding: invisible keys, as if the
sequence stopped there. Generation fills the whole last block with MASK tokens, which are visible
to the tokens being scored/denoised and are themselves denoised (then cut off), so a token near the
end may be revealed after, and conditioned on, a position beyond the requested length. Both are
valid conditionals of the same model (training always sees full blocks), but they are different
ones; they coincide when the sequence ends on a block boundary.

Estimators: ``exact`` enumerates the 2^s - 1 non-empty subsets of the s scored positions of every cell
(s <= 8; one forward per subset pattern, all cells at once; zero variance). ``stratified``: the
antithetic k-stratified estimator of exact_nelbo (unbiased; standard error in :attr:`MegaBD3LM.last_se`).
``mc``: t ~ U[eps, 1] per cell, mask each scored position with probability t, 1/t-weighted CE, averaged
over ``mc_samples`` draws (the Monte Carlo estimator of the NELBO at eps = diffusion.sampling_eps).
``auto`` (default) chooses **per request**: exact when every cell of each of its windows has <= 8
scored positions, else stratified (windows of the two kinds are never batched together, so a
request's estimator and value do not depend on the other requests).

``is_greedy`` for diffusion models (``greedy=true``, default): whether greedy confidence decoding
reproduces the continuation: per cell, starting from all scored positions masked, repeatedly reveal
the single most confident masked position with its argmax; True iff every revealed argmax equals the
target (cells run in parallel: a cell sees clean earlier blocks, which equal the target whenever they
decoded correctly). It costs max|S| extra forwards per batch. ``greedy=false`` returns False always.

generate_until
--------------
The prompt is a clean prefix ``[BOS] + prompt`` at positions 0.. and prompt + generation must fit in
L. The prompt has priority: it keeps its last ``max(L - max_gen_toks, L // 2)`` tokens (BOS included;
so a prompt shorter than L // 2 is never cut), and the generated length is capped at L minus the
kept prompt. (lm_eval's default max_gen_toks = 256 exceeds the demo's L = 128; the adapter says so once
per run, with one warning line.) BD3: the prompt's full blocks are stored into the KV cache
(``sampling.kv_cache``), the block that holds the prompt's end starts with its prompt tokens clean and
the rest masked, and every block is denoised in turn. MDLM: [prompt ; masks] windows of at most L
under full attention. AR: one cached causal forward per token. Generation stops at the (capped)
``max_gen_toks``, at EOS, or at a stop string of ``until`` (cut there).

- **Greedy** (``do_sample=false``, lm_eval's default, or ``temperature=0``): deterministic decoding
  that never touches the random generator, so a request's text does not depend on the other requests
  or their order. AR: the argmax token. BD3/MDLM: confidence-ordered greedy unmasking: each forward
  reveals the most confident masked position (largest SUBS probability, lowest position on ties) with
  its argmax -- the same rule as ``is_greedy`` above, and the choice rule of the sampler's threshold
  strategy with tau > 1 (:func:`megabd3.sampling.parallel.reveal_mask`). With
  ``sampling.strategy=threshold`` or ``topk_per_step`` their tau / k apply, to the raw SUBS
  probabilities. (The sampler itself is not used for greedy: its confidence is measured after the
  nucleus, and a nucleus of top_p=0 makes every confidence 1, i.e. left-to-right order; and first
  hitting draws its positions from the shared generator.)
- **Sampling** (``do_sample=true``, temperature > 0, default 1): the sampler's own block update
  (:func:`megabd3.sampling.block.denoise_block`, ``sampling.strategy``/``top_p``/``nucleus``) with the
  adapter's generator, whose stream runs across requests (seed: model_args ``seed``). ``temperature``
  divides the logits before the SUBS softmax, the nucleus and the confidence of the parallel
  strategies (as transformers: temperature first, then top-p). A negative temperature is refused.
  Other generation arguments (``top_p``, ``top_k``, ...) are not supported and are named in a warning
  once per run; set ``sampling.*`` in model_args instead.

SEDD and time-conditioned models are refused (their likelihoods are not the time-agnostic NELBO).
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Any, List, Optional, Sequence, Tuple

import torch

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megabd3.diffusion.masks import AttentionSpec
from megabd3.diffusion.objectives import subs_cross_entropy
from megabd3.errors import UserError
from megabd3.eval.exact_nelbo import MAX_EXACT_BLOCK, set_weight

ESTIMATORS = ("auto", "exact", "stratified", "mc")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")  # generation arguments the adapter reads
log = logging.getLogger(__name__)


# ---- windows ---------------------------------------------------------------------------------------
def score_windows(n_tokens: int, first_scored: int, max_len: int) -> List[Tuple[int, int, int]]:
    """Windows (start, end, n_scored) over token indices [0, n_tokens) that score every index in
    [first_scored, n_tokens) exactly once: the window is [start, end) and its last n_scored tokens are
    scored.

    lm-eval's rolling convention (``lm_eval.utils.get_rolling_token_windows`` with ``context_len=1``,
    as HFLM uses it): disjoint chunks of ``max_len - 1`` scored tokens, each window holding its chunk
    and the single token before it (index 0 is BOS; AR needs a predecessor), so full windows keep one
    context token only. The last, shorter chunk is extended to the left with as much preceding context
    as fits in ``max_len``. With first_scored = 1 the windows are exactly lm-eval's for
    ``max_seq_len = max_len - 1`` (our windows contain their scored tokens, HFLM's inputs predict one
    token past their end, hence the - 1)."""
    if first_scored < 1 or max_len < 2:
        raise ValueError(f"need first_scored >= 1 and max_len >= 2, found {first_scored}, {max_len}")
    out, pos = [], first_scored
    while pos < n_tokens:
        end = min(n_tokens, pos + max_len - 1)
        start = max(0, end - max_len)
        out.append((start, end, end - pos))
        pos = end
    return out


@register_model("megabd3")
class MegaBD3LM(LM):
    """lm_eval ``LM`` over a megabd3 checkpoint; see the module docstring for what each number is."""

    def __init__(self, checkpoint: str, likelihood: str = "auto", device: Optional[str] = None,
                 batch_size: Any = 8, max_batch_size: Optional[int] = None, units: int = 2, mc_samples: int = 1,
                 greedy: bool = True, seed: int = 0, use_ema: Optional[bool] = None, tokenizer: Optional[str] = None,
                 **overrides: Any) -> None:
        super().__init__()
        from megabd3.eval.inference import load_checkpoint_model

        if likelihood not in ESTIMATORS:
            raise UserError(f"lm_eval model_args likelihood={likelihood!r}: expected one of {', '.join(ESTIMATORS)}")
        unknown = [k for k in overrides if "." not in k]
        if unknown:
            raise UserError(f"lm_eval model_args: unknown argument(s) {unknown}; config overrides need a dotted key such as sampling.top_p=0.9")
        sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's CLI passes device=cuda:0 unless told otherwise (as HFLM, fall back on a CPU-only machine)
            if device is not None:
                print(f"megabd3 lm_eval adapter: device={device} but CUDA is not available; using cpu", file=sys.stderr)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_checkpoint_model(str(checkpoint), sets, tokenizer, use_ema=use_ema, device=device)
        self.cfg, self.model, self.tok = loaded.cfg, loaded.model, loaded.tokenizer
        self.objective = self.cfg.diffusion.objective
        if self.objective not in ("ar", "bd3lm", "mdlm"):
            raise UserError(f"the lm_eval adapter scores ar, bd3lm and mdlm checkpoints; {checkpoint} is {self.objective}")
        if self.objective != "ar" and self.cfg.model.time_conditioning:
            raise UserError("the lm_eval adapter needs a time-agnostic denoiser; this checkpoint has model.time_conditioning=true")
        self.L = int(self.cfg.data.seq_len)
        self.block = {"ar": 1, "mdlm": self.L}.get(self.objective, int(self.cfg.diffusion.block_size))
        self.likelihood, self.units, self.mc_samples, self.greedy = likelihood, int(units), int(mc_samples), bool(greedy)
        if self.likelihood == "stratified" and self.units < 2:
            raise UserError(f"lm_eval model_args units={units}: the stratified estimator needs at least 2")
        # no memory probing: "auto" / "auto:N" means lm_eval's max_batch_size when given, else 8
        auto = max(1, int(max_batch_size)) if max_batch_size else 8
        self.batch_size = auto if str(batch_size).startswith("auto") else max(1, int(batch_size))
        self._device = torch.device(device)
        self.vocab = self.tok.model_vocab_size
        self.gen = torch.Generator(device=self._device).manual_seed(int(seed))
        self.last_se: List[float] = []  # standard error of each last loglikelihood value (0: exact)
        self._warned: set = set()  # warnings already given (once per run)
        self._opts: Any = None  # sampler options, built on the first generate_until

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ---- tokenization ------------------------------------------------------------------------------
    def _ids(self, text: str) -> List[int]:
        return self.tok.encode(text) if text else []

    def _split(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Tokens of context and continuation, as HFLM's ``_encode_pair``: trailing spaces of the context
        move to the continuation (so that " word" is tokenised as in running text), and the continuation
        is ``tok(context + continuation)[len(tok(context)):]``. One difference: when tokenising the whole
        merges across the boundary (its prefix is not ``tok(context)``), HFLM still slices, so its
        continuation tokens may not spell the continuation (a token lost or shifted); here context and
        continuation are then tokenised separately, so the scored tokens are exactly the continuation's
        own. Without such a merge (the usual case after the space move) both give the same tokens."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self._ids(context + continuation)
        ctx = self._ids(context)
        if whole[: len(ctx)] != ctx:  # a merge across the boundary: tokenise the parts separately
            return ctx, self._ids(continuation)
        return ctx, whole[len(ctx):]

    # ---- model calls -------------------------------------------------------------------------------
    def _cut(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.vocab].float()

    def _ce(self, x0: torch.Tensor, masked: torch.Tensor, real: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(CE [b, n] float64 of x0 with ``masked`` replaced by MASK, logits [b, n, V]) -- diffusion."""
        b, n = x0.shape
        x_t = torch.where(masked, torch.full_like(x0, self.tok.mask_id), x0)
        if self.objective == "bd3lm":
            pos = torch.arange(n, device=x0.device).repeat(2).expand(b, 2 * n)
            spec = AttentionSpec("bd3", n, self.block, real)
            logits = self.model(torch.cat([x_t, x0], 1), pos, spec, None, (0, n))
        else:
            pos = torch.arange(n, device=x0.device).expand(b, n)
            logits = self.model(x_t, pos, AttentionSpec("full", n, n, real), None, None)
        logits = self._cut(logits)
        return subs_cross_entropy(logits, x0, self.tok.mask_id, self.vocab).double(), logits

    # ---- batches of windows ------------------------------------------------------------------------
    def _pack(self, items: Sequence[Tuple[List[int], int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 [b, n], real [b, n], scored [b, n]) right-padded; n a multiple of the block (bd3)."""
        n = max(len(t) for t, _ in items)
        if self.objective == "bd3lm":
            n = -(-n // self.block) * self.block
        x0 = torch.full((len(items), n), self.tok.eod_id, dtype=torch.long)
        real = torch.zeros(len(items), n, dtype=torch.bool)
        scored = torch.zeros_like(real)
        for r, (toks, k) in enumerate(items):
            x0[r, : len(toks)] = torch.tensor(toks)
            real[r, : len(toks)] = True
            scored[r, len(toks) - k : len(toks)] = True
        d = self._device
        return x0.to(d), real.to(d), scored.to(d)

    @torch.no_grad()
    def _score_batch(self, items: Sequence[Tuple[List[int], int]],
                     est: str) -> Tuple[List[float], List[bool], List[float]]:
        """(log-likelihood or ELBO, is_greedy, variance) per window of ``items`` = (tokens, n_scored), by
        the estimator ``est`` (exact | stratified | mc; "auto" is resolved per request beforehand)."""
        x0, real, scored = self._pack(items)
        if self.objective == "ar":
            return self._ar(x0, real, scored)
        b, n = x0.shape
        cell = self.block if self.objective == "bd3lm" else n
        cnt = scored.view(b, n // cell, cell)
        size = cnt.sum(-1)
        if est == "exact":
            nelbo, var = self._exact(x0, real, cnt, size), torch.zeros_like(size, dtype=torch.float64)
        elif est == "stratified":
            nelbo, var = self._stratified(x0, real, cnt, size)
        else:
            nelbo, var = self._mc(x0, real, cnt)
        greedy = self._greedy(x0, real, cnt, size) if self.greedy else torch.zeros(b, dtype=torch.bool)
        return (-nelbo.sum(-1)).tolist(), greedy.tolist(), var.sum(-1).tolist()

    def _ar(self, x0: torch.Tensor, real: torch.Tensor, scored: torch.Tensor) -> Tuple[List[float], List[bool], List[float]]:
        b, n = x0.shape
        pos = torch.arange(n, device=x0.device).expand(b, n)
        logits = self._cut(self.model(x0, pos, AttentionSpec("causal", n, 1, real), None, (0, n - 1)))
        ce = subs_cross_entropy(logits, x0[:, 1:], self.tok.mask_id, self.vocab).double()
        hit = scored[:, 1:]
        ll = -torch.where(hit, ce, torch.zeros_like(ce)).sum(-1)
        logits = logits.clone()
        logits[..., self.tok.mask_id] = float("-inf")
        ok = (logits.argmax(-1) == x0[:, 1:]) | ~hit
        return ll.tolist(), ok.all(-1).tolist(), [0.0] * b

    def _cells_f(self, x0: torch.Tensor, real: torch.Tensor, masked_cells: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
        """f(M) per cell [b, cells]: summed CE at the masked scored positions."""
        b, nc, c = cnt.shape
        masked = masked_cells & cnt
        ce, _ = self._ce(x0, masked.reshape(b, nc * c), real)
        ce = ce.view(b, nc, c)
        return torch.where(masked, ce, torch.zeros_like(ce)).sum(-1)  # where(): no NaN from padded rows

    def _exact(self, x0: torch.Tensor, real: torch.Tensor, cnt: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """NELBO per cell: every non-empty subset of each cell's scored positions, once (weights of exact_nelbo)."""
        smax = int(size.max())
        if smax > MAX_EXACT_BLOCK:
            raise UserError(f"likelihood=exact enumerates 2^s - 1 subsets and allows s <= {MAX_EXACT_BLOCK} scored "
                            f"tokens per block, found {smax}: use likelihood=stratified")
        dev = x0.device
        rank = cnt.long().cumsum(-1) - 1  # index of a scored position within its cell
        w = torch.zeros(smax + 1, smax + 1, dtype=torch.float64, device=dev)  # [|S|, k]: set weight / multiplicity
        for s in range(1, smax + 1):
            for k in range(1, s + 1):
                w[s, k] = set_weight(k, s) / 2 ** (smax - s)
        nelbo = torch.zeros(cnt.shape[:2], dtype=torch.float64, device=dev)
        for code in range(1, 2 ** smax):
            bit = ((torch.full_like(rank, code) >> rank.clamp(min=0)) & 1).bool() & cnt
            k = bit.sum(-1)
            nelbo += self._cells_f(x0, real, bit, cnt) * w[size, k]  # k = 0 -> weight 0
        return nelbo

    def _stratified(self, x0: torch.Tensor, real: torch.Tensor, cnt: torch.Tensor,
                    size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """exact_nelbo's antithetic k-stratified estimator over the scored positions: (cells, var)."""
        b, nc, c = cnt.shape
        smax, dev = int(size.max()), x0.device
        per_unit = torch.zeros(self.units, b, nc, dtype=torch.float64, device=dev)
        big = torch.tensor(float(c + 1), dtype=torch.float64, device=dev)
        for k in range(1, smax):
            active = size >= k
            for u in range(self.units):
                r = torch.rand(b, nc, c, generator=self.gen, dtype=torch.float64, device=dev)
                rank = torch.where(cnt, r, big).argsort(-1).argsort(-1)
                first = rank < k
                last = (rank >= (size - k)[..., None]) & (rank < size[..., None])
                pair = self._cells_f(x0, real, first, cnt) + self._cells_f(x0, real, last, cnt)
                per_unit[u] += torch.where(active, pair / (2.0 * k), torch.zeros_like(pair))
        full = size == smax  # cells with fewer scored positions had their k = |S| stratum in the loop
        f_all = self._cells_f(x0, real, cnt, cnt)
        det = torch.where(full & (size > 0), f_all / size.clamp(min=1), torch.zeros_like(f_all))
        return per_unit.mean(0) + det, per_unit.var(0, unbiased=True) / self.units

    def _mc(self, x0: torch.Tensor, real: torch.Tensor, cnt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """t ~ U[eps, 1] per cell, Bernoulli(t) masks over the scored positions, 1/t-weighted CE."""
        b, nc, c = cnt.shape
        eps, dev = float(self.cfg.diffusion.sampling_eps), x0.device
        draws = []
        for _ in range(max(1, self.mc_samples)):
            t = eps + (1 - eps) * torch.rand(b, nc, 1, generator=self.gen, dtype=torch.float64, device=dev)
            m = torch.rand(b, nc, c, generator=self.gen, dtype=torch.float64, device=dev) < t
            draws.append(self._cells_f(x0, real, m, cnt) / t[..., 0])
        d = torch.stack(draws)
        var = d.var(0, unbiased=True) / len(draws) if len(draws) > 1 else torch.full_like(d[0], float("nan"))
        return d.mean(0), var

    def _greedy(self, x0: torch.Tensor, real: torch.Tensor, cnt: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Greedy confidence decoding reproduces every scored token (module docstring), per row."""
        b, nc, c = cnt.shape
        masked = cnt.clone()
        ok = torch.ones(b, nc, dtype=torch.bool, device=x0.device)
        for _ in range(int(size.max())):
            if not masked.any():
                break
            _, logits = self._ce(x0, masked.reshape(b, nc * c), real)
            logits[..., self.tok.mask_id] = float("-inf")
            prob, arg = torch.softmax(logits.double(), -1).max(-1)
            conf = torch.where(masked.reshape(b, -1), prob, torch.full_like(prob, -1.0)).view(b, nc, c)
            pick = conf.argmax(-1, keepdim=True)  # most confident masked position per cell
            has = masked.any(-1)
            right = arg.view(b, nc, c).gather(-1, pick)[..., 0] == x0.view(b, nc, c).gather(-1, pick)[..., 0]
            ok &= right | ~has
            masked.scatter_(-1, pick, torch.zeros_like(pick, dtype=torch.bool))
            masked &= cnt
        return ok.all(-1)

    # ---- lm_eval API -------------------------------------------------------------------------------
    def _max_cell(self, n: int, k: int) -> int:
        """Largest number of scored positions in one cell of a window of n tokens whose last k are scored."""
        if self.objective != "bd3lm":
            return k  # MDLM: the window is one cell
        B, lo, best = self.block, n - k, 0
        for s in range(lo // B * B, n, B):  # blocks [s, s + B) that hold scored positions [lo, n)
            best = max(best, min(s + B, n) - max(s, lo))
        return best

    def _estimator(self, wins: Sequence[Tuple[int, int, int]]) -> str:
        """The estimator of one request (its windows (start, end, n_scored)): ``auto`` per request."""
        if self.likelihood != "auto" or self.objective == "ar":
            return self.likelihood
        fits = all(self._max_cell(e - s, k) <= MAX_EXACT_BLOCK for s, e, k in wins)
        return "exact" if fits else "stratified"

    def _score_requests(self, seqs: Sequence[Tuple[List[int], int]],
                        disable_tqdm: bool = False) -> List[Tuple[float, bool, float]]:
        """Per request (tokens incl. BOS, first scored index): summed over its windows."""
        windows: List[Tuple[int, List[int], int, str]] = []
        for i, (toks, first) in enumerate(seqs):
            wins = score_windows(len(toks), first, self.L)
            est = self._estimator(wins)
            for s, e, k in wins:
                windows.append((i, toks[s:e], k, est))
        out = [[0.0, True, 0.0] for _ in seqs]
        from tqdm import tqdm

        # batches never mix estimators; similar lengths per batch
        order = sorted(range(len(windows)), key=lambda j: (windows[j][3], -len(windows[j][1])))
        batches, lo = [], 0
        while lo < len(order):
            est = windows[order[lo]][3]
            idx = [j for j in order[lo: lo + self.batch_size] if windows[j][3] == est]
            batches.append((est, idx))
            lo += len(idx)
        quiet = disable_tqdm or len(order) < 2 * self.batch_size
        for est, idx in tqdm(batches, desc="megabd3 scoring", disable=quiet):
            ll, greedy, var = self._score_batch([(windows[j][1], windows[j][2]) for j in idx], est)
            for j, a, g, v in zip(idx, ll, greedy, var):
                r = out[windows[j][0]]
                r[0] += a
                r[1] = r[1] and bool(g)
                r[2] += v
        return [(a, g, v) for a, g, v in out]

    def loglikelihood(self, requests: List[Any], disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        seqs = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._split(context, continuation)
            if not cont:
                raise UserError(f"lm_eval request with an empty continuation (context {context[-40:]!r}); nothing to score")
            seqs.append(([self.tok.bos_id] + ctx + cont, 1 + len(ctx)))
        res = self._score_requests(seqs, disable_tqdm)
        self.last_se = [math.sqrt(v) if v == v else float("nan") for _, _, v in res]
        out = [(a, g) for a, g, _ in res]
        for req, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, o)
        return out

    def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
        seqs = []
        for req in requests:
            (text,) = req.args
            toks = self._ids(text)
            if not toks:
                raise UserError("lm_eval rolling request with an empty document; nothing to score")
            seqs.append(([self.tok.bos_id] + toks, 1))
        res = self._score_requests(seqs, disable_tqdm)
        self.last_se = [math.sqrt(v) if v == v else float("nan") for _, _, v in res]
        out = [a for a, _, _ in res]
        for req, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, o)
        return out

    def _fit(self, ids: List[int], max_gen: int) -> Tuple[List[int], int]:
        """([BOS] + the kept end of the prompt, generated length) within L, the prompt first (module
        docstring): the prompt keeps its last max(L - max_gen, L // 2) tokens, BOS included."""
        L, bos = self.L, self.tok.bos_id
        room = max(L - max_gen, L // 2)
        kept = ids[max(0, len(ids) - (room - 1)):] if len(ids) + 1 > room else ids
        gen = min(max_gen, L - 1 - len(kept))
        if gen < max_gen:
            self._warn_once("fit", f"megabd3 lm_eval adapter: max_gen_toks={max_gen} with a {len(ids) + 1}-token "
                            f"prompt (BOS included) does not fit data.seq_len={L}; prompts keep their last "
                            f"max(L - max_gen_toks, L // 2) = {room} tokens and generation is capped at L minus the "
                            f"kept prompt (warned once per run)")
        return [bos] + kept, gen

    def _gen_args(self, kw: dict) -> Tuple[List[str], int, Optional[float]]:
        """(stop strings, max_gen_toks, temperature or None for greedy) from lm_eval's gen_kwargs."""
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kw.get("max_gen_toks", 256))
        temp = kw.get("temperature")
        temp = 1.0 if temp is None else float(temp)
        if not temp >= 0.0 or math.isinf(temp):
            raise UserError(f"lm_eval gen_kwargs temperature={kw.get('temperature')!r}: expected a finite number >= 0 "
                            f"(0 or do_sample=false for greedy)")
        ignored = sorted(k for k in kw if k not in GEN_KWARGS)
        if ignored:
            self._warn_once("kwargs:" + ",".join(ignored),
                            f"megabd3 lm_eval adapter: generation argument(s) {', '.join(ignored)} are not supported and "
                            f"ignored; set sampling.* (e.g. sampling.top_p) in model_args instead (warned once per run)")
        sample = bool(kw.get("do_sample", False)) and temp > 0.0
        return until, max_gen, (temp if sample else None)

    def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
        from megabd3.sampling.registry import options_from_config

        if self._opts is None:
            self._opts = options_from_config(self.cfg, self.tok)
        out = []
        for req in requests:
            context, kw = req.args
            until, max_gen, temp = self._gen_args(dict(kw or {}))
            prompt, max_gen = self._fit(self._ids(context), max_gen)
            text = self._generate(prompt, max_gen, until, self._opts, temp) if max_gen > 0 else ""
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    # ---- generation ----------------------------------------------------------------------------------
    def _stop(self, gen: List[int], until: Sequence[str]) -> Tuple[bool, str]:
        """(stop now, text cut at the first stop string / EOS)."""
        eos = self.tok.eod_id in gen
        if eos:
            gen = gen[: gen.index(self.tok.eod_id)]
        text = self.tok.decode(gen)
        cuts = [text.index(s) for s in until if s and s in text]
        if cuts:
            return True, text[: min(cuts)]
        return eos, text

    @staticmethod
    def _greedy_block(blk: torch.Tensor, fn: Any, opts: Any) -> torch.Tensor:
        """Confidence-ordered greedy unmasking of ``blk`` [1, B] (module docstring): per forward, reveal
        the chosen masked positions -- by parallel.reveal_mask on the raw SUBS confidences -- with their
        argmax. Uses no random numbers."""
        from megabd3.sampling.common import subs_probs
        from megabd3.sampling.parallel import PARALLEL_RULES, reveal_mask

        rule = opts.rule if opts.rule in PARALLEL_RULES else "threshold"
        tau = float(opts.threshold) if opts.rule == "threshold" else 2.0  # tau > 1: one position per forward
        while True:
            masked = blk == opts.mask_id
            if not masked.any():
                return blk
            conf, arg = subs_probs(fn(blk), opts.mask_id).max(-1)
            blk = torch.where(reveal_mask(conf, masked, rule, tau, opts.tokens_per_step), arg, blk)

    @torch.no_grad()
    def _generate(self, prompt: List[int], max_gen: int, until: Sequence[str], opts: Any,
                  temperature: Optional[float] = None) -> str:
        """Greedy when ``temperature`` is None, else the sampler's rule at that temperature."""
        from megabd3.sampling.backend import ModelBackend
        from megabd3.sampling.block import denoise_block
        from megabd3.sampling.categorical import gumbel_argmax
        from megabd3.sampling.common import subs_probs

        dev = self._device
        backend = ModelBackend(self.model, self.vocab, opts.window)
        x = torch.tensor([prompt], dtype=torch.long, device=dev)
        P, total = len(prompt), len(prompt) + max_gen
        text = ""

        def denoise(blk: torch.Tensor, fn: Any) -> torch.Tensor:
            if temperature is None:
                return self._greedy_block(blk, fn, opts)
            if temperature != 1.0:
                inner = fn
                fn = lambda b, pos=None, t=None: inner(b, pos, t) / temperature  # noqa: E731
            return denoise_block(blk, fn, opts, self.gen)[0]

        if self.objective == "ar":
            cache = backend.new_cache(1)
            logits = backend.store(cache, x, 0, kind="causal")[:, -1]
            while x.shape[1] < total:
                if temperature is None:
                    tok = subs_probs(logits, opts.mask_id).argmax(-1)[:, None]
                else:
                    tok = gumbel_argmax(opts.truncate(subs_probs(logits / temperature, opts.mask_id)), self.gen)[:, None]
                x = torch.cat([x, tok], 1)
                stop, text = self._stop(x[0, P:].tolist(), until)
                if stop or x.shape[1] >= total:
                    return text
                logits = backend.store(cache, tok, x.shape[1] - 1, kind="causal")[:, -1]
            return text
        if self.objective == "mdlm":
            while x.shape[1] < total:
                size = min(total - x.shape[1], max(self.L - x.shape[1], self.L // 2))
                ctx = x[:, max(0, x.shape[1] - (self.L - size)):]
                blk = torch.full((1, size), opts.mask_id, dtype=torch.long, device=dev)

                def fn(b: torch.Tensor, pos: Optional[torch.Tensor] = None, t: Any = None, ctx: torch.Tensor = ctx) -> torch.Tensor:
                    logits = backend.full(torch.cat([ctx, b], 1))[:, ctx.shape[1]:]
                    return logits if pos is None else logits[torch.arange(b.shape[0], device=dev)[:, None], pos]

                blk = denoise(blk, fn)
                x = torch.cat([x, blk], 1)
                stop, text = self._stop(x[0, P:].tolist(), until)
                if stop:
                    return text
            return text
        B = self.block
        end = min(-(-total // B) * B, max(B, (self.L // B) * B))
        cache = backend.new_cache(1) if opts.kv_cache else None
        done = (P // B) * B  # the prompt's full blocks are clean context
        if cache is not None:
            for s in range(0, done, B):
                backend.store(cache, x[:, s: s + B], s, logits=False)
        while done < end:
            blk = torch.full((1, B), opts.mask_id, dtype=torch.long, device=dev)
            head = x[:, done:]  # prompt tokens of this block stay clean
            blk[:, : head.shape[1]] = head
            if cache is not None:
                fn = lambda b, pos=None, t=None, s=done: backend.denoise_cached(cache, b, s, positions=pos)
            else:
                fn = lambda b, pos=None, t=None, ctx=x[:, :done]: backend.denoise_bd3_uncached(ctx, b, pos)
            blk = denoise(blk, fn)
            x = torch.cat([x[:, :done], blk], 1)
            stop, text = self._stop(x[0, P: total].tolist(), until)
            if stop:
                return text
            if cache is not None and done + B < end:
                backend.store(cache, blk, done, logits=False)
            done += B
        return text


def main(argv: Optional[List[str]] = None) -> None:
    """lm_eval's own CLI with the "megabd3" model registered (all lm_eval options unchanged)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
