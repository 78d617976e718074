"""The BD3 mask rule and dense masks against a brute-force rule written from the spec's prose."""
from __future__ import annotations

import torch

from megabd3.diffusion.masks import AttentionSpec, attention_mask, dense_mask


def brute(L, B):
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_noisy, k_noisy = q < L, k < L
            qb, kb = (q % L) // B, (k % L) // B
            if q_noisy and k_noisy:
                m[q, k] = qb == kb  # noisy sees only its own block's noisy tokens
            elif q_noisy and not k_noisy:
                m[q, k] = kb < qb  # ... and clean tokens of strictly earlier blocks
            elif not q_noisy and not k_noisy:
                m[q, k] = kb <= qb  # clean: block-causal over clean
            else:
                m[q, k] = False  # clean never sees noisy
    return m


def test_dense_mask_equals_brute_force():
    for L, B in [(4, 1), (4, 2), (6, 3), (8, 4), (8, 8), (12, 4)]:
        assert torch.equal(dense_mask(L, B), brute(L, B)), (L, B)


def test_invariants_of_noisy_queries():
    L, B = 8, 2
    m = dense_mask(L, B)
    for q in range(L):
        own = q // B
        for k in range(L):  # other blocks' noisy tokens invisible
            if k // B != own:
                assert not m[q, k]
        for k in range(own * B, L):  # own block's (and later) clean copy invisible
            assert not m[q, L + k]


def test_attention_mask_kinds_and_padding():
    L = 5
    assert torch.equal(attention_mask(AttentionSpec("causal", L)), torch.tril(torch.ones(L, L, dtype=torch.bool)))
    assert bool(attention_mask(AttentionSpec("full", L)).all())
    pad = torch.tensor([[True, True, True, False, False]])
    full = attention_mask(AttentionSpec("bd3", L, 1, pad))
    assert full.shape == (1, 1, 2 * L, 2 * L)
    for q in range(2 * L):
        for k in range(2 * L):
            real_k = bool(pad[0, k % L])
            base = bool(dense_mask(L, 1)[q, k]) and real_k
            row_empty = not any(bool(dense_mask(L, 1)[q, j]) and bool(pad[0, j % L]) for j in range(2 * L))
            assert bool(full[0, 0, q, k]) == (base or (row_empty and q == k))
