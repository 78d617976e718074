"""build_loader on 2 gloo ranks (torch.multiprocessing spawn, OMP_NUM_THREADS=1).

* Shared cache directory: rank 0 builds the sample index (slowed down on purpose, so a rank that did not
  wait at the barrier would find no cache and build its own) and rank 1 loads it: exactly one build, and
  rank 1's arrays are the memory-mapped cache files.
* Per-rank cache directories (not shared): rank 1 finds nothing after the barrier and builds locally.
* Either way, the two ranks' micro-batches concatenated equal the DP=1 batch of twice the size, for the
  shuffled infinite train stream resumed from ``consumed_samples`` and for the padded one-pass eval.
"""
import json
import os
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.dist]

WORLD = 2
MBS = 2  # per rank; the DP=1 reference uses MBS * WORLD
STEPS = 3
CONSUMED = 8  # a resumed run: a multiple of MBS * WORLD
SCENARIOS = ("shared", "per_rank")  # one cache directory for both ranks, or one each


def _cfg(prefix: str, cache_dir: str):
    from megabd3.config.schema import Config

    cfg = Config()
    cfg.data.train_prefix = f"{prefix}_train"
    cfg.data.valid_prefix = f"{prefix}_valid"
    cfg.data.seq_len = 32
    cfg.data.cache_dir = cache_dir
    cfg.training.seed = 1234
    return cfg


def _batches(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append({k: v.clone() for k, v in b.items()})
    return out


def _worker(rank: int, port: int, prefix: str, cache_root: str, out_dir: str) -> None:
    import torch.distributed as dist

    from megabd3.data import build_loader
    from megabd3.data.samples import SampleDataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    builds = []
    original = SampleDataset._build

    def slow_build(self):
        builds.append(self.prefix)
        if rank == 0:
            time.sleep(1.0)  # rank 1 reaches the cache first and must wait for the barrier
        return original(self)

    SampleDataset._build = slow_build
    for scenario in SCENARIOS:  # one spawn for both: starting two ranks costs more than the scenarios
        builds.clear()
        cache_dir = os.path.join(cache_root, scenario) if scenario == "shared" else os.path.join(cache_root, scenario, f"rank{rank}")
        cfg = _cfg(prefix, cache_dir)
        train = build_loader(cfg, "train", rank, WORLD, consumed_samples=CONSUMED, batch_size=MBS)
        result = {"train": _batches(train, STEPS), "valid": _batches(build_loader(cfg, "valid", rank, WORLD, batch_size=MBS))}
        torch.save(result, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
        with open(os.path.join(out_dir, f"{scenario}_rank{rank}.json"), "w") as f:
            json.dump({"builds": list(builds), "train_order_mmapped": isinstance(train.dataset.ds.order, np.memmap)}, f)
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from megabd3.data import assets
    from megabd3.data.preprocess import Job, run

    assets.fetch_tokenizers()
    d = tmp_path_factory.mktemp("dist_data")
    rng = np.random.default_rng(21)
    words = "the quick brown fox jumps over a lazy dog while café numbers 12345 follow".split()
    src = d / "a.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(1, 60))))}) + "\n"
                           for _ in range(240)), encoding="utf-8")
    run(Job(inputs=[str(src)], tokenizer="gpt2", workers=1), str(d / "d"), ["train:0.9", "valid:0.1"], progress=False, log=lambda m: None)
    return str(d / "d")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(dataset, tmp_path_factory):
    """Run both scenarios on 2 spawned gloo ranks once; the tests read what each rank saved."""
    base = tmp_path_factory.mktemp("dist_run")
    out = base / "out"
    out.mkdir()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    try:
        torch.multiprocessing.spawn(_worker, args=(_free_port(), dataset, str(base / "cache"), str(out)), nprocs=WORLD, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return base


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_concatenated_equal_dp1(dataset, ranks, tmp_path, scenario):
    out = ranks / "out"
    cache = ranks / "cache" / scenario
    info = [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in range(WORLD)]
    got = [torch.load(out / f"{scenario}_rank{r}.pt") for r in range(WORLD)]
    if scenario == "shared":
        # train and valid index each built once, by rank 0; rank 1 loaded rank 0's cache files
        assert len(info[0]["builds"]) == 2 and info[1]["builds"] == [], info
        assert info[1]["train_order_mmapped"]
        names = sorted(p.name for p in cache.iterdir())
        assert len(names) == 6 and sum(n.endswith("-description.json") for n in names) == 2, names  # no temp files left
    else:
        assert len(info[0]["builds"]) == 2 and len(info[1]["builds"]) == 2  # no shared cache: each rank builds
        for r in range(WORLD):
            assert len(list((cache / f"rank{r}").glob("*-description.json"))) == 2

    # the DP=1 reference, in this process without torch.distributed, from a fresh cache
    from megabd3.data import build_loader

    cfg = _cfg(dataset, str(tmp_path / "cache_dp1"))
    train_loader = build_loader(cfg, "train", 0, 1, consumed_samples=CONSUMED, batch_size=MBS * WORLD)
    valid_loader = build_loader(cfg, "valid", 0, 1, batch_size=MBS * WORLD)
    ref_train, ref_valid = _batches(train_loader, STEPS), _batches(valid_loader)
    assert len(got[0]["train"]) == len(got[1]["train"]) == STEPS
    assert len(got[0]["valid"]) == len(got[1]["valid"]) == len(ref_valid) >= 2
    for split, ref in (("train", ref_train), ("valid", ref_valid)):
        for k, whole in enumerate(ref):
            for key in ("input_ids", "attention_mask", "sample_index"):
                cat = torch.cat([got[0][split][k][key], got[1][split][k][key]])
                assert torch.equal(cat, whole[key]), (split, k, key)
    # the train stream resumes at position CONSUMED of a shuffled sample order
    idx = torch.cat([b["sample_index"] for b in ref_train]).tolist()
    assert idx == list(range(CONSUMED, CONSUMED + STEPS * MBS * WORLD))
    order = np.asarray(train_loader.dataset.ds.order)
    assert not np.array_equal(order, np.arange(len(order)))
    # the eval pass covers every valid sample exactly once, padding (-1) only at the end
    seen = torch.cat([b["sample_index"] for b in ref_valid])
    real = seen[seen >= 0]
    assert real.tolist() == list(range(len(valid_loader.dataset))) and (seen[len(real):] == -1).all()
