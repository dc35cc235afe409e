"""One entry point that brings up torch.distributed and Megatron-core's parallel state.

NCCL + CUDA when a GPU is present; gloo + CPU (with ``cpu_compat`` active) otherwise.
Works under torchrun (reads RANK/WORLD_SIZE/MASTER_ADDR/...) and as a plain single process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsmoe_megatron import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    expert_tensor: int | None = None  # None: same as `tensor` (Megatron-core's default)
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False

    def config_fields(self) -> dict:
        """The same layout as TransformerConfig fields."""
        return dict(
            tensor_model_parallel_size=self.tensor,
            pipeline_model_parallel_size=self.pipeline,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline,
            expert_model_parallel_size=self.expert,
            expert_tensor_parallel_size=self.expert_tensor,
            sequence_parallel=self.sequence_parallel,
        )

    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()

    def check(self, world_size: int) -> None:
        """Raise a clear error when the layout does not divide the world."""
        mp = self.model_parallel_size()
        if world_size % mp:
            raise ValueError(
                f"model_parallel: tensor_model_parallel_size ({self.tensor}) x "
                f"pipeline_model_parallel_size ({self.pipeline}) = {mp} does not divide the "
                f"world size {world_size}; launch a multiple of {mp} processes or change the sizes"
            )
        etp = self.expert_tensor or self.tensor
        expert_mp = etp * self.expert * self.pipeline
        if world_size % expert_mp:
            raise ValueError(
                f"model_parallel: expert_model_parallel_size ({self.expert}) x expert tensor "
                f"parallel size ({etp}) x pipeline size ({self.pipeline}) = {expert_mp} does not "
                f"divide the world size {world_size}; choose an expert_model_parallel_size that "
                f"divides {world_size // (etp * self.pipeline)}"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError(
                "model_parallel: sequence_parallel needs tensor_model_parallel_size > 1; "
                "set sequence_parallel: false or raise the tensor size"
            )


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    backend: str
    rank: int
    world_size: int
    layout: ParallelLayout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_gpu() -> bool:
    return torch.cuda.is_available()


def initialize(layout: ParallelLayout = ParallelLayout(), seed: int = 1234) -> Runtime:
    """Initialise torch.distributed (if needed), Megatron parallel state and the RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    gpu = use_gpu()
    if not gpu:
        cpu_compat.activate()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        backend = "nccl" if gpu else "gloo"
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A lone process needs no rendezvous: an in-memory store avoids picking a port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            if "MASTER_PORT" not in os.environ:
                raise RuntimeError("MASTER_PORT is not set; launch several processes with torchrun")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    world_size = dist.get_world_size()
    layout.check(world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
    )
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    return Runtime(device, dist.get_backend(), dist.get_rank(), world_size, layout)


def shutdown() -> None:
    """Tear down parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
