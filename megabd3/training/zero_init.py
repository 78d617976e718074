"""Partitioned model construction for ZeRO-3 (`deepspeed.zero.Init`).

Without it every rank builds the whole model before DeepSpeed partitions it. Under `zero.Init` each
submodule's parameters are partitioned as soon as the submodule is built, so a rank never holds more
than one submodule's full weights. The weights stay identical to an unpartitioned build: the model's
init (`megabd3.model.export.init_weights`) draws every full tensor on the CPU from a generator seeded by
(seed, global name) -- bypassing the tensor constructors that zero.Init redirects -- and writes only
this rank's partition (`export.write_local`), so no communication is needed either.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager


def partitioned_init(cfg: Any, ds_config: dict, mpu: Any = None) -> ContextManager[Any]:
    """`deepspeed.zero.Init` for ZeRO-3 (partitioned over the data-parallel group, as the engine will),
    a no-op context for ZeRO 0-2. Works on CPU/gloo and CUDA/NCCL alike."""
    if cfg.parallel.zero_stage != 3:
        return nullcontext()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # zero.Init reads the world size (for its batch check and the partition group) from deepspeed.comm;
    # wrap the already-initialised torch process group exactly as deepspeed.initialize would later
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu)
