"""A data-parallel sampler that resumes from one integer, and ``build_loader`` for the training loop.

The global sample stream is fixed by the data and the seed alone: stream position ``g`` is sample
``perm_e[g mod N]`` of epoch ``e = g // N`` (``perm_0`` is the identity — the dataset is already
shuffled — and later epochs are reshuffled from ``(seed, e)`` when ``shuffle``). A micro-step takes the
next ``micro_batch_size * dp_size`` stream positions and rank ``r`` reads its slice
``[r * mbs, (r + 1) * mbs)``. Hence:

* resuming from ``consumed_samples`` continues exactly the uninterrupted stream;
* the samples of global batch ``k`` (positions ``[k*G, (k+1)*G)``, ``G`` the global batch size) do not
  depend on the DP size, so a run may resume with a different ``dp_size``/``micro_batch_size`` as long as
  ``G`` stays the same (``consumed_samples`` must be a multiple of the new ``mbs * dp_size``).

Evaluation (``infinite=False``) runs once over ``[consumed, N)``; the last micro-step is padded with
index ``-1`` so every rank runs the same number of steps, and padded rows come back with
``attention_mask`` all False and ``sample_index`` -1 (they add no tokens to any sum).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from megabd3.errors import UserError


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """Yields lists of ``micro_batch_size`` sample indices for ``dp_rank`` (a batch sampler)."""

    def __init__(self, num_samples: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                 consumed_samples: int = 0, *, infinite: bool = True, shuffle: bool = False, seed: int = 0) -> None:
        if num_samples <= 0:
            raise UserError(f"the dataset has {num_samples} samples; nothing to iterate")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if micro_batch_size <= 0:
            raise UserError(f"micro batch size must be positive, found {micro_batch_size}")
        step = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % step:
            raise UserError(f"consumed_samples {consumed_samples} is not a multiple of micro_batch_size x dp_size = {step}; "
                            "resume with the same global batch size (training.global_batch_size)")
        self.num_samples = num_samples
        self.dp_rank, self.dp_size, self.mbs = dp_rank, dp_size, micro_batch_size
        self.consumed = consumed_samples
        self.infinite, self.shuffle, self.seed = infinite, shuffle, seed
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def sample_at(self, g: int) -> int:
        """Dataset index at global stream position ``g``."""
        epoch, pos = divmod(g, self.num_samples)
        if epoch == 0 or not self.shuffle:
            return pos
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __iter__(self) -> Iterator[List[int]]:
        g = self.consumed
        step = self.mbs * self.dp_size
        end = None if self.infinite else self.num_samples
        while end is None or g < end:
            lo = g + self.dp_rank * self.mbs
            batch = [self.sample_at(p) if (end is None or p < end) else -1 for p in range(lo, lo + self.mbs)]
            g += step  # stateless: the training loop counts consumed samples (DataLoader prefetch runs ahead)
            yield batch

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite sampler has no length")
        step = self.mbs * self.dp_size
        return max(0, -(-(self.num_samples - self.consumed) // step))


class _Indexed(torch.utils.data.Dataset):
    """Adds ``sample_index`` and turns index -1 into an all-masked padding row."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if i < 0:
            row = self.ds[0]
            return {"input_ids": torch.full_like(row["input_ids"], self.ds.pad_id),
                    "attention_mask": torch.zeros_like(row["attention_mask"]), "sample_index": torch.tensor(-1)}
        row = self.ds[i]
        row["sample_index"] = torch.tensor(i)
        return row


def build_loader(cfg, split: str, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 batch_size: Optional[int] = None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``cfg.data.<split>_prefix`` yielding ``{"input_ids", "attention_mask", "sample_index"}``.

    ``train`` is infinite (shuffled by ``cfg.training.seed`` when ``cfg.data.shuffle``); ``valid``/``test``
    make one padded pass. ``batch_size`` defaults to ``training.micro_batch_size`` (train) or
    ``eval.batch_size``. Checks the manifest against ``cfg.data.tokenizer`` first.
    """
    from megabd3.data.manifest import check_manifest
    from megabd3.data.samples import SampleDataset
    from megabd3.data.tokenizers import get_tokenizer

    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, found {split!r}")
    prefix = getattr(cfg.data, f"{split}_prefix")
    if not prefix:
        raise UserError(f"data.{split}_prefix is empty; set it to a dataset prefix made by tools/preprocess_data.py")
    tok = get_tokenizer(cfg.data.tokenizer)
    check_manifest(prefix, tok, check_max_id_samples=cfg.data.check_max_id_samples, seed=cfg.training.seed)
    train = split == "train"
    ds = SampleDataset(prefix, cfg.data.seq_len, cfg.data.mode, tok, seed=cfg.training.seed,
                       shuffle=bool(cfg.data.shuffle and train), chunk_special_tokens=cfg.data.chunk_special_tokens,
                       cache_dir=cfg.data.cache_dir or None)
    mbs = batch_size or (cfg.training.micro_batch_size if train else cfg.eval.batch_size)
    sampler = ResumableDistributedSampler(len(ds), dp_rank, dp_size, mbs, consumed_samples, infinite=train,
                                          shuffle=bool(cfg.data.shuffle and train), seed=cfg.training.seed)
    return torch.utils.data.DataLoader(_Indexed(ds), batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       persistent_workers=cfg.data.num_workers > 0)
