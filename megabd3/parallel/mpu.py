"""The model-parallel-unit adapter DeepSpeed expects, over megatron-core ``parallel_state``.

megatron-core dropped ``get_model_parallel_rank/world_size/group``, which DeepSpeed calls; passing
``parallel_state`` fails, and passing no mpu with TP > 1 makes DeepSpeed average gradients of
*different* tensor-parallel shards (reference/cpu_distributed.md section E). "Model parallel" here is
the TP x PP group, which also keeps DeepSpeed checkpoint file names unique per stage.
"""
from __future__ import annotations

from typing import List

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Static adapter: pass the class (or an instance) as ``deepspeed.initialize(mpu=...)``."""

    # model parallel = tensor x pipeline
    @staticmethod
    def get_model_parallel_group():  # noqa: ANN205
        return ps.get_model_parallel_group()

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=ps.get_model_parallel_group())

    # tensor parallel
    @staticmethod
    def get_tensor_model_parallel_group():  # noqa: ANN205
        return ps.get_tensor_model_parallel_group()

    @staticmethod
    def get_tensor_model_parallel_rank() -> int:
        return ps.get_tensor_model_parallel_rank()

    @staticmethod
    def get_tensor_model_parallel_world_size() -> int:
        return ps.get_tensor_model_parallel_world_size()

    # pipeline parallel
    @staticmethod
    def get_pipeline_model_parallel_group():  # noqa: ANN205
        return ps.get_pipeline_model_parallel_group()

    @staticmethod
    def get_pipeline_model_parallel_rank() -> int:
        return ps.get_pipeline_model_parallel_rank()

    @staticmethod
    def get_pipeline_model_parallel_world_size() -> int:
        return ps.get_pipeline_model_parallel_world_size()

    # data parallel
    @staticmethod
    def get_data_parallel_group():  # noqa: ANN205
        return ps.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_rank() -> int:
        return ps.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return ps.get_data_parallel_world_size()

    @staticmethod
    def get_data_parallel_group_ranks() -> List[int]:
        return list(dist.get_process_group_ranks(ps.get_data_parallel_group()))
