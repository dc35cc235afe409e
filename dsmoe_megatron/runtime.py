"""One entry point that brings up torch.distributed and Megatron-core's parallel state.

NCCL + CUDA when a GPU is present; gloo + CPU (with ``cpu_compat`` active) otherwise.
Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/...), under srun or mpirun without
torchrun (SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID, OMPI_COMM_WORLD_*, PMI_*; MASTER_PORT,
and MASTER_ADDR when the processes span nodes, still come from the launch script) and as a plain
single process.
"""

from __future__ import annotations

import os
import socket
import warnings
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

    def check(self, world_size: int, num_experts: int | None = None) -> None:
        """Raise a clear error when the layout does not divide the world (``num_experts``: the
        routed experts, which the expert-parallel size must divide too)."""
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
            rest = 0 if world_size % (etp * self.pipeline) else world_size // (etp * self.pipeline)
            fits = [ep for ep in range(1, rest + 1)
                    if rest % ep == 0 and (num_experts is None or num_experts % ep == 0)]
            fix = (f"choose an expert_model_parallel_size in {fits}" + (
                f" (it must divide {rest} and the {num_experts} routed experts)"
                if num_experts is not None else "") if fits else
                f"change the expert tensor or pipeline size to divide {world_size}")
            raise ValueError(
                f"model_parallel: expert_model_parallel_size ({self.expert}) x expert tensor "
                f"parallel size ({etp}) x pipeline size ({self.pipeline}) = {expert_mp} does not "
                f"divide the world size {world_size}; {fix}"
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


# (rank, world size, rank on the node) as each launcher names them, in order of precedence: the
# launcher nearest the process first. One family is used whole: torchrun started from srun sees
# SLURM_LOCALID=0 beside its own LOCAL_RANK, and mpirun in a SLURM job starts its daemons with
# srun (one task per node), so its processes inherit SLURM_PROCID = the node's index.
_LAUNCHERS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),                                      # torchrun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),                               # MPICH / Intel MPI
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),                 # srun
)


class LaunchError(ValueError):
    """Launcher variables that cannot work (often left over in a shell); the message names them
    and the fix. A ValueError, which the tools report in one line."""


def _launcher_variables() -> tuple[str, str, str] | None:
    """The names of the first launcher's variables that are all set; None for a plain process."""
    return next((names for names in _LAUNCHERS
                 if all(os.environ.get(name, "").strip() for name in names)), None)


def _spans_nodes(names: tuple[str, str, str], world_size: int) -> bool:
    """Whether the launcher says its processes run on more than this node (False if it does
    not say: the world is taken to be this node's, as before)."""
    if names[0] == "SLURM_PROCID":
        return os.environ.get("SLURM_STEP_NUM_NODES", "1").strip() not in ("", "1")
    local_size = {"RANK": "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK": "OMPI_COMM_WORLD_LOCAL_SIZE",
                  "PMI_RANK": "MPI_LOCALNRANKS"}[names[0]]
    return os.environ.get(local_size, "").strip() not in ("", str(world_size))


def _launch_error(names: tuple[str, str, str], problem: str) -> LaunchError:
    shown = ", ".join(f"{name}={os.environ[name].strip()!r}" for name in names)
    return LaunchError(f"{shown}: {problem}; if they are left over from another launch, unset "
                       f"{names[0]}, {names[1]} and {names[2]}, or start with torchrun")


def launch_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the first launcher whose variables are all set;
    (0, 1, 0) for a plain process. LaunchError when they are not a rank of a world."""
    names = _launcher_variables()
    if names is None:
        return 0, 1, 0
    values = []
    for name in names:
        try:
            values.append(int(os.environ[name]))
        except ValueError:
            raise _launch_error(names, f"{name} is not a whole number") from None
    rank, world_size, local_rank = values
    if not 0 <= rank < world_size or local_rank < 0:
        raise _launch_error(names, f"{names[0]} must be in [0, {names[1]}) and {names[2]} >= 0")
    return rank, world_size, local_rank


def _device_index(local_rank: int) -> int:
    """The GPU of the process that is ``local_rank`` on its node."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    # srun --gpus-per-task=1 or --gpu-bind (or an mpirun wrapper) gives each process its own GPU
    # in CUDA_VISIBLE_DEVICES, as device 0, while its rank on the node still counts 0..7.
    # torchrun never narrows it per process: there one GPU for several is a mistake.
    if count == 1 and _launcher_variables()[0] != "RANK":
        return 0
    raise LaunchError(f"this process is rank {local_rank} on its node but only {count} GPU(s) "
                      "are visible; launch one process per GPU")


def _limit_cuda_connections(layout: ParallelLayout) -> None:
    """Megatron-core orders tensor-parallel communication against compute with a single CUDA
    hardware queue (``CUDA_DEVICE_MAX_CONNECTIONS=1``, read when a device's CUDA context is
    created). Set it before this process creates one; warn if that is already too late."""
    if layout.tensor == 1 and not layout.sequence_parallel:
        return
    if not _cuda_context_created():
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    elif os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        warnings.warn(
            "tensor parallelism wants CUDA_DEVICE_MAX_CONNECTIONS=1, but CUDA was initialised "
            "before dsmoe_megatron.runtime.initialize() could set it; export it in the launch "
            "script", stacklevel=3)


def _cuda_context_created() -> bool:
    """Whether a device's CUDA context exists. Asking about the devices, as Transformer Engine's
    import does (with flash-attn: their compute capability), starts torch's CUDA but creates no
    context, so the variable set then still holds."""
    return torch.cuda.is_initialized() and any(
        torch._C._cuda_hasPrimaryContext(i) for i in range(torch.cuda.device_count()))


def initialize(layout: ParallelLayout = ParallelLayout(), seed: int = 1234,
               num_experts: int | None = None) -> Runtime:
    """Initialise torch.distributed (if needed), Megatron parallel state and the RNG tracker
    (``num_experts``: the routed experts, for ``ParallelLayout.check``)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    gpu = use_gpu()
    if not gpu:
        cpu_compat.activate()
    if not dist.is_initialized():
        rank, world_size, local_rank = launch_ranks()
        names = _launcher_variables()
        if world_size > 1 and "MASTER_PORT" not in os.environ:
            raise _launch_error(names, f"a world of {world_size} processes, but "
                                "MASTER_PORT is not set (torchrun sets it; under srun or mpirun, "
                                "the launch script), so they cannot meet")
        if (world_size > 1 and "MASTER_ADDR" not in os.environ
                and _spans_nodes(names, world_size)):
            # 127.0.0.1 would send each node's processes to a rendezvous on their own node,
            # where nobody listens but on the first: a hang until the timeout.
            raise _launch_error(names, f"a world of {world_size} processes on "
                                "several nodes, but MASTER_ADDR is not set (torchrun sets it; "
                                "under srun or mpirun, the launch script: the first node's host "
                                "name), so they cannot meet")
        backend = "nccl" if gpu else "gloo"
        if gpu:
            _limit_cuda_connections(layout)
            torch.cuda.set_device(_device_index(local_rank))
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A lone process needs no rendezvous: an in-memory store avoids picking a port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    world_size = dist.get_world_size()
    layout.check(world_size, num_experts)
    _destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
    )
    torch.manual_seed(seed)  # what is drawn on the CPU (Megatron-LM seeds it the same way)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    return Runtime(device, dist.get_backend(), dist.get_rank(), world_size, layout)


def _destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel, and the process groups it forgets without destroying
    (each holds threads and sockets; a process that changes layout would pile them up), and
    the MoE metrics tracker, whose per-layer tensors are sized for the last model."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()
    if not parallel_state.model_parallel_is_initialized():
        return
    groups = {}
    for value in vars(parallel_state).values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, dist.ProcessGroup) and item is not dist.GroupMember.WORLD:
                groups[id(item)] = item
    parallel_state.destroy_model_parallel()
    for group in groups.values():
        try:
            dist.destroy_process_group(group)
        except ValueError:
            pass  # destroy_model_parallel destroyed it already


def shutdown(destroy_process_group: bool = True) -> None:
    """Tear down parallel state and (unless told to keep it for a caller that brought it up
    itself) the process group; safe to call twice."""
    _destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
