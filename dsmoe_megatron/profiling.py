"""Probes for the MoE hot path that need no GPU: host syncs, ATen ops, bytes saved for backward.

- ``HostSyncCounter``: counts what would stall the host on a GPU: reads of device values on the
  host (``tolist``, ``item``, ``cpu``, ``numpy``, ``bool(t)``...) and ops whose output size
  depends on the data (``nonzero``, ``bincount``, ``unique``, ``masked_select``,
  ``repeat_interleave`` without ``output_size``...), and tensors made from host data
  (``torch.tensor(list)``: a host-to-device copy the host waits for).
- ``count_aten_ops``: top-level ATen ops (as the profiler records them) and dispatched
  non-view ATen ops (about one kernel launch each) of a callable.
- ``saved_bytes``: bytes autograd keeps for backward after a forward, each storage once, the
  given inputs and parameters excluded, with a breakdown by autograd node.
- ``bytes_moved``: bytes each dispatched ATen op reads and writes, GEMMs apart: outside the
  GEMMs a GPU's time is about these bytes over its memory bandwidth.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops whose output size depends on tensor values: the host must wait for the device.
DATA_DEPENDENT_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "nonzero_static", "bincount", "unique", "_unique",
    "_unique2", "unique_dim", "unique_consecutive", "masked_select", "_assert_async",
})
HOST_READS = frozenset({"tolist", "item", "cpu", "numpy"})
# Tensors made from host data: on a GPU a pageable host-to-device copy, which the host waits for.
FROM_HOST_DATA = frozenset({"tensor", "as_tensor"})


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.count`` and ``c.events`` (op names)."""

    def __init__(self):
        self.events: list[str] = []
        self._in_host_read = 0
        counter = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in FROM_HOST_DATA and args and not isinstance(args[0], torch.Tensor):
                    counter.events.append(f"torch.{name}")
                if name not in HOST_READS:
                    return func(*args, **(kwargs or {}))
                counter.events.append(f"Tensor.{name}")
                counter._in_host_read += 1  # the ATen ops it runs are the same sync
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    counter._in_host_read -= 1

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not counter._in_host_read and _syncs(func, args, kwargs):
                    counter.events.append(f"aten.{func.overloadpacket.__name__}")
                return func(*args, **kwargs)

        self._modes = [_Functions(), _Dispatch()]

    @property
    def count(self) -> int:
        return len(self.events)

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def _syncs(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in DATA_DEPENDENT_OPS:
        return True
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if name in ("_to_copy", "copy_"):  # device -> host copies
        src = args[1] if name == "copy_" else args[0]
        dst = args[0].device if name == "copy_" else kwargs.get("device")
        return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    if name in ("index", "index_put", "index_put_"):  # boolean masks run nonzero
        indices = args[1] if len(args) > 1 else ()
        return any(i is not None and i.dtype == torch.bool for i in indices)
    return False


@dataclass
class OpCounts:
    top_level: int  # aten:: events with no aten:: ancestor (torch.profiler)
    dispatched: int  # non-view ATen ops reaching the dispatcher (about one launch each)
    by_name: dict[str, int] = field(default_factory=dict)  # top-level, by op


def count_aten_ops(fn) -> OpCounts:
    """Run ``fn()`` twice: once under the profiler, once under a counting dispatch mode."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    by_name: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.name.startswith("aten::") and not _has_aten_ancestor(event):
            by_name[event.name] += 1
    counter = _DispatchCounter()
    with counter:
        fn()
    return OpCounts(sum(by_name.values()), counter.count, dict(by_name))


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


class _DispatchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ("detach", "alias"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass
class SavedBytes:
    total: int  # bytes of every storage saved for backward (saved_tensors_hooks)
    by_node: dict[str, int]  # the same storages, each attributed to the first node saving it


def saved_bytes(forward, exclude=()) -> tuple[object, SavedBytes]:
    """Run ``out = forward()``; return (out, bytes autograd keeps for backward).

    Storages are counted once, at their size after the forward (so storages released early, as
    Megatron's output-discarding recompute does, count zero); storages of ``exclude`` (inputs,
    parameters) are left out.
    """
    excluded = {storage_key(t) for t in exclude}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t):
        key = storage_key(t)
        if key not in excluded and key not in storages:
            storages[key] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    total = sum(s.nbytes() for s in storages.values())
    return out, SavedBytes(total, _by_node(out, excluded))


def storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (its views share it), unique while the storage lives.
    Not its memory address: a storage freed during the forward (recompute resizes its output to
    0) gives its address to the next allocation, which would then be taken for the same."""
    return t.untyped_storage()._cdata


def _by_node(out, excluded) -> dict[str, int]:
    """Walk the autograd graph from ``out``; attribute each saved storage to its first node."""
    roots = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    seen_nodes, seen_storages = set(), set(excluded)
    by_node: collections.Counter = collections.Counter()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for t in _saved_tensors(node):
            key = storage_key(t)
            if key not in seen_storages:
                seen_storages.add(key)
                by_node[_node_name(node)] += t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return dict(by_node)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _saved_tensors(node):
    names = [n for n in dir(node) if n.startswith("_saved_")]
    values = [getattr(node, n) for n in names]
    with contextlib.suppress(RuntimeError, AttributeError):
        values.append(node.saved_tensors)  # custom autograd Functions
    for value in values:
        yield from _tensors(value)


def _node_name(node) -> str:
    return type(node).__name__.removesuffix("Backward").removesuffix("Backward0")


# Ops that read only the indexed rows of their first tensor (about the bytes they write).
GATHERS = frozenset({"index", "index_select", "embedding", "_embedding_bag",
                     "_embedding_bag_forward_only", "gather"})
# Ops that add rows into their first tensor: read and write the rows of the values they add.
SCATTERS = frozenset({"index_put", "index_put_", "_index_put_impl_", "index_add", "index_add_",
                      "scatter", "scatter_", "scatter_add", "scatter_add_", "index_copy",
                      "index_copy_"})
WRITE_ONLY = frozenset({"fill_", "zero_", "zeros", "zeros_like", "new_zeros", "full",
                        "full_like", "new_full", "ones", "ones_like", "new_ones", "arange",
                        "randn", "rand", "normal_", "uniform_"})
NO_DATA = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                     "_unsafe_view", "detach", "alias"})  # allocate or relabel, move nothing
# What moving rows between token order and expert order costs: gathers, scatters, the sorts that
# build their indices and the zero fills scatters need.
ROW_MOVES = GATHERS | SCATTERS | {"sort", "fill_", "zero_", "zeros", "new_zeros"}
GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"})


@dataclass
class BytesMoved:
    gemm: int = 0  # operands and results of the matrix products
    other: int = 0  # everything else: what memory-bound kernels move
    by_op: dict[str, int] = field(default_factory=dict)  # the ``other`` bytes, by ATen op

    @property
    def row_moves(self) -> int:
        return sum(v for k, v in self.by_op.items() if k in ROW_MOVES)


def bytes_moved(fn) -> BytesMoved:
    """Run ``fn()`` and add up, per dispatched non-view ATen op, the bytes of its tensor inputs
    (read) and outputs (written). A gather counts only the rows it reads; a scatter reads and
    writes the rows it adds; fills write; ``out=`` tensors are written, not read. A model of
    traffic, not a measurement of it: it ignores caches and assumes no two ops are fused."""
    counter = _BytesCounter()
    with counter:
        fn()
    counter.result.by_op = dict(counter.by_op.most_common())
    return counter.result


class _BytesCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.result = BytesMoved()
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_DATA:
            return out
        moved = _op_bytes(name, args, kwargs, out)
        if name in GEMMS:
            self.result.gemm += moved
        else:
            self.result.other += moved
            self.by_op[name] += moved
        return out


def _op_bytes(name: str, args, kwargs, out) -> int:
    written = sum(_nbytes(t) for t in _tensors(out))
    inputs = [t for a in args for t in _tensors(a)]
    if name in WRITE_ONLY:
        return written
    if name in GATHERS:  # the table is read where indexed: about what is written
        return written + written + sum(_nbytes(t) for t in inputs[1:])
    if name in SCATTERS:  # indices and values read; the rows they land on read and written
        added = sum(_nbytes(t) for t in inputs[1:] if t.dtype == inputs[0].dtype)
        return sum(_nbytes(t) for t in inputs[1:]) + 2 * added
    if name == "copy_":
        return _nbytes(inputs[1]) + _nbytes(inputs[0])
    read = sum(_nbytes(t) for t in inputs)
    read += sum(_nbytes(t) for key, v in kwargs.items() if key not in ("out", "grad_input")
                for t in _tensors(v))
    return read + written


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
