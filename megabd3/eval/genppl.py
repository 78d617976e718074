"""Generative perplexity of samples under a judge causal LM (spec section 5.5).

Pipeline: decode each sample with the *training* tokenizer (special tokens kept, so GPT-2 samples
start with ``<|endoftext|>`` as in the reference), re-tokenize the text with the *judge's* tokenizer
(no extra special tokens), and score it with sliding windows of ``context`` tokens advanced by
``stride``: the first window scores all its targets, every later window only the targets not scored
before (its last ``stride`` positions), so each target is scored once with up to ``context - 1``
tokens of left context. Targets equal to the judge's EOS id are excluded.

Reported: the arithmetic mean of per-sample PPLs (the paper's tables, ``log_sample_stats.py``) and the
token-pooled PPL ``exp(sum NLL / sum tokens)`` (the reference's in-run metric), the mean unigram
entropy of the samples and length statistics (median, max; training-token ids). The entropy is taken
over the *judge's* re-tokenized ids, as the reference does (``record_generative_perplexity``: it
counts ``torch.unique`` of the retokenized ``samples_batch``), so it is comparable across models with
different training tokenizers.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch

from megabd3.errors import UserError
from megabd3.sampling.stopping import unigram_entropy


@dataclass
class GenPPLResult:
    """Per-sample and aggregate generative perplexity."""

    judge: str
    num_samples: int
    mean_ppl: float  # arithmetic mean of per-sample PPL
    pooled_ppl: float  # exp(total NLL / total scored tokens)
    mean_entropy: float
    median_length: float
    max_length: int
    scored_tokens: int
    per_sample_ppl: List[float] = field(default_factory=list)
    per_sample_tokens: List[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _looks_like_path(name: str) -> bool:
    """Paths start with ``. / ~`` or have a depth other than one; ``org/model`` is taken as a Hub name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_judge(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Tuple[Any, Any]:
    """(model, tokenizer) of a causal LM from a local directory or a Hub name; UserError when missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.expanduser(name_or_path)
    if not os.path.isdir(path) and (_looks_like_path(name_or_path) or os.path.exists(path)):
        raise UserError(
            f"judge model directory {name_or_path} does not exist: set eval.judge_model to a local causal-LM "
            f"directory or a Hub name (offline: python tools/fetch_assets.py judge)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load judge model {name_or_path!r} ({first[:200]}); give a local directory with config.json, "
            f"weights and tokenizer (offline: python tools/fetch_assets.py judge)"
        ) from None
    return model.to(device).eval(), tok


@torch.no_grad()
def sliding_window_nll(
    model: Any, ids: Sequence[int], context: int, stride: int, exclude_id: Optional[int]
) -> Tuple[float, int]:
    """(sum of NLL in nats, number of scored targets) of ``ids`` under ``model`` with sliding windows."""
    if not 1 <= stride < context:
        # stride == context would leave the first target of every later window without any context
        raise UserError(f"eval.judge_stride={stride} must be in [1, eval.judge_context - 1 = {context - 1}]")
    n = len(ids)
    if n < 2:
        return 0.0, 0
    device = next(model.parameters()).device
    x = torch.tensor(ids, dtype=torch.long, device=device)
    total, count, scored_to = 0.0, 0, 1  # targets [1, scored_to) are done
    begin = 0
    while scored_to < n:
        end = min(begin + context, n)
        window = x[begin:end][None]
        logits = model(input_ids=window).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1)
        targets = window[0, 1:]
        nll = -logp.gather(-1, targets[:, None])[:, 0]  # nll[j] scores window position j + 1
        first = scored_to - begin - 1  # first not-yet-scored target, as an index into nll
        keep = torch.ones_like(targets, dtype=torch.bool)
        keep[:first] = False
        if exclude_id is not None:
            keep &= targets != exclude_id
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
        scored_to = end
        begin += stride
    return total, count


def retokenize(samples: Sequence[Sequence[int]], train_tokenizer: Any, judge_tokenizer: Any) -> List[List[int]]:
    texts = [train_tokenizer.decode(list(s)) for s in samples]
    return [judge_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def gen_ppl(
    samples: Sequence[Sequence[int]],
    train_tokenizer: Any,
    judge_model: Any,
    judge_tokenizer: Any,
    context: int = 1024,
    stride: int = 512,
    judge_name: str = "",
    progress: bool = True,
) -> GenPPLResult:
    """Gen PPL of token-id samples (training tokenizer ids)."""
    if not samples:
        raise UserError("no samples to score: the samples file is empty")
    max_pos = getattr(judge_model.config, "max_position_embeddings", None) or getattr(judge_model.config, "n_positions", None)
    if max_pos is not None and context > max_pos:
        raise UserError(f"eval.judge_context={context} exceeds the judge's {max_pos} positions: lower eval.judge_context")
    judge_ids = retokenize(samples, train_tokenizer, judge_tokenizer)
    eos = judge_tokenizer.eos_token_id
    ppls, counts, nll_total = [], [], 0.0
    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(judge_ids, desc="gen ppl", unit="sample", disable=not progress)
    for ids in bar:
        nll, cnt = sliding_window_nll(judge_model, ids, context, stride, eos)
        ppls.append(math.exp(nll / cnt) if cnt else float("nan"))
        counts.append(cnt)
        nll_total += nll
        bar.set_postfix(tok_s=f"{sum(counts) / max(time.perf_counter() - t0, 1e-9):.0f}")
    valid = [p for p, c in zip(ppls, counts) if c]
    if not valid:
        raise UserError("no sample has a scorable token under the judge (all empty or EOS only)")
    lengths = [len(s) for s in samples]
    return GenPPLResult(
        judge=judge_name,
        num_samples=len(samples),
        mean_ppl=sum(valid) / len(valid),
        pooled_ppl=math.exp(nll_total / sum(counts)),
        mean_entropy=sum(unigram_entropy(ids) for ids in judge_ids) / len(judge_ids),
        median_length=float(statistics.median(lengths)),
        max_length=max(lengths),
        scored_tokens=sum(counts),
        per_sample_ppl=ppls,
        per_sample_tokens=counts,
    )
