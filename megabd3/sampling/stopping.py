"""Stop rules of variable-length generation and the low-entropy rejection of fixed-length runs.

Reference semantics (spec section 5.4): rules are checked only once a sample is longer than 256
tokens. The unigram entropy (nats) of the last 256 token ids below a threshold (4) means the sample
degenerated: in variable-length mode generation stops and the last 256 tokens are dropped; in
fixed-length mode the sample is rejected and regenerated. In variable-length mode a document end also
stops: the reference stops at the *second* EOS id because for GPT-2 the BOS at position 0 is the same
id; we state it as "the first end-of-document id after position 0", which is the same rule for GPT-2
and stays right for tokenizers whose BOS differs from their EOD. The sample is cut right after it.

When both fire at the same check, the entropy cut wins: the reference's ``_check_stop_conds`` sets the
EOS truncation first and then overwrites it with ``len - 256`` if the entropy is low.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

ENTROPY_WINDOW = 256


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the empirical unigram distribution of ``ids`` (0 for an empty list)."""
    n = len(ids)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in Counter(int(i) for i in ids).values())


@dataclass
class StopDecision:
    """What the stop check concluded for one sample."""

    stop: bool = False
    reason: str = ""  # "", "eos", "entropy"
    keep: Optional[int] = None  # number of tokens to keep (None = all)
    reject: bool = False  # fixed-length mode: regenerate this sample


def decide(
    length: int,
    tail: Sequence[int],
    eod_pos: Optional[int],
    var_length: bool,
    entropy_threshold: float,
    window: int = ENTROPY_WINDOW,
) -> StopDecision:
    """The rules given the sample length, its last ``window`` ids and its first EOD position >= 1."""
    if length <= window:
        return StopDecision()
    low_entropy = unigram_entropy(tail[-window:]) < entropy_threshold
    if not var_length:
        return StopDecision(stop=low_entropy, reason="entropy" if low_entropy else "", reject=low_entropy)
    # reference order: the EOS cut is decided first, then overwritten by the entropy cut
    decision = StopDecision()
    if eod_pos is not None:
        decision = StopDecision(stop=True, reason="eos", keep=eod_pos + 1)
    if low_entropy:
        decision = StopDecision(stop=True, reason="entropy", keep=length - window)
    return decision


def first_eod(ids: Sequence[int], eod_id: int, start: int = 1) -> Optional[int]:
    """Position of the first ``eod_id`` at index >= ``start`` (None if absent)."""
    for pos in range(max(start, 1), len(ids)):
        if int(ids[pos]) == eod_id:
            return pos
    return None


def check_stop(
    ids: Sequence[int],
    eod_id: int,
    var_length: bool,
    entropy_threshold: float,
    window: int = ENTROPY_WINDOW,
) -> StopDecision:
    """Apply the reference rules to a (partial) sample ``ids`` (BOS at position 0)."""
    return decide(len(ids), ids[-window:], first_eod(ids, eod_id), var_length, entropy_threshold, window)
