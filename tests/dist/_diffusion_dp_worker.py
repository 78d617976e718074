"""Worker for tests/dist/test_diffusion_dp.py: clip search and evaluate_nelbo over DP=2.

Usage: torchrun --nproc-per-node 2 _diffusion_dp_worker.py <out.pt>

Rank r holds ``local_batches(r)``: its rows of every global batch of ``global_batches()`` (uneven: 3
rows on rank 0, 2 on rank 1, one padded sequence) and draws t / masks from
``Generator().manual_seed(SEED + r)``. Both ranks' results go to rank 0's file.
"""
from __future__ import annotations

import sys
from typing import List

import torch
import torch.distributed as dist

V, MASK, L, BLOCK, NB = 7, 6, 8, 4, 3
SPLIT = 3  # rows [0, 3) of each global batch on rank 0, [3, 5) on rank 1
EVAL_SEED, CLIP_SEED = 100, 200


def cfg(objective: str = "bd3lm"):  # noqa: ANN201
    from megabd3.config.schema import Config

    c = Config()
    c.diffusion.objective, c.diffusion.block_size, c.data.seq_len = objective, BLOCK, L
    return c


def model():  # noqa: ANN201
    from megabd3.diffusion.reference_model import init_reference_model

    return init_reference_model(V, seed=0, hidden=16, layers=1)


def global_batches() -> List[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(NB):
        mask = torch.ones(5, L, dtype=torch.long)
        mask[4, 6:] = 0  # a padded sequence on rank 1
        out.append({"input_ids": torch.randint(0, MASK, (5, L), generator=g), "attention_mask": mask})
    return out


def local_batches(rank: int) -> List[dict]:
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    return [{k: v[rows] for k, v in b.items()} for b in global_batches()]


CANDIDATES = [(0.001, 1.0), (0.25, 0.75), (0.5, 1.0), (0.001, 0.5)]
CLIP = (0.25, 0.75)  # training interval of the var_nelbo_train check


def padded_batches(rank: int) -> List[dict]:
    """local_batches plus a last loader step: 3 real rows on rank 0, only padding rows on rank 1."""
    if rank == 0:
        ids = torch.randint(0, MASK, (SPLIT, L), generator=torch.Generator().manual_seed(1))
        extra = {"input_ids": ids, "attention_mask": torch.ones(SPLIT, L, dtype=torch.long)}
    else:
        extra = {"input_ids": torch.zeros(2, L, dtype=torch.long), "attention_mask": torch.zeros(2, L, dtype=torch.long)}
    return local_batches(rank) + [extra]


def clipped_cfg():  # noqa: ANN201
    c = cfg()
    c.diffusion.clip_min, c.diffusion.clip_max = CLIP
    return c


def main() -> None:
    from megabd3.diffusion.clip_search import search_clip_interval
    from megabd3.diffusion.objectives import build_objective
    from megabd3.eval.nelbo import evaluate_nelbo
    from megabd3.parallel.init import destroy_distributed, init_distributed

    out_path = sys.argv[1]
    layout = init_distributed(cfg())
    assert layout.dp == 2
    rank, m = layout.dp_rank, model()
    res = {
        "nelbo": evaluate_nelbo(cfg(), m, local_batches(rank), mask_id=MASK, vocab_size=V,
                                generator=torch.Generator().manual_seed(EVAL_SEED + rank)),
        "nelbo_ar": evaluate_nelbo(cfg("ar"), m, local_batches(rank), mask_id=MASK, vocab_size=V),
        # a rank whose last batch is all padding still joins every collective (no deadlock, no strata)
        "nelbo_pad": evaluate_nelbo(clipped_cfg(), m, padded_batches(rank), mask_id=MASK, vocab_size=V,
                                    generator=torch.Generator().manual_seed(EVAL_SEED + rank),
                                    train_objective=build_objective(clipped_cfg(), MASK, V)),
    }
    obj = build_objective(cfg(), MASK, V)
    clip = search_clip_interval(obj, m, local_batches(rank), torch.Generator().manual_seed(CLIP_SEED + rank),
                                candidates=CANDIDATES, num_batches=NB)
    res["clip"] = {"interval": clip.interval, "table": clip.table, "batches": clip.batches,
                   "train_interval": obj.train_interval}
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, res)
    if dist.get_rank() == 0:
        torch.save(objs, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main()
