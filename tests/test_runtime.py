"""Each process finds its rank, the world size and its GPU on the node from its launcher."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsmoe_megatron import runtime
from dsmoe_megatron.runtime import LaunchError, launch_ranks

ROOT = Path(__file__).resolve().parent.parent

LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK",
    "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_STEP_NUM_NODES", "LOCAL_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
)


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8, 1)),
    ({"SLURM_PROCID": "13", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5"}, (13, 16, 5)),
    ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, (6, 8, 2)),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3"}, (3, 4, 3)),
    # torchrun inside an srun allocation: torchrun's own numbers, not srun's (one task per node).
    ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "SLURM_PROCID": "1",
      "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"}, (9, 16, 1)),
    # mpirun in a SLURM job: its processes inherit the srun task variables of the daemon that
    # started them (one per node); MPI's numbers, not the node's.
    ({"OMPI_COMM_WORLD_RANK": "11", "OMPI_COMM_WORLD_SIZE": "16",
      "OMPI_COMM_WORLD_LOCAL_RANK": "3", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
      "SLURM_LOCALID": "0"}, (11, 16, 3)),
    ({"PMI_RANK": "11", "PMI_SIZE": "16", "MPI_LOCALRANKID": "3", "SLURM_PROCID": "1",
      "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"}, (11, 16, 3)),
], ids=["plain", "torchrun", "srun", "openmpi", "mpich", "torchrun-under-srun",
        "openmpi-in-slurm", "mpich-in-slurm"])
def test_launch_ranks(monkeypatch, env, expected):
    set_launcher_variables(monkeypatch, env)
    assert launch_ranks() == expected


def set_launcher_variables(monkeypatch, env):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


class _Started(Exception):
    pass


def _gpu_chosen(monkeypatch, env, visible, master_addr="127.0.0.1"):
    """The device initialize() sets on a GPU machine with `visible` GPUs under `env`, and the
    MASTER_ADDR its rendezvous goes to."""
    set_launcher_variables(monkeypatch, env)
    monkeypatch.setenv("MASTER_ADDR", master_addr or "")  # restored afterwards, set or not
    if master_addr is None:
        monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("MASTER_PORT", "29500")
    chosen = []
    monkeypatch.setattr(runtime, "use_gpu", lambda: True)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(runtime.torch.cuda, "set_device", chosen.append)

    def init_process_group(*args, **kwargs):
        chosen.append(os.environ["MASTER_ADDR"])
        raise _Started

    monkeypatch.setattr(runtime.dist, "init_process_group", init_process_group)
    with pytest.raises(_Started):
        runtime.initialize()
    return chosen


SRUN_TASK_3 = {"SLURM_PROCID": "11", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "3"}


def test_each_process_takes_its_gpu_of_the_node(monkeypatch):
    assert _gpu_chosen(monkeypatch, SRUN_TASK_3, visible=8) == [3, "127.0.0.1"]


def test_a_task_given_its_own_gpu_takes_it(monkeypatch):
    """srun --gpus-per-task=1 (or --gpu-bind) sets CUDA_VISIBLE_DEVICES per task: each task
    sees its one GPU as device 0 while SLURM_LOCALID still counts the tasks on the node."""
    assert _gpu_chosen(monkeypatch, SRUN_TASK_3, visible=1) == [0, "127.0.0.1"]


@pytest.mark.parametrize("env, visible", [
    (SRUN_TASK_3, 2),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, 1),  # torchrun shares no GPU
], ids=["srun", "torchrun"])
def test_more_processes_than_gpus_is_refused(monkeypatch, env, visible):
    with pytest.raises(LaunchError, match=rf"rank 3 on its node but only {visible} GPU\(s\) are "
                       "visible; launch one process per GPU"):
        _gpu_chosen(monkeypatch, env, visible)


SRUN_ON_TWO_NODES = dict(SRUN_TASK_3, SLURM_STEP_NUM_NODES="2")
MPIRUN_ON_TWO_NODES = {"OMPI_COMM_WORLD_RANK": "11", "OMPI_COMM_WORLD_SIZE": "16",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}


@pytest.mark.parametrize("env", [SRUN_ON_TWO_NODES, MPIRUN_ON_TWO_NODES], ids=["srun", "mpirun"])
def test_several_nodes_need_master_addr(monkeypatch, env):
    """Without it each node would look for the rendezvous on itself (127.0.0.1) and hang."""
    with pytest.raises(LaunchError, match="a world of 16 processes on several nodes, but "
                       "MASTER_ADDR is not set"):
        _gpu_chosen(monkeypatch, env, visible=8, master_addr=None)
    assert _gpu_chosen(monkeypatch, env, visible=8, master_addr="gpu-node-07") == [
        3, "gpu-node-07"]


@pytest.mark.parametrize("env", [
    dict(SRUN_TASK_3, SLURM_STEP_NUM_NODES="1"),
    dict(MPIRUN_ON_TWO_NODES, OMPI_COMM_WORLD_LOCAL_SIZE="16"),
], ids=["srun", "mpirun"])
def test_one_node_meets_on_itself(monkeypatch, env):
    assert _gpu_chosen(monkeypatch, env, visible=8, master_addr=None) == [3, "127.0.0.1"]


TORCHRUN_FIX = "unset RANK, WORLD_SIZE and LOCAL_RANK, or start with torchrun"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "abc", "LOCAL_RANK": "0"},
     "RANK='0', WORLD_SIZE='abc', LOCAL_RANK='0': WORLD_SIZE is not a whole number; if they are "
     f"left over from another launch, {TORCHRUN_FIX}"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
     "RANK='2', WORLD_SIZE='2', LOCAL_RANK='0': RANK must be in [0, WORLD_SIZE) and "
     f"LOCAL_RANK >= 0; if they are left over from another launch, {TORCHRUN_FIX}"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "-1"},
     "SLURM_PROCID='0', SLURM_STEP_NUM_TASKS='4', SLURM_LOCALID='-1': SLURM_PROCID must be in "
     "[0, SLURM_STEP_NUM_TASKS) and SLURM_LOCALID >= 0; if they are left over from another "
     "launch, unset SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, or start with "
     "torchrun"),
], ids=["not-a-number", "rank-past-the-world", "srun"])
def test_bad_launcher_variables_are_named(monkeypatch, env, message):
    set_launcher_variables(monkeypatch, env)
    with pytest.raises(LaunchError) as err:
        launch_ranks()
    assert str(err.value) == message


@pytest.mark.parametrize("world_size, problem", [
    ("2", "a world of 2 processes, but MASTER_PORT is not set"),
    ("abc", "WORLD_SIZE is not a whole number"),
], ids=["no-master-port", "not-a-number"])
def test_leftover_launcher_variables_stop_dsmoe_train_in_one_line(world_size, problem, tmp_path):
    """torchrun's variables left in a shell: one line naming them and the fix, no traceback."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(("MASTER_", "TORCHELASTIC"))}
    env.update(RANK="0", WORLD_SIZE=world_size, LOCAL_RANK="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dsmoe_megatron.train", "yaml_configs/tiny.yaml",
                           f"save={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    line = f"dsmoe-train: RANK='0', WORLD_SIZE={world_size!r}, LOCAL_RANK='0': {problem}"
    assert proc.stderr.splitlines()[-1].startswith(line), proc.stderr
    assert proc.stderr.endswith(f"{TORCHRUN_FIX}\n") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("context", [False, True])
def test_tensor_parallel_limits_cuda_connections_until_a_context_exists(monkeypatch, context):
    """CUDA_DEVICE_MAX_CONNECTIONS is read when a device's context is created. Transformer
    Engine's import (with flash-attn) asks for the compute capability, which starts torch's CUDA
    (torch.cuda.is_initialized) without a context: the variable was then never set, on every
    tensor-parallel run with TE. It is set unless a context exists, and else the run is told."""
    import warnings

    import torch

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda i: context and i == 1,
                        raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime._limit_cuda_connections(runtime.ParallelLayout(tensor=2))
        runtime._limit_cuda_connections(runtime.ParallelLayout())  # no TP: left as it is
    told = [str(w.message) for w in caught if "CUDA_DEVICE_MAX_CONNECTIONS" in str(w.message)]
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == (None if context else "1")
    assert len(told) == context
