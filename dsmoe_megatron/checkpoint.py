"""Dist checkpoints: layout-independent, written atomically.

    <save>/iter_0000100/        a Megatron dist checkpoint (torch_dist) + run.yaml
    <save>/latest               the newest complete iteration, replaced atomically

A checkpoint is written to ``iter_XXXXXXX.partial`` and renamed when every rank has finished;
``latest`` is updated only after that, so a crash mid-save leaves the last good one loadable.
The sharded keys are the model's own (``decoder.layers.N.mlp.experts.gate_proj`` [E, W, H], ...),
so a checkpoint saved under one TP/PP/EP layout loads under any other.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

RUN_CONFIG_NAME = "run.yaml"
# The distributed optimizer's layout-independent format (its default is deprecated and broken).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _model_keys(num_chunks: int) -> list[str]:
    """One entry per model chunk (virtual pipeline stages have several)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(model_chunks) -> dict:
    keys = _model_keys(len(model_chunks))
    return {key: chunk.sharded_state_dict() for key, chunk in zip(keys, model_chunks)}


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def save(save_dir: str | Path, iteration: int, model_chunks, optimizer=None,
         extra_state: dict | None = None, run_config_yaml: str | None = None,
         sharded_strategy=None) -> Path:
    """Save model (+ optimizer, + small extra state) for `iteration`; returns the final dir.
    ``sharded_strategy``: dist_checkpointing's (default: Megatron's torch_dist writer)."""
    final = iteration_dir(save_dir, iteration)
    partial = final.with_name(final.name + ".partial")
    if _rank() == 0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    chunks = [_unwrap(c) for c in model_chunks]
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state["extra"] = extra_state or {}
    state["iteration"] = iteration
    state["has_optimizer"] = optimizer is not None
    dist_checkpointing.save(state, str(partial), sharded_strategy=sharded_strategy)
    _barrier()
    if _rank() == 0:
        if run_config_yaml is not None:
            (partial / RUN_CONFIG_NAME).write_text(run_config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(Path(save_dir) / "latest", str(iteration))
    _barrier()
    return final


def latest_iteration(save_dir: str | Path) -> int | None:
    marker = Path(save_dir) / "latest"
    if not marker.exists():
        return None
    return int(marker.read_text().strip())


def resolve(path: str | Path) -> Path:
    """A save dir (-> its latest iteration) or an iteration dir -> the iteration dir."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        raise CheckpointError(
            f"no checkpoint at {path}: expected an iter_XXXXXXX directory or a save directory "
            "with a 'latest' file; check the path (load: / --checkpoint)"
        )
    found = iteration_dir(path, iteration)
    if not (found / "metadata.json").exists():
        raise CheckpointError(f"{path}/latest points at {found}, which is missing or incomplete")
    return found


def load(path: str | Path, model_chunks, optimizer=None) -> dict:
    """Load into the (possibly differently laid out) model; returns the extra state dict.

    Loads the optimizer only when one is given and the checkpoint has it.
    """
    ckpt = resolve(path)
    chunks = [_unwrap(c) for c in model_chunks]
    state = model_sharded_state_dict(chunks)
    has_optimizer = dist_checkpointing.load_common_state_dict(str(ckpt)).get("has_optimizer")
    if optimizer is not None and has_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=OPTIMIZER_METADATA)
    state["extra"] = {}
    state["iteration"] = 0
    loaded = dist_checkpointing.load(state, str(ckpt))
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        # Transformer Engine modules keep FP8 bookkeeping in `_extra_state`, which is not saved.
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(
                f"{ckpt} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    if optimizer is not None and has_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    extra = dict(loaded.get("extra") or {})
    extra["iteration"] = loaded.get("iteration", 0)
    return extra


def read_run_config_yaml(path: str | Path) -> str:
    ckpt = resolve(path)
    config_file = ckpt / RUN_CONFIG_NAME
    if not config_file.exists():
        raise CheckpointError(f"{config_file} is missing; the checkpoint does not say its model")
    return config_file.read_text()
