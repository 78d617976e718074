"""The block-diffusion attention rule (DESIGN.md invariant 1) and the dense reference masks.

Every attention backend (dense, tiled, flex, KV cache) is tested against :func:`bd3_allowed`, which is
written elementwise so it also serves as a FlexAttention ``mask_mod``.

Convention: True = the query may attend to the key (SDPA/flex convention). megatron-core's unfused
softmax uses the opposite (True = masked out); convert at that boundary only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

ATTENTION_KINDS = ("bd3", "causal", "full")


@dataclass(frozen=True)
class AttentionSpec:
    """What attention pattern a forward pass needs; backends turn it into kernels.

    kind: ``bd3`` (input is [x_t ; x0] of length 2 * seq_len), ``causal`` (AR) or ``full`` (MDLM/SEDD).
    seq_len: L, the length of one half for ``bd3`` and of the whole input otherwise.
    block_size: L' for ``bd3``.
    key_padding: optional [b, L] bool, True = real token. For ``bd3`` it applies to both halves.
    """

    kind: str
    seq_len: int
    block_size: int = 1
    key_padding: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, found {self.kind!r}")
        if self.kind == "bd3" and (self.block_size < 1 or self.seq_len % self.block_size):
            raise ValueError(f"block size {self.block_size} must divide seq_len {self.seq_len}")

    @property
    def input_len(self) -> int:
        return 2 * self.seq_len if self.kind == "bd3" else self.seq_len


def bd3_allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Elementwise BD3 rule on index tensors in [0, 2L) (broadcasting); True = allowed."""
    q_clean = q_idx >= seq_len
    k_clean = kv_idx >= seq_len
    q_block = (q_idx - seq_len * q_clean) // block_size
    k_block = (kv_idx - seq_len * k_clean) // block_size
    block_diagonal = (q_block == k_block) & (q_clean == k_clean)
    offset_block_causal = (q_block > k_block) & ~q_clean & k_clean
    block_causal = (q_block >= k_block) & q_clean & k_clean
    return block_diagonal | offset_block_causal | block_causal


def dense_mask(seq_len: int, block_size: int, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The [2L, 2L] boolean BD3 mask (True = allowed)."""
    idx = torch.arange(2 * seq_len, device=device)
    return bd3_allowed(idx[:, None], idx[None, :], seq_len, block_size)


def attention_mask(spec: AttentionSpec, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Dense boolean mask for any spec: [S, S], or [b, 1, S, S] when key padding is given."""
    s = spec.input_len
    if spec.kind == "bd3":
        mask = dense_mask(spec.seq_len, spec.block_size, device)
    elif spec.kind == "causal":
        mask = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    else:
        mask = torch.ones(s, s, dtype=torch.bool, device=device)
    if spec.key_padding is None:
        return mask
    keys = spec.key_padding.to(device=mask.device, dtype=torch.bool)
    if spec.kind == "bd3":
        keys = torch.cat([keys, keys], dim=1)
    full = mask[None, None] & keys[:, None, None, :]
    # A padded query row that can see nothing would give NaN under SDPA; let it see itself. Its
    # output is never used (padded positions carry no loss).
    eye = torch.eye(s, dtype=torch.bool, device=mask.device)[None, None]
    return full | (eye & ~full.any(-1, keepdim=True))
