"""Worker for tests/dist/test_hf_roundtrip.py: import an HF directory (written at TP = 1) into a TP = 2
model through training.init_from's loader, gather it back and export it again (rank 0).

Usage: torchrun --nproc-per-node 2 _hf_roundtrip_worker.py <hf_dir> <out_dir>
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from megabd3.hf.export import export_state_dict
from megabd3.hf.importer import load_hf_dir
from megabd3.model.export import gather_full_state_dict
from megabd3.model.transformer import build_model
from megabd3.parallel.init import destroy_distributed, init_distributed
from megabd3.training.run import load_init_weights


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    cfg, sd = load_hf_dir(src)
    cfg.parallel.tensor_parallel = 2
    init_distributed(cfg)
    model = build_model(cfg, sd["embedding.weight"].shape[0])
    load_init_weights(model, src)
    full = gather_full_state_dict(model)
    if dist.get_rank() == 0:
        cfg.parallel.tensor_parallel = 1
        export_state_dict(full, cfg, out, clip=(cfg.diffusion.clip_min, cfg.diffusion.clip_max))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
