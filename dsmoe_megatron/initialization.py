"""Initial weights that depend on the seed only, not on the parallel layout.

Megatron-core draws each rank's shard from that rank's RNG stream, so TP, PP and EP layouts start
from different weights (and with torch expert backends on a GPU, every EP rank drew the same
experts). Here each randomly initialised tensor is redrawn from a generator seeded by
``(seed, checkpoint key, index)``: every rank generates the whole tensor with the init function
Megatron chose for it and keeps its own slice. Stacked matrices (routed experts ``[E, out, in]``)
get one generator per expert, so an EP rank generates its own experts only.

    with record_init_methods(config) as record:
        chunks = build_model_chunks(config, ...)
    redraw_initial_weights(chunks, record, seed)

Cost: one extra draw of each random tensor at its full (unsharded over TP / expert TP) size,
once, at start-up (benchmarks/layout_independent_init.py measures it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from dsmoe_megatron.checkpoint import sharded_tensors


class InitRecord:
    """Which init function Megatron applied to which storage (the parameters' and their views')."""

    def __init__(self):
        self._by_storage: dict[int, tuple[weakref.ref, Callable]] = {}

    def note(self, tensor: torch.Tensor, init: Callable) -> None:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return  # e.g. FP8 primary weights: kept as Transformer Engine drew them
        storage = tensor.untyped_storage()
        self._by_storage[id(storage)] = (weakref.ref(storage), init)

    def init_for(self, tensor: torch.Tensor) -> Callable | None:
        storage = tensor.untyped_storage()
        ref, init = self._by_storage.get(id(storage), (None, None))
        # A dead reference is a freed temporary whose id() was reused: not this tensor.
        return init if ref is not None and ref() is storage else None


@contextmanager
def record_init_methods(config) -> Iterator[InitRecord]:
    """While building a model from ``config``, note what each ``*init_method`` is applied to."""
    record = InitRecord()
    originals = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config)
        if f.name.endswith("init_method") and callable(getattr(config, f.name, None))
    }
    active = [True]

    def recording(init):
        def init_and_note(tensor):
            if active[0]:
                record.note(tensor, init)
            return init(tensor)
        return init_and_note

    for name, init in originals.items():
        setattr(config, name, recording(init))
    try:
        yield record
    finally:
        active[0] = False  # copies of the config made while building keep the wrapper
        for name, init in originals.items():
            setattr(config, name, init)


def _unit_seed(seed: int, key: str, index: tuple[int, ...]) -> int:
    digest = hashlib.blake2b(repr((seed, key, index)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def _seeded(unit_seed: int, device: torch.device):
    """The default generators of the CPU and of ``device`` seeded, restored afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(unit_seed)
        if cuda:
            torch.cuda.manual_seed(unit_seed)
        yield


@torch.no_grad()
def _redraw(sharded: ShardedTensor, init: Callable, seed: int) -> None:
    """Fill this rank's slice of ``sharded`` from the full tensor drawn for its key."""
    data, prepend = sharded.data, sharded.prepend_axis_num
    stacked = max(0, data.dim() - 2)  # leading data axes of stacked matrices (experts)
    unit_shape = sharded.global_shape[prepend + stacked:]
    window = sharded.global_slice()[prepend + stacked:]
    prefix = tuple(sharded.global_offset[:prepend])
    for local in itertools.product(*map(range, data.shape[:stacked])):
        index = prefix + tuple(sharded.global_offset[prepend + axis] + i
                               for axis, i in enumerate(local))
        unit = data.new_empty(unit_shape)
        with _seeded(_unit_seed(seed, sharded.key, index), data.device):
            init(unit)
        data[local].copy_(unit[window])


def redraw_initial_weights(model_chunks, record: InitRecord, seed: int) -> None:
    """Redraw every randomly initialised parameter of this rank's chunks (before DDP wraps them)
    from ``(seed, key)``; parameters Megatron set to constants (norms, biases) stay as they are."""
    redrawn = set()
    for chunk in model_chunks:
        for sharded in sharded_tensors(chunk.sharded_state_dict()):
            init = record.init_for(sharded.data)
            if init is not None:
                _redraw(sharded, init, seed)
                redrawn.add(id(sharded.data.untyped_storage()))
        for name, param in chunk.named_parameters():
            if record.init_for(param) is not None and id(param.untyped_storage()) not in redrawn:
                raise RuntimeError(
                    f"{name} was initialised randomly but is not in the model's sharded state "
                    "dict, so it cannot be drawn independently of the layout")
